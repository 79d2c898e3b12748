"""Grouped matmul (gmm) and its weight gradient (tgmm) as Triton kernels.

gmm: one program per [tm, tn] output tile, grid (M tiles, N tiles). A program loops over the
groups whose rows overlap its row tile (usually one or two; `_tile_groups` computes the range
in XLA), and for each runs a K loop of `tl.dot`s on the rows of that group (other rows loaded
as zeros), accumulating in a float32 [tm, tn] register tile. Rows in no group end up zero. The
extra work over a dense matmul is one K loop per group boundary inside a row tile.

tgmm: one program per (group, K tile, N tile), grid (E, K tiles, N tiles). A program walks
its group's rows in chunks of tm (the group may start at any row: loads are unaligned and
masked) and accumulates x_chunk.T @ dy_chunk; an empty group stores zeros.

All tiles are powers of two; every load and store is masked at the array edges. float32
operands use the backend's default matmul precision (TF32 on recent NVIDIA GPUs), as XLA does.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

DEFAULT_TILING = (64, 64, 128)


def _tile_groups(ends_e: jax.Array, num_rows: int, tm: int) -> tuple[jax.Array, jax.Array]:
  """Per row tile, the half-open range [lo, hi) of groups whose rows overlap it."""
  starts_e = ends_e - jnp.diff(ends_e, prepend=0)
  tile_start = jnp.arange(common.cdiv(num_rows, tm), dtype=jnp.int32) * tm
  lo = jnp.searchsorted(ends_e, tile_start, side="right").astype(jnp.int32)
  hi = jnp.searchsorted(starts_e, tile_start + tm, side="left").astype(jnp.int32)
  return lo, hi


def _gmm_kernel(
    ends_ref, lo_ref, hi_ref, x_ref, w_ref, y_ref,
    *, tm: int, tk: int, tn: int, transpose_rhs: bool,
):
  m, k = x_ref.shape
  n = y_ref.shape[1]
  i, j = pl.program_id(0), pl.program_id(1)
  rows = i * tm + jnp.arange(tm, dtype=jnp.int32)
  cols = j * tn + jnp.arange(tn, dtype=jnp.int32)
  col_ok = cols < n

  def one_group(g, acc):
    end = ends_ref[g]
    start = jnp.where(g > 0, ends_ref[jnp.maximum(g - 1, 0)], 0)
    in_group = jnp.logical_and(rows >= start, rows < end)

    def k_step(kb, acc):
      ks = kb * tk + jnp.arange(tk, dtype=jnp.int32)
      k_ok = ks < k
      x = plgpu.load(
          x_ref.at[pl.ds(i * tm, tm), pl.ds(kb * tk, tk)],
          mask=jnp.logical_and(in_group[:, None], k_ok[None, :]),
          other=0.0,
      )
      if transpose_rhs:
        w = plgpu.load(
            w_ref.at[g, pl.ds(j * tn, tn), pl.ds(kb * tk, tk)],
            mask=jnp.logical_and(col_ok[:, None], k_ok[None, :]),
            other=0.0,
        ).T
      else:
        w = plgpu.load(
            w_ref.at[g, pl.ds(kb * tk, tk), pl.ds(j * tn, tn)],
            mask=jnp.logical_and(k_ok[:, None], col_ok[None, :]),
            other=0.0,
        )
      return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    return jax.lax.cond(
        end > start,
        lambda acc: jax.lax.fori_loop(0, common.cdiv(k, tk), k_step, acc),
        lambda acc: acc,
        acc,
    )

  acc = jax.lax.fori_loop(lo_ref[i], hi_ref[i], one_group, jnp.zeros((tm, tn), jnp.float32))
  plgpu.store(
      y_ref.at[pl.ds(i * tm, tm), pl.ds(j * tn, tn)],
      acc.astype(y_ref.dtype),
      mask=jnp.logical_and((rows < m)[:, None], col_ok[None, :]),
  )


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
  """y[m] = x[m] @ w[group of m] on GPU; rows past sum(group_sizes) are zero.

  Args:
    x_mk: [M,K] rows sorted by group; loaded in [tm, tk] tiles.
    w_ekn: [E,K,N] (or [E,N,K] with transpose_rhs); loaded in [tk, tn] ([tn, tk]) tiles.
    group_sizes_e: [E] int32, non-negative, sum <= M.
    out_dtype: dtype of the result (accumulation is float32).
    transpose_rhs: contract with w's last dim (used for the gradient w.r.t. x).
    tiling: (tm, tk, tn), powers of two >= 16.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    [M,N] out_dtype.
  """
  m, k = x_mk.shape
  n = w_ekn.shape[1] if transpose_rhs else w_ekn.shape[2]
  tm, tk, tn = (common.triton_block(d, t) for d, t in zip((m, k, n), tiling))
  ends = jnp.cumsum(group_sizes_e, dtype=jnp.int32)
  lo, hi = _tile_groups(ends, m, tm)
  kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid=(common.cdiv(m, tm), common.cdiv(n, tn)),
      out_shape=common.out_struct((m, n), out_dtype, x_mk, w_ekn, group_sizes_e),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name="gmm",
  )(ends, lo, hi, x_mk, w_ekn)


def _tgmm_kernel(ends_ref, x_ref, dy_ref, out_ref, *, tm: int, tk: int, tn: int):
  k = x_ref.shape[1]
  n = dy_ref.shape[1]
  g, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  end = ends_ref[g]
  start = jnp.where(g > 0, ends_ref[jnp.maximum(g - 1, 0)], 0)
  ks = kt * tk + jnp.arange(tk, dtype=jnp.int32)
  ns = nt * tn + jnp.arange(tn, dtype=jnp.int32)
  k_ok, n_ok = ks < k, ns < n

  def chunk(c, acc):
    row0 = start + c * tm
    row_ok = (row0 + jnp.arange(tm, dtype=jnp.int32) < end)[:, None]
    x = plgpu.load(
        x_ref.at[pl.ds(row0, tm), pl.ds(kt * tk, tk)],
        mask=jnp.logical_and(row_ok, k_ok[None, :]),
        other=0.0,
    )
    dy = plgpu.load(
        dy_ref.at[pl.ds(row0, tm), pl.ds(nt * tn, tn)],
        mask=jnp.logical_and(row_ok, n_ok[None, :]),
        other=0.0,
    )
    return acc + jnp.dot(x.T, dy, preferred_element_type=jnp.float32)

  num_chunks = (end - start + tm - 1) // tm
  acc = jax.lax.fori_loop(0, num_chunks, chunk, jnp.zeros((tk, tn), jnp.float32))
  plgpu.store(
      out_ref.at[g, pl.ds(kt * tk, tk), pl.ds(nt * tn, tn)],
      acc.astype(out_ref.dtype),
      mask=jnp.logical_and(k_ok[:, None], n_ok[None, :]),
  )


def tgmm(
    x_mk: jax.Array,
    dy_mn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    out_dtype: Any,
    tiling: tuple[int, int, int] = DEFAULT_TILING,
    interpret: bool = False,
) -> jax.Array:
  """g[e] = x[rows of e].T @ dy[rows of e] on GPU; empty groups give zeros.

  Args:
    x_mk: [M,K] rows sorted by group; loaded in [tm, tk] tiles.
    dy_mn: [M,N]; loaded in [tm, tn] tiles.
    group_sizes_e: [E] int32, non-negative, sum <= M.
    out_dtype: dtype of the result (accumulation is float32).
    tiling: (tm, tk, tn), powers of two >= 16.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    [E,K,N] out_dtype.
  """
  m, k = x_mk.shape
  n = dy_mn.shape[1]
  num_groups = group_sizes_e.shape[0]
  tm, tk, tn = (common.triton_block(d, t) for d, t in zip((m, k, n), tiling))
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
      grid=(num_groups, common.cdiv(k, tk), common.cdiv(n, tn)),
      out_shape=common.out_struct((num_groups, k, n), out_dtype, x_mk, dy_mn, group_sizes_e),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name="tgmm",
  )(jnp.cumsum(group_sizes_e, dtype=jnp.int32), x_mk, dy_mn)
