"""Expert merging as Triton kernels: merge, its weight gradient, and merge-then-matmul.

On GPU the row-major [E,D,F] experts reshape for free to [E, N=D*F], so the merge is a plain
skinny matmul [S,E] x [E,N] tiled over (S, N): each program loads its [E_pad, bn] column block
once and writes [bs, bn] merged values. E and S are padded to >= 16 (a `tl.dot` minimum) by
masked loads, never by copying the experts. Precision: `precision.weighted_sum`.

Kernels:
* `merge(w_se, x_edf)` -> [S,D,F]: grid (S/bs, N/bn). Also the experts' gradient:
  d_experts = merge(weights.T, d_merged).
* `merge_weights_grad(g_sdf, x_edf)` -> [S,E] float32: grid (S/bs, P); program p walks a
  contiguous run of column blocks accumulating g_block @ x_block.T, and the P partial [S,E]
  sums are added in XLA (deterministic, no atomics).
* `merged_matmul(x_sld, w_se, x_edf)` -> [S,L,F]: grid (S*L/bl, F/bf). A program owns one
  [bl, bf] output tile of one segment and loops over D in bd steps: it merges the [bd, bf]
  expert tiles with the segment's weights on the CUDA cores (E FMAs per element, float32) and
  feeds the result straight into a tensor-core `tl.dot` with the [bl, bd] token tile. Programs
  are ordered segment-fastest, so those running together read the same expert tiles (L2 hits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels.merge.precision import weighted_sum

DEFAULT_BLOCK_N = 256
MAX_GRAD_PROGRAMS = 512


def _merge_kernel(w_ref, x_ref, out_ref, *, bs: int, bn: int, lanes_e: int):
  s, e = w_ref.shape
  n = x_ref.shape[1]
  si, ni = pl.program_id(0), pl.program_id(1)
  rows = si * bs + jnp.arange(bs, dtype=jnp.int32)
  cols = ni * bn + jnp.arange(bn, dtype=jnp.int32)
  lane_e = jnp.arange(lanes_e, dtype=jnp.int32)
  w = plgpu.load(
      w_ref.at[pl.ds(si * bs, bs), pl.ds(0, lanes_e)],
      mask=jnp.logical_and((rows < s)[:, None], (lane_e < e)[None, :]),
      other=0.0,
  ).astype(jnp.float32)
  x = plgpu.load(
      x_ref.at[pl.ds(0, lanes_e), pl.ds(ni * bn, bn)],
      mask=jnp.logical_and((lane_e < e)[:, None], (cols < n)[None, :]),
      other=0.0,
  )
  plgpu.store(
      out_ref.at[pl.ds(si * bs, bs), pl.ds(ni * bn, bn)],
      weighted_sum(w, x).astype(out_ref.dtype),
      mask=jnp.logical_and((rows < s)[:, None], (cols < n)[None, :]),
  )


def merge(
    w_se: jax.Array,
    x_edf: jax.Array,
    *,
    block_n: int = DEFAULT_BLOCK_N,
    interpret: bool = False,
) -> jax.Array:
  """merged[s] = sum_e w[s,e] x[e] on GPU; [S,E] x [E,D,F] -> [S,D,F] in x's dtype.

  Args:
    w_se: [S,E] float weights, used in float32; [bs, E_pad] tiles.
    x_edf: [E,D,F] stacked parameters, read as [E, D*F] in [E_pad, bn] tiles.
    block_n: bn, columns of D*F per program (a power of two).
    interpret: run in Pallas interpret mode (CPU).
  """
  s, e = w_se.shape
  _, d, f = x_edf.shape
  n = d * f
  bs = common.triton_block(s, 64)
  bn = common.triton_block(n, block_n)
  out = pl.pallas_call(
      functools.partial(_merge_kernel, bs=bs, bn=bn, lanes_e=common.triton_block(e, e)),
      grid=(common.cdiv(s, bs), common.cdiv(n, bn)),
      out_shape=common.out_struct((s, n), x_edf.dtype, w_se, x_edf),
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2),
      interpret=interpret,
      name="merge",
  )(w_se, x_edf.reshape(e, n))
  return out.reshape(s, d, f)


def _weights_grad_kernel(g_ref, x_ref, out_ref, *, bs: int, bn: int, lanes_e: int, steps: int):
  s, n = g_ref.shape
  e = x_ref.shape[0]
  si, p = pl.program_id(0), pl.program_id(1)
  rows = si * bs + jnp.arange(bs, dtype=jnp.int32)
  lane_e = jnp.arange(lanes_e, dtype=jnp.int32)
  precision = None if g_ref.dtype.itemsize == 2 else jax.lax.Precision.HIGHEST

  def step(c, acc):
    n0 = (p * steps + c) * bn
    cols_ok = (n0 + jnp.arange(bn, dtype=jnp.int32) < n)[None, :]
    g = plgpu.load(
        g_ref.at[pl.ds(si * bs, bs), pl.ds(n0, bn)],
        mask=jnp.logical_and((rows < s)[:, None], cols_ok),
        other=0.0,
    )
    x = plgpu.load(
        x_ref.at[pl.ds(0, lanes_e), pl.ds(n0, bn)],
        mask=jnp.logical_and((lane_e < e)[:, None], cols_ok),
        other=0.0,
    )
    return acc + jnp.dot(g, x.T, precision=precision, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bs, lanes_e), jnp.float32))
  plgpu.store(
      out_ref.at[p, pl.ds(si * bs, bs), pl.ds(0, lanes_e)],
      acc,
      mask=jnp.logical_and((rows < s)[:, None], (lane_e < e)[None, :]),
  )


def merge_weights_grad(
    g_sdf: jax.Array,
    x_edf: jax.Array,
    *,
    block_n: int = DEFAULT_BLOCK_N,
    interpret: bool = False,
) -> jax.Array:
  """dw[s,e] = sum_{d,f} g[s,d,f] x[e,d,f] on GPU; [S,D,F] x [E,D,F] -> [S,E] float32.

  Args:
    g_sdf: [S,D,F] cotangent of the merged parameters, read as [S, D*F] in [bs, bn] tiles.
    x_edf: [E,D,F] stacked parameters (same dtype), read as [E, D*F] in [E_pad, bn] tiles.
    block_n: bn, columns per step (a power of two).
    interpret: run in Pallas interpret mode (CPU).
  """
  s, d, f = g_sdf.shape
  e = x_edf.shape[0]
  n = d * f
  bs = common.triton_block(s, 64)
  bn = common.triton_block(n, block_n)
  blocks = common.cdiv(n, bn)
  steps = common.cdiv(blocks, MAX_GRAD_PROGRAMS)
  num_programs = common.cdiv(blocks, steps)
  lanes_e = common.triton_block(e, e)
  partial_sums = pl.pallas_call(
      functools.partial(_weights_grad_kernel, bs=bs, bn=bn, lanes_e=lanes_e, steps=steps),
      grid=(common.cdiv(s, bs), num_programs),
      out_shape=common.out_struct((num_programs, s, e), jnp.float32, g_sdf, x_edf),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name="merge_weights_grad",
  )(g_sdf.reshape(s, n), x_edf.reshape(e, n))
  return jnp.sum(partial_sums, axis=0)


def _merged_matmul_kernel(
    x_ref, w_ref, e_ref, out_ref, *, bl: int, bd: int, bf: int, num_l: int,
):
  _, l, d = x_ref.shape
  e, _, f = e_ref.shape
  seg, li = pl.program_id(0) // num_l, pl.program_id(0) % num_l
  fi = pl.program_id(1)
  rows = li * bl + jnp.arange(bl, dtype=jnp.int32)
  cols = fi * bf + jnp.arange(bf, dtype=jnp.int32)
  rows_ok, cols_ok = rows < l, cols < f

  def d_step(di, acc):
    ds_ok = di * bd + jnp.arange(bd, dtype=jnp.int32) < d
    x = plgpu.load(
        x_ref.at[seg, pl.ds(li * bl, bl), pl.ds(di * bd, bd)],
        mask=jnp.logical_and(rows_ok[:, None], ds_ok[None, :]),
        other=0.0,
    )
    tile_mask = jnp.logical_and(ds_ok[:, None], cols_ok[None, :])

    def add_expert(ei, merged):
      tile = plgpu.load(
          e_ref.at[ei, pl.ds(di * bd, bd), pl.ds(fi * bf, bf)], mask=tile_mask, other=0.0
      )
      return merged + w_ref[seg, ei].astype(jnp.float32) * tile.astype(jnp.float32)

    merged = jax.lax.fori_loop(0, e, add_expert, jnp.zeros((bd, bf), jnp.float32))
    merged = merged.astype(e_ref.dtype).astype(x.dtype)
    return acc + jnp.dot(x, merged, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, common.cdiv(d, bd), d_step, jnp.zeros((bl, bf), jnp.float32))
  plgpu.store(
      out_ref.at[seg, pl.ds(li * bl, bl), pl.ds(fi * bf, bf)],
      acc.astype(out_ref.dtype),
      mask=jnp.logical_and(rows_ok[:, None], cols_ok[None, :]),
  )


def merged_matmul(
    x_sld: jax.Array,
    w_se: jax.Array,
    x_edf: jax.Array,
    *,
    block_l: int = 64,
    block_d: int = 32,
    block_f: int = 64,
    interpret: bool = False,
) -> jax.Array:
  """y[s] = x[s] @ (sum_e w[s,e] experts[e]) on GPU, merged tiles never leave registers.

  Args:
    x_sld: [S,L,D] segment tokens; [bl, bd] tiles.
    w_se: [S,E] float merge weights (scalars, used in float32).
    x_edf: [E,D,F] stacked parameters, same dtype as x_sld; [bd, bf] tiles.
    block_l, block_d, block_f: bl, bd, bf (powers of two >= 16).
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    [S,L,F] in x_sld's dtype.
  """
  s, l, d = x_sld.shape
  f = x_edf.shape[2]
  bl = common.triton_block(l, block_l)
  bd = common.triton_block(d, block_d)
  bf = common.triton_block(f, block_f)
  num_l = common.cdiv(l, bl)
  return pl.pallas_call(
      functools.partial(_merged_matmul_kernel, bl=bl, bd=bd, bf=bf, num_l=num_l),
      grid=(s * num_l, common.cdiv(f, bf)),
      out_shape=common.out_struct((s, l, f), x_sld.dtype, x_sld, w_se, x_edf),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="merged_matmul",
  )(x_sld, w_se, x_edf)
