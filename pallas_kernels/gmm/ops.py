"""Public grouped-matmul ops: input checks, backend dispatch and the VJPs.

Implementations of the same two primitives, gmm ([M,K] x [E,K,N] -> [M,N]) and tgmm
([M,K] x [M,N] -> [E,K,N]):

* "xla": `jax.lax.ragged_dot` / `jax.lax.ragged_dot_general` (on CPU XLA expands these to a
  dense padded matmul, E times the useful FLOPs);
* Mosaic TPU (`tpu.py`, megablox-style) and Triton (`gpu.py`) kernels.

The VJPs are written once in terms of the primitives, so every implementation differentiates
through its own kernels: for y = gmm(x, w), dx = gmm(dy, w^T) and dw = tgmm(x, dy); for
g = tgmm(x, dy), dx = gmm(dy, dg^T) and d(dy) = gmm(x, dg).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels import dispatch
from pallas_kernels.gmm import gpu
from pallas_kernels.gmm import tpu

_RAGGED_ROWS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [1]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
_RAGGED_ROWS_RHS_T = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
_RAGGED_CONTRACTION = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def _gmm(x_mk, w, group_sizes_e, *, out_dtype, transpose_rhs, implementation):
  """The gmm primitive under `implementation` (w is [E,K,N], or [E,N,K] if transpose_rhs)."""

  def xla(x_mk, w, group_sizes_e):
    dims = _RAGGED_ROWS_RHS_T if transpose_rhs else _RAGGED_ROWS
    return jax.lax.ragged_dot_general(
        x_mk, w, group_sizes_e, dims, preferred_element_type=out_dtype
    )

  kernel_args = dict(out_dtype=out_dtype, transpose_rhs=transpose_rhs)
  run = dispatch.select(
      implementation,
      xla=xla,
      tpu=functools.partial(tpu.gmm, **kernel_args),
      gpu=functools.partial(gpu.gmm, **kernel_args),
  )
  return run(x_mk, w, group_sizes_e)


def _tgmm(x_mk, dy_mn, group_sizes_e, *, out_dtype, implementation):
  """The tgmm primitive under `implementation`."""

  def xla(x_mk, dy_mn, group_sizes_e):
    return jax.lax.ragged_dot_general(
        x_mk, dy_mn, group_sizes_e, _RAGGED_CONTRACTION, preferred_element_type=out_dtype
    )

  run = dispatch.select(
      implementation,
      xla=xla,
      tpu=functools.partial(tpu.tgmm, out_dtype=out_dtype),
      gpu=functools.partial(gpu.tgmm, out_dtype=out_dtype),
  )
  return run(x_mk, dy_mn, group_sizes_e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(x_mk, w_ekn, group_sizes_e, out_dtype, implementation):
  return _gmm(
      x_mk, w_ekn, group_sizes_e,
      out_dtype=out_dtype, transpose_rhs=False, implementation=implementation,
  )


def _grouped_matmul_fwd(x_mk, w_ekn, group_sizes_e, out_dtype, implementation):
  y = _grouped_matmul(x_mk, w_ekn, group_sizes_e, out_dtype, implementation)
  return y, (x_mk, w_ekn, group_sizes_e)


def _grouped_matmul_bwd(out_dtype, implementation, residuals, dy_mn):
  del out_dtype
  x_mk, w_ekn, group_sizes_e = residuals
  dy_mn = dy_mn.astype(x_mk.dtype)
  dx = _gmm(
      dy_mn, w_ekn, group_sizes_e,
      out_dtype=x_mk.dtype, transpose_rhs=True, implementation=implementation,
  )
  dw = _tgmm(x_mk, dy_mn, group_sizes_e, out_dtype=w_ekn.dtype, implementation=implementation)
  return common.cotangent_like(dx, x_mk), common.cotangent_like(dw, w_ekn), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _transposed_grouped_matmul(x_mk, dy_mn, group_sizes_e, out_dtype, implementation):
  return _tgmm(x_mk, dy_mn, group_sizes_e, out_dtype=out_dtype, implementation=implementation)


def _transposed_grouped_matmul_fwd(x_mk, dy_mn, group_sizes_e, out_dtype, implementation):
  g = _transposed_grouped_matmul(x_mk, dy_mn, group_sizes_e, out_dtype, implementation)
  return g, (x_mk, dy_mn, group_sizes_e)


def _transposed_grouped_matmul_bwd(out_dtype, implementation, residuals, dg_ekn):
  del out_dtype
  x_mk, dy_mn, group_sizes_e = residuals
  dg_ekn = dg_ekn.astype(x_mk.dtype)
  dx = _gmm(
      dy_mn, dg_ekn, group_sizes_e,
      out_dtype=x_mk.dtype, transpose_rhs=True, implementation=implementation,
  )
  ddy = _gmm(
      x_mk, dg_ekn, group_sizes_e,
      out_dtype=dy_mn.dtype, transpose_rhs=False, implementation=implementation,
  )
  return common.cotangent_like(dx, x_mk), common.cotangent_like(ddy, dy_mn), None


_transposed_grouped_matmul.defvjp(_transposed_grouped_matmul_fwd, _transposed_grouped_matmul_bwd)


def _check_operands(name_b: str, x_mk, b, group_sizes_e, num_groups: int, preferred_element_type):
  common.check_float("x_mk", x_mk)
  common.check_float(name_b, b)
  if x_mk.dtype != b.dtype:
    raise ValueError(f"x_mk and {name_b} must have the same dtype; got {x_mk.dtype} and {b.dtype}")
  out_dtype = jnp.dtype(preferred_element_type or x_mk.dtype)
  if not jnp.issubdtype(out_dtype, jnp.floating):
    raise ValueError(f"preferred_element_type must be a float dtype; got {out_dtype}")
  sizes = common.check_group_sizes(group_sizes_e, num_groups, x_mk.shape[0])
  return common.clip_group_sizes(sizes, x_mk.shape[0]), out_dtype


def grouped_matmul(
    x_mk: jax.Array,
    w_ekn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    implementation: dispatch.Implementation = None,
    preferred_element_type: Any = None,
) -> jax.Array:
  """Grouped matmul: y[m] = x[m] @ w[e] for the rows m of group e; [M,K] x [E,K,N] -> [M,N].

  Rows are grouped consecutively: group e is rows [sum(gs[:e]), sum(gs[:e+1])). Rows past
  sum(group_sizes) are zero. Differentiable w.r.t. x and w (not the group sizes).

  Args:
    x_mk: [M,K] float32/bfloat16, rows sorted by group.
    w_ekn: [E,K,N], same dtype as x.
    group_sizes_e: [E] integer, non-negative, sum <= M. Checked when concrete; traced sizes
      that overflow M are truncated at M.
    implementation: None (auto), "xla" (`jax.lax.ragged_dot`), "pallas", "pallas_tpu" or
      "pallas_gpu"; see `pallas_kernels.dispatch`.
    preferred_element_type: output dtype (default: x's); accumulation is always float32.

  Returns:
    [M,N] in preferred_element_type.

  Raises:
    ValueError: bad shapes or dtypes, negative group sizes or sizes summing past M.
  """
  dispatch.check_implementation(implementation)
  common.check_rank("x_mk", x_mk, 2, "MK")
  common.check_rank("w_ekn", w_ekn, 3, "EKN")
  if x_mk.shape[1] != w_ekn.shape[1]:
    raise ValueError(
        f"x_mk [M,K]={x_mk.shape} and w_ekn [E,K,N]={w_ekn.shape} disagree on K"
    )
  sizes, out_dtype = _check_operands(
      "w_ekn", x_mk, w_ekn, group_sizes_e, w_ekn.shape[0], preferred_element_type
  )
  return _grouped_matmul(x_mk, w_ekn, sizes, out_dtype, implementation)


def transposed_grouped_matmul(
    x_mk: jax.Array,
    dy_mn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    implementation: dispatch.Implementation = None,
    preferred_element_type: Any = None,
) -> jax.Array:
  """Per-group x.T @ dy (tgmm, the weight gradient of gmm); [M,K] x [M,N] -> [E,K,N].

  g[e] = x[rows of e].T @ dy[rows of e]; empty groups give zeros; rows past sum(group_sizes)
  are ignored. Differentiable w.r.t. x and dy.

  Args:
    x_mk: [M,K] float32/bfloat16, rows sorted by group.
    dy_mn: [M,N], same dtype as x.
    group_sizes_e: [E] integer, non-negative, sum <= M (checked when concrete).
    implementation: None (auto), "xla" (`jax.lax.ragged_dot_general`), "pallas",
      "pallas_tpu" or "pallas_gpu".
    preferred_element_type: output dtype (default: x's); accumulation is always float32.

  Returns:
    [E,K,N] in preferred_element_type.

  Raises:
    ValueError: bad shapes or dtypes, negative group sizes or sizes summing past M.
  """
  dispatch.check_implementation(implementation)
  common.check_rank("x_mk", x_mk, 2, "MK")
  common.check_rank("dy_mn", dy_mn, 2, "MN")
  if x_mk.shape[0] != dy_mn.shape[0]:
    raise ValueError(f"x_mk [M,K]={x_mk.shape} and dy_mn [M,N]={dy_mn.shape} disagree on M")
  common.check_rank("group_sizes_e", group_sizes_e, 1, "E")
  sizes, out_dtype = _check_operands(
      "dy_mn", x_mk, dy_mn, group_sizes_e, jnp.shape(group_sizes_e)[0], preferred_element_type
  )
  return _transposed_grouped_matmul(x_mk, dy_mn, sizes, out_dtype, implementation)
