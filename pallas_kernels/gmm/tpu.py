"""Grouped matmul (gmm) and its weight gradient (tgmm) as Mosaic TPU kernels.

These follow jax's megablox kernels (`jax.experimental.pallas.ops.tpu.megablox.gmm`) and reuse
its `make_group_metadata`, which lists the (group, row tile) pairs to visit: a row tile that
straddles a group boundary is visited once per group, each visit masking its store to the
group's rows. The kernels differ from megablox where jaxlm needs it:

* they run inside `shard_map(check_vma=True)` (outputs declare the mesh axes they vary over);
* gmm zeroes the rows past sum(group_sizes) itself: a phantom group E covers them and its
  tiles store zeros, so no extra pass over the [M,N] output is needed;
* M need not be a multiple of the row tile (edge tiles are partial, stores are masked).

Tiling (tm, tk, tn): gmm steps over grid (N tiles, visited row tiles, K tiles) with a
[tm, tn] float32 accumulator in VMEM; tgmm over (N tiles, K tiles, visited row tiles) with a
[tk, tn] accumulator. The visited-tile count depends on the group sizes, so the middle (gmm)
or last (tgmm) grid dim is dynamic.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.megablox.gmm import make_group_metadata

from pallas_kernels import common

DEFAULT_TILING = (256, 512, 512)


def _tiles(m: int, k: int, n: int, dtype: Any, tiling: tuple[int, int, int]):
  """(tm, tk, tn) legal for Mosaic at this problem size."""
  tm, tk, tn = tiling
  sub = common.sublane_multiple(dtype)
  tm = min(tm, common.round_up(m, sub))
  return tm, common.tpu_block(k, tk, 128), common.tpu_block(n, tn, 128)


def _zero_k_tail(x: jax.Array, k_i: jax.Array, tk: int, k: int, axis: int) -> jax.Array:
  """Zero the entries of a K block that lie past K (they hold garbage in the edge block)."""
  if k % tk == 0:
    return x
  idx = k_i * tk + jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  return jnp.where(idx < k, x, jnp.zeros_like(x))


def _gmm_kernel(
    metadata, lhs_ref, rhs_ref, out_ref, acc_ref,
    *, num_groups: int, k: int, tm: int, tk: int, transpose_rhs: bool,
):
  group_offsets, group_ids, m_tile_ids = metadata
  grid_id, k_i = pl.program_id(1), pl.program_id(2)
  group = group_ids[grid_id]

  @pl.when(k_i == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(group < num_groups)  # the phantom group past the last row accumulates nothing
  def _accumulate():
    lhs = _zero_k_tail(lhs_ref[...], k_i, tk, k, axis=1)
    rhs = _zero_k_tail(rhs_ref[...], k_i, tk, k, axis=1 if transpose_rhs else 0)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)

  @pl.when(k_i == pl.num_programs(2) - 1)
  def _store():
    row = m_tile_ids[grid_id] * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
    mine = jnp.logical_and(row >= group_offsets[group], row < group_offsets[group + 1])
    out_ref[...] = jnp.where(
        mine, acc_ref[...], out_ref[...].astype(jnp.float32)
    ).astype(out_ref.dtype)


def gmm(
    x_mk: jax.Array,
    w_ekn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    out_dtype: Any,
    transpose_rhs: bool = False,
    tiling: tuple[int, int, int] = DEFAULT_TILING,
    interpret: bool = False,
) -> jax.Array:
  """y[m] = x[m] @ w[group of m] on TPU; rows past sum(group_sizes) are zero.

  Args:
    x_mk: [M,K] rows sorted by group; tiled [tm, tk].
    w_ekn: [E,K,N] (or [E,N,K] with transpose_rhs); tiled [tk, tn] ([tn, tk]).
    group_sizes_e: [E] int32, non-negative, sum <= M.
    out_dtype: dtype of the result (accumulation is float32).
    transpose_rhs: contract with w's last dim (used for the gradient w.r.t. x).
    tiling: (tm, tk, tn); tm a multiple of 16, tk and tn multiples of 128.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    [M,N] out_dtype.
  """
  m, k = x_mk.shape
  num_groups = w_ekn.shape[0]
  n = w_ekn.shape[1] if transpose_rhs else w_ekn.shape[2]
  tm, tk, tn = _tiles(m, k, n, x_mk.dtype, tiling)
  m_pad = common.round_up(m, tm)
  # Group E (phantom) covers [sum(group_sizes), m_pad): its tiles store zeros.
  sizes = jnp.concatenate([group_sizes_e, (m_pad - jnp.sum(group_sizes_e))[None]])
  metadata, num_active_tiles = make_group_metadata(
      group_sizes=sizes.astype(jnp.int32),
      m=m_pad,
      tm=tm,
      start_group=jnp.int32(0),
      num_nonzero_groups=num_groups + 1,
      visit_empty_groups=False,
  )
  last = num_groups - 1

  def lhs_map(n_i, grid_id, k_i, metadata):
    _, group_ids, m_tile_ids = metadata
    # Phantom tiles keep one block index so Pallas fetches it once, not once per K step.
    return m_tile_ids[grid_id], jnp.where(group_ids[grid_id] > last, 0, k_i)

  def rhs_map(n_i, grid_id, k_i, metadata):
    _, group_ids, _ = metadata
    group = group_ids[grid_id]
    k_i = jnp.where(group > last, 0, k_i)
    group = jnp.minimum(group, last)
    return (group, n_i, k_i) if transpose_rhs else (group, k_i, n_i)

  def out_map(n_i, grid_id, k_i, metadata):
    _, _, m_tile_ids = metadata
    return m_tile_ids[grid_id], n_i

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  kernel = functools.partial(
      _gmm_kernel, num_groups=num_groups, k=k, tm=tm, tk=tk, transpose_rhs=transpose_rhs
  )
  return pl.pallas_call(
      kernel,
      out_shape=common.out_struct((m, n), out_dtype, x_mk, w_ekn, group_sizes_e),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(common.cdiv(n, tn), num_active_tiles, common.cdiv(k, tk)),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")
      ),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n,
          transcendentals=0,
          bytes_accessed=(m * k + num_groups * k * n) * x_mk.dtype.itemsize
          + m * n * jnp.dtype(out_dtype).itemsize,
      ),
      interpret=interpret,
      name="gmm",
  )(metadata, x_mk, w_ekn)


def _tgmm_kernel(metadata, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm: int):
  group_offsets, group_ids, m_tile_ids = metadata
  grid_id = pl.program_id(2)
  group = group_ids[grid_id]
  prev = group_ids[jnp.maximum(grid_id - 1, 0)]
  nxt = group_ids[jnp.minimum(grid_id + 1, pl.num_programs(2) - 1)]
  start, end = group_offsets[group], group_offsets[group + 1]

  @pl.when(jnp.logical_or(grid_id == 0, prev != group))
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(end > start)
  def _accumulate():
    row0 = m_tile_ids[grid_id] * tm

    def rows_of_group(ref):
      row = row0 + jax.lax.broadcasted_iota(jnp.int32, ref.shape, 0)
      keep = jnp.logical_and(row >= start, row < end)
      return jnp.where(keep, ref[...], jnp.zeros_like(ref))

    lhs = rows_of_group(lhs_ref).swapaxes(0, 1)
    acc_ref[...] += jnp.dot(lhs, rows_of_group(rhs_ref), preferred_element_type=jnp.float32)

  @pl.when(jnp.logical_or(grid_id == pl.num_programs(2) - 1, nxt != group))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(
    x_mk: jax.Array,
    dy_mn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    out_dtype: Any,
    tiling: tuple[int, int, int] = DEFAULT_TILING,
    interpret: bool = False,
) -> jax.Array:
  """g[e] = x[rows of e].T @ dy[rows of e] on TPU; empty groups give zeros.

  Args:
    x_mk: [M,K] rows sorted by group; tiled [tm, tk].
    dy_mn: [M,N]; tiled [tm, tn].
    group_sizes_e: [E] int32, non-negative, sum <= M.
    out_dtype: dtype of the result (accumulation is float32).
    tiling: (tm, tk, tn); tm a multiple of 16, tk and tn multiples of 128.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    [E,K,N] out_dtype.
  """
  m, k = x_mk.shape
  n = dy_mn.shape[1]
  num_groups = group_sizes_e.shape[0]
  tm, tk, tn = _tiles(m, k, n, x_mk.dtype, tiling)
  metadata, num_active_tiles = make_group_metadata(
      group_sizes=group_sizes_e,
      m=common.round_up(m, tm),
      tm=tm,
      start_group=jnp.int32(0),
      num_nonzero_groups=num_groups,
      visit_empty_groups=True,
  )

  def lhs_map(n_i, k_i, grid_id, metadata):
    return metadata[2][grid_id], k_i

  def rhs_map(n_i, k_i, grid_id, metadata):
    return metadata[2][grid_id], n_i

  def out_map(n_i, k_i, grid_id, metadata):
    return metadata[1][grid_id], k_i, n_i

  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm),
      out_shape=common.out_struct((num_groups, k, n), out_dtype, x_mk, dy_mn, group_sizes_e),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(common.cdiv(n, tn), common.cdiv(k, tk), num_active_tiles),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), rhs_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")
      ),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n,
          transcendentals=0,
          bytes_accessed=(m * k + m * n) * x_mk.dtype.itemsize
          + num_groups * k * n * jnp.dtype(out_dtype).itemsize,
      ),
      interpret=interpret,
      name="tgmm",
  )(metadata, x_mk, dy_mn)
