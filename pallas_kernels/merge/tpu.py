"""Expert merging as Mosaic TPU kernels: merge, its weight gradient, and merge-then-matmul.

The merge is a skinny matmul [S,E] x [E, D*F]: memory-bound (it reads E*D*F and writes S*D*F
parameters and does 2*S*E flops per column). The experts stay [E,D,F] in HBM (reshaping them
to [E, D*F] would be a copy on TPU, whose HBM layout is tiled over the two minor dims); each
grid step DMAs an [E, bd, bf] block, flattens it *in VMEM* to [E, bd*bf] and runs one MXU
matmul with the weights. Precision: see `precision.weighted_sum` (float32 weights
split into two 16-bit MXU passes for 16-bit experts; float32 accumulation).

Kernels:
* `merge(w_se, x_edf)` -> [S,D,F]: grid (S/bs, D/bd, F/bf), all parallel (bs = S up to
  256). Also the experts' gradient: d_experts = merge(weights.T, d_merged).
* `merge_weights_grad(g_sdf, x_edf)` -> [S,E] float32, the weights' gradient
  sum_{d,f} g[s,d,f] x[e,d,f]: grid (S/bs, D/bd parallel, F/bf arbitrary), one [S,E]
  partial per D block summed in XLA. Edge blocks are masked (garbage there would poison the sum).
* `merged_matmul(x_sld, w_se, x_edf)` -> [S,L,F]: grid (S/bs, L/bl, F/bf, D/bd), D last
  (arbitrary) with an [bs, bl, bf] float32 accumulator. Each step merges an [E, bd, bf]
  expert block for bs segments at once (so HBM traffic for the experts is S/bs * L/bl * E*D*F
  instead of the S*D*F write + read of materialised merged weights) and feeds it straight to
  a batched MXU matmul with the segments' [bl, bd] token blocks.

Lane rule: bf must be a multiple of 128 (or all of F) and bd a multiple of 16 (or all of D);
the in-VMEM flatten needs F blocks that are whole lane tiles, so a real TPU needs F >= 128.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.merge.precision import weighted_sum

VMEM_BUDGET = 12 * 2**20  # bytes of blocks and temporaries per grid step, under the 16 MiB default
DEFAULT_BLOCK_F = 512
MAX_BLOCK_ROWS = 256  # segments per block; more segments get a grid dim of their own


def _halve(block: int, multiple: int) -> int:
  """Half a block size, rounded down to a multiple of `multiple` and at least `multiple`."""
  return max(multiple, block // 2 // multiple * multiple)


def _blocks(a: int, e: int, d: int, f: int, itemsize: int, block_f: int):
  """(ba, bd, bf) so double-buffered [E,bd,bf] + [ba,bd,bf] blocks and f32 temps fit VMEM.

  `a` is the output-row dim (segments), `e` the contraction (experts): e must stay whole, so
  the contraction is limited to a few hundred (VMEM_BUDGET / (16 * 128 * 12 bytes) ~ 500).
  """
  ba = common.tpu_block(a, MAX_BLOCK_ROWS, 8)  # the [ba, E] float32 blocks' sublane dim
  per_elem = (e + ba) * (2 * itemsize + 4)
  bf = common.tpu_block(f, block_f, 128)
  while bf > 128 and per_elem * bf * 16 > VMEM_BUDGET:
    bf = _halve(bf, 128)
  bd = max(16, (VMEM_BUDGET // (per_elem * bf)) // 16 * 16)
  return ba, common.tpu_block(d, bd, 16), bf


def _merge_kernel(w_ref, x_ref, out_ref):
  num_e, bd, bf = x_ref.shape
  merged = weighted_sum(w_ref[...].astype(jnp.float32), x_ref[...].reshape(num_e, bd * bf))
  out_ref[...] = merged.reshape(out_ref.shape).astype(out_ref.dtype)


def merge(
    w_se: jax.Array,
    x_edf: jax.Array,
    *,
    block_f: int = DEFAULT_BLOCK_F,
    block_d: int | None = None,
    interpret: bool = False,
) -> jax.Array:
  """merged[s] = sum_e w[s,e] x[e] on TPU; [S,E] x [E,D,F] -> [S,D,F] in x's dtype.

  Args:
    w_se: [S,E] float weights; one whole [S,E] block, used in float32.
    x_edf: [E,D,F] stacked parameters; [E, bd, bf] blocks.
    block_f: bf, a multiple of 128.
    block_d: bd, a multiple of 16 (default: as large as the VMEM budget allows).
    interpret: run in Pallas interpret mode (CPU).
  """
  s, e = w_se.shape
  _, d, f = x_edf.shape
  bs, bd, bf = _blocks(s, e, d, f, x_edf.dtype.itemsize, block_f)
  if block_d is not None:
    bd = common.tpu_block(d, block_d, 16)
  return pl.pallas_call(
      _merge_kernel,
      grid=(common.cdiv(s, bs), common.cdiv(d, bd), common.cdiv(f, bf)),
      in_specs=[
          pl.BlockSpec((bs, e), lambda h, i, j: (h, 0)),
          pl.BlockSpec((e, bd, bf), lambda h, i, j: (0, i, j)),
      ],
      out_specs=pl.BlockSpec((bs, bd, bf), lambda h, i, j: (h, i, j)),
      out_shape=common.out_struct((s, d, f), x_edf.dtype, w_se, x_edf),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
      cost_estimate=pl.CostEstimate(
          flops=2 * s * e * d * f, transcendentals=0,
          bytes_accessed=(e + s) * d * f * x_edf.dtype.itemsize,
      ),
      interpret=interpret,
      name="merge",
  )(w_se, x_edf)


def _weights_grad_kernel(g_ref, x_ref, out_ref, *, d: int, f: int):
  i, j = pl.program_id(1), pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    out_ref[...] = jnp.zeros_like(out_ref)

  def in_bounds(ref):
    shape = ref.shape
    row = i * shape[1] + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    col = j * shape[2] + jax.lax.broadcasted_iota(jnp.int32, shape, 2)
    keep = jnp.logical_and(row < d, col < f)
    return jnp.where(keep, ref[...], jnp.zeros_like(ref)).reshape(shape[0], shape[1] * shape[2])

  g, x = in_bounds(g_ref), in_bounds(x_ref)
  precision = None if g.dtype.itemsize == 2 else jax.lax.Precision.HIGHEST
  out_ref[...] += jax.lax.dot_general(
      g, x, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


def merge_weights_grad(
    g_sdf: jax.Array,
    x_edf: jax.Array,
    *,
    block_f: int = DEFAULT_BLOCK_F,
    block_d: int | None = None,
    interpret: bool = False,
) -> jax.Array:
  """dw[s,e] = sum_{d,f} g[s,d,f] x[e,d,f] on TPU; [S,D,F] x [E,D,F] -> [S,E] float32.

  Args:
    g_sdf: [S,D,F] cotangent of the merged parameters; [S, bd, bf] blocks.
    x_edf: [E,D,F] stacked parameters, same dtype; [E, bd, bf] blocks.
    block_f: bf, a multiple of 128.
    block_d: bd, a multiple of 16 (default: as large as the VMEM budget allows).
    interpret: run in Pallas interpret mode (CPU).
  """
  s, d, f = g_sdf.shape
  e = x_edf.shape[0]
  bs, bd, bf = _blocks(s, e, d, f, x_edf.dtype.itemsize, block_f)
  if block_d is not None:
    bd = common.tpu_block(d, block_d, 16)
  num_d = common.cdiv(d, bd)
  partial_sums = pl.pallas_call(
      functools.partial(_weights_grad_kernel, d=d, f=f),
      grid=(common.cdiv(s, bs), num_d, common.cdiv(f, bf)),
      in_specs=[
          pl.BlockSpec((bs, bd, bf), lambda h, i, j: (h, i, j)),
          pl.BlockSpec((e, bd, bf), lambda h, i, j: (0, i, j)),
      ],
      out_specs=pl.BlockSpec((None, bs, e), lambda h, i, j: (i, h, 0)),
      out_shape=common.out_struct((num_d, s, e), jnp.float32, g_sdf, x_edf),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")
      ),
      cost_estimate=pl.CostEstimate(
          flops=2 * s * e * d * f, transcendentals=0,
          bytes_accessed=(e + s) * d * f * x_edf.dtype.itemsize,
      ),
      interpret=interpret,
      name="merge_weights_grad",
  )(g_sdf, x_edf)
  return jnp.sum(partial_sums, axis=0)


def _fused_vmem_bytes(bs: int, bl: int, bd: int, bf: int, e: int, itemsize: int) -> int:
  """VMEM one merged_matmul step needs: double-buffered blocks, accumulator, temporaries."""
  blocks = 2 * (bs * bl * bd + e * bd * bf + bs * bl * bf) * itemsize
  temps = (bs * bd * bf) * (4 + itemsize) + 2 * bs * bl * bf * 4
  return blocks + temps


def _fused_blocks(dims, preferred, itemsize: int) -> tuple[int, int, int, int]:
  """(bs, bl, bd, bf) for merged_matmul, shrunk from `preferred` until a step fits VMEM.

  Shrinks the expert block (bd, bf) while it dominates, else the token block bl (to 128),
  else the segments per step bs (each halving of bs doubles the experts' HBM reads).
  """
  s, l, d, f, e = dims
  block_s, block_l, block_d, block_f = preferred
  bs = min(s, block_s)
  bl = common.tpu_block(l, block_l, 16)
  bd = common.tpu_block(d, block_d, 128)
  bf = common.tpu_block(f, block_f, 128)
  while _fused_vmem_bytes(bs, bl, bd, bf, e, itemsize) > VMEM_BUDGET:
    experts = 2 * e * bd * bf
    if experts >= bs * bl * (bd + bf) and max(bd, bf) > 128:
      if bd >= bf:
        bd = _halve(bd, 128)
      else:
        bf = _halve(bf, 128)
    elif bl > 128:
      bl = max(128, bl // 2 // 16 * 16)
    elif bs > 1:
      bs //= 2
    elif max(bd, bf) > 128:
      bd, bf = _halve(bd, 128), _halve(bf, 128)
    else:
      break
  return bs, bl, bd, bf


def _merged_matmul_kernel(x_ref, w_ref, e_ref, out_ref, acc_ref, *, d: int):
  bs, bl, bd = x_ref.shape
  num_e, _, bf = e_ref.shape
  d_i = pl.program_id(3)

  @pl.when(d_i == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  merged = weighted_sum(w_ref[...].astype(jnp.float32), e_ref[...].reshape(num_e, bd * bf))
  merged = merged.reshape(bs, bd, bf).astype(x_ref.dtype)
  x = x_ref[...]
  if d % bd:  # the last D block holds garbage past D in both operands
    col = d_i * bd + jax.lax.broadcasted_iota(jnp.int32, x.shape, 2)
    x = jnp.where(col < d, x, jnp.zeros_like(x))
    row = d_i * bd + jax.lax.broadcasted_iota(jnp.int32, merged.shape, 1)
    merged = jnp.where(row < d, merged, jnp.zeros_like(merged))
  acc_ref[...] += jnp.einsum("sld,sdf->slf", x, merged, preferred_element_type=jnp.float32)

  @pl.when(d_i == pl.num_programs(3) - 1)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def merged_matmul(
    x_sld: jax.Array,
    w_se: jax.Array,
    x_edf: jax.Array,
    *,
    block_s: int = 8,
    block_l: int = 256,
    block_d: int = 256,
    block_f: int = 256,
    interpret: bool = False,
) -> jax.Array:
  """y[s] = x[s] @ (sum_e w[s,e] experts[e]) on TPU, merged blocks never leave VMEM.

  Args:
    x_sld: [S,L,D] segment tokens; [bs, bl, bd] blocks.
    w_se: [S,E] float merge weights; [bs, E] blocks, used in float32.
    x_edf: [E,D,F] stacked parameters, same dtype as x_sld; [E, bd, bf] blocks.
    block_s, block_l, block_d, block_f: bs (any), bl and bd (multiples of 16), bf
      (a multiple of 128); each is used whole when the dim is smaller.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    [S,L,F] in x_sld's dtype.
  """
  s, l, d = x_sld.shape
  e, _, f = x_edf.shape
  bs, bl, bd, bf = _fused_blocks(
      (s, l, d, f, e), (block_s, block_l, block_d, block_f), x_sld.dtype.itemsize
  )
  grid = (common.cdiv(s, bs), common.cdiv(l, bl), common.cdiv(f, bf), common.cdiv(d, bd))
  return pl.pallas_call(
      functools.partial(_merged_matmul_kernel, d=d),
      grid=grid,
      in_specs=[
          pl.BlockSpec((bs, bl, bd), lambda si, li, fi, di: (si, li, di)),
          pl.BlockSpec((bs, e), lambda si, li, fi, di: (si, 0)),
          pl.BlockSpec((e, bd, bf), lambda si, li, fi, di: (0, di, fi)),
      ],
      out_specs=pl.BlockSpec((bs, bl, bf), lambda si, li, fi, di: (si, li, fi)),
      out_shape=common.out_struct((s, l, f), x_sld.dtype, x_sld, w_se, x_edf),
      scratch_shapes=[pltpu.VMEM((bs, bl, bf), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
      ),
      cost_estimate=pl.CostEstimate(
          flops=2 * s * l * d * f + 2 * s * e * d * f * grid[1],
          transcendentals=0,
          bytes_accessed=(s * l * (d + f) + grid[0] * grid[1] * e * d * f)
          * x_sld.dtype.itemsize,
      ),
      interpret=interpret,
      name="merged_matmul",
  )(x_sld, w_se, x_edf)
