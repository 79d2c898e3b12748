"""Public expert-merging ops: input checks, backend dispatch and the VJPs.

merge_experts: merged = weights @ experts over E. Its VJP reuses the kernels: the experts'
cotangent is the same merge with the weights transposed (d_experts = weights.T @ d_merged),
the weights' cotangent is the reduction `merge_weights_grad` (sum over D and F).

merged_matmul: y[s] = x[s] @ merged[s] with the merge fused into the matmul on the forward
pass. The backward pass is unfused: it re-merges (one `merge`), forms d_merged[s] = x[s].T @
dy[s] and dx[s] = dy[s] @ merged[s].T in XLA, then uses the merge VJP kernels. So merged
weights do touch HBM in training, once, on the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels import dispatch
from pallas_kernels.merge import gpu
from pallas_kernels.merge import reference
from pallas_kernels.merge import tpu


def _merge(w_se, x_edf, implementation):
  run = dispatch.select(
      implementation, xla=reference.merge_experts_reference, tpu=tpu.merge, gpu=gpu.merge
  )
  return run(w_se, x_edf)


def _weights_grad_xla(g_sdf, x_edf):
  return jnp.einsum(
      "sdf,edf->se", g_sdf, x_edf,
      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
  )


def _weights_grad(g_sdf, x_edf, implementation):
  run = dispatch.select(
      implementation,
      xla=_weights_grad_xla,
      tpu=tpu.merge_weights_grad,
      gpu=gpu.merge_weights_grad,
  )
  return run(g_sdf, x_edf)


def _merge_vjp(weights_se, experts_edf, d_merged_sdf, implementation):
  """(d_weights [S,E] weights dtype, d_experts [E,D,F] experts dtype)."""
  d_merged_sdf = d_merged_sdf.astype(experts_edf.dtype)
  w_es = weights_se.astype(jnp.float32).T
  d_experts = _merge(w_es, d_merged_sdf, implementation)
  d_weights = _weights_grad(d_merged_sdf, experts_edf, implementation)
  return (
      common.cotangent_like(d_weights.astype(weights_se.dtype), weights_se),
      common.cotangent_like(d_experts, experts_edf),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _merge_experts(weights_se, experts_edf, implementation):
  return _merge(weights_se, experts_edf, implementation)


def _merge_experts_fwd(weights_se, experts_edf, implementation):
  return _merge(weights_se, experts_edf, implementation), (weights_se, experts_edf)


def _merge_experts_bwd(implementation, residuals, d_merged_sdf):
  weights_se, experts_edf = residuals
  return _merge_vjp(weights_se, experts_edf, d_merged_sdf, implementation)


_merge_experts.defvjp(_merge_experts_fwd, _merge_experts_bwd)


def _fused(x_sld, w_se, x_edf, implementation):
  run = dispatch.select(
      implementation,
      xla=reference.merged_matmul_reference,
      tpu=tpu.merged_matmul,
      gpu=gpu.merged_matmul,
  )
  return run(x_sld, w_se, x_edf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _merged_matmul(x_sld, weights_se, experts_edf, implementation):
  return _fused(x_sld, weights_se, experts_edf, implementation)


def _merged_matmul_fwd(x_sld, weights_se, experts_edf, implementation):
  y = _fused(x_sld, weights_se, experts_edf, implementation)
  return y, (x_sld, weights_se, experts_edf)


def _merged_matmul_bwd(implementation, residuals, dy_slf):
  x_sld, weights_se, experts_edf = residuals
  dy_slf = dy_slf.astype(x_sld.dtype)
  merged_sdf = _merge(weights_se, experts_edf, implementation)
  dx = jnp.einsum("slf,sdf->sld", dy_slf, merged_sdf, preferred_element_type=jnp.float32)
  d_merged = jnp.einsum("sld,slf->sdf", x_sld, dy_slf, preferred_element_type=jnp.float32)
  d_weights, d_experts = _merge_vjp(weights_se, experts_edf, d_merged, implementation)
  return common.cotangent_like(dx.astype(x_sld.dtype), x_sld), d_weights, d_experts


_merged_matmul.defvjp(_merged_matmul_fwd, _merged_matmul_bwd)


def _check_weights_experts(weights_se, experts_edf) -> None:
  common.check_rank("weights_se", weights_se, 2, "SE")
  common.check_rank("experts_edf", experts_edf, 3, "EDF")
  common.check_float("weights_se", weights_se)
  common.check_float("experts_edf", experts_edf)
  if weights_se.shape[1] != experts_edf.shape[0]:
    raise ValueError(
        f"weights_se [S,E]={weights_se.shape} and experts_edf [E,D,F]={experts_edf.shape}"
        " disagree on E"
    )


def merge_experts(
    weights_se: jax.Array,
    experts_edf: jax.Array,
    *,
    implementation: dispatch.Implementation = None,
) -> jax.Array:
  """Merge stacked experts per segment: einsum("se,edf->sdf") with float32 accumulation.

  Differentiable w.r.t. both operands.

  Args:
    weights_se: [S,E] float merge weights (used in float32).
    experts_edf: [E,D,F] float32/bfloat16 stacked expert parameters.
    implementation: None (auto), "xla", "pallas", "pallas_tpu" or "pallas_gpu";
      see `pallas_kernels.dispatch`.

  Returns:
    [S,D,F] in the experts' dtype.

  Raises:
    ValueError: bad shapes or dtypes.
  """
  dispatch.check_implementation(implementation)
  _check_weights_experts(weights_se, experts_edf)
  return _merge_experts(weights_se, experts_edf, implementation)


def merged_matmul(
    x_sld: jax.Array,
    weights_se: jax.Array,
    experts_edf: jax.Array,
    *,
    implementation: dispatch.Implementation = None,
) -> jax.Array:
  """y[s] = x[s] @ merge_experts(weights, experts)[s], the merge fused into the matmul.

  On the forward pass the merged [D,F] parameters of a segment are built block by block in
  VMEM/registers and consumed at once, never written to HBM. Differentiable w.r.t. all three
  operands (the backward pass is unfused, see the module docstring).

  Args:
    x_sld: [S,L,D] tokens of each segment, float32/bfloat16.
    weights_se: [S,E] float merge weights (used in float32).
    experts_edf: [E,D,F] stacked expert parameters, same dtype as x_sld.
    implementation: None (auto), "xla", "pallas", "pallas_tpu" or "pallas_gpu".

  Returns:
    [S,L,F] in x_sld's dtype (float32 accumulation; the merged parameters are rounded to
    the experts' dtype before the matmul, as if materialised).

  Raises:
    ValueError: bad shapes or dtypes.
  """
  dispatch.check_implementation(implementation)
  _check_weights_experts(weights_se, experts_edf)
  common.check_rank("x_sld", x_sld, 3, "SLD")
  common.check_float("x_sld", x_sld)
  if x_sld.shape[0] != weights_se.shape[0] or x_sld.shape[2] != experts_edf.shape[1]:
    raise ValueError(
        f"x_sld [S,L,D]={x_sld.shape}, weights_se [S,E]={weights_se.shape} and experts_edf"
        f" [E,D,F]={experts_edf.shape} disagree on S or D"
    )
  if x_sld.dtype != experts_edf.dtype:
    raise ValueError(
        f"x_sld and experts_edf must have the same dtype; got {x_sld.dtype} and"
        f" {experts_edf.dtype}"
    )
  return _merged_matmul(x_sld, weights_se, experts_edf, implementation)
