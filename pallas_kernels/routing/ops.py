"""Public top-k routing op: input checks, backend dispatch and the VJP.

The forward pass is the reference (XLA) or one fused kernel (`tpu.py`, `gpu.py`). The
backward pass is shared by all of them: the ids are piecewise constant, so the cotangent of
the logits is the VJP of `reference.weights_from_ids` with the ids held fixed (a few
elementwise ops on [T,E] in XLA); `bias_e` only steers selection and gets a zero cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels import dispatch
from pallas_kernels.routing import gpu
from pallas_kernels.routing import reference
from pallas_kernels.routing import tpu
from pallas_kernels.routing.reference import Routing
from pallas_kernels.routing.reference import RoutingMode


def _forward(logits_te, bias_e, *, k, mode, renormalize, implementation) -> Routing:
  def xla(logits_te, bias_e):
    return reference.topk_route_reference(
        logits_te, k, mode=mode, renormalize=renormalize, bias_e=bias_e
    )

  kernel_args = dict(k=k, mode=mode, renormalize=renormalize)
  run = dispatch.select(
      implementation,
      xla=xla,
      tpu=functools.partial(tpu.topk_route, **kernel_args),
      gpu=functools.partial(gpu.topk_route, **kernel_args),
  )
  return run(logits_te, bias_e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _route(logits_te, bias_e, k, mode, renormalize, implementation) -> Routing:
  return _forward(
      logits_te, bias_e, k=k, mode=mode, renormalize=renormalize, implementation=implementation
  )


def _route_fwd(logits_te, bias_e, k, mode, renormalize, implementation):
  out = _forward(
      logits_te, bias_e, k=k, mode=mode, renormalize=renormalize, implementation=implementation
  )
  return out, (logits_te, bias_e, out.expert_ids)


def _route_bwd(k, mode, renormalize, implementation, residuals, cotangent: Routing):
  del k, implementation
  logits_te, bias_e, expert_ids = residuals
  _, vjp = jax.vjp(
      lambda x: reference.weights_from_ids(x, expert_ids, mode, renormalize), logits_te
  )
  (d_logits,) = vjp(cotangent.weights.astype(jnp.float32))
  d_logits = common.cotangent_like(d_logits.astype(logits_te.dtype), logits_te)
  return d_logits, jnp.zeros_like(bias_e)


_route.defvjp(_route_fwd, _route_bwd)


def topk_route(
    logits_te: jax.Array,
    k: int,
    *,
    mode: RoutingMode = "softmax_topk",
    renormalize: bool = True,
    bias_e: jax.Array | None = None,
    implementation: dispatch.Implementation = None,
) -> Routing:
  """Top-k routing with the dispatch order, in one fused pass where a kernel exists.

  Differentiable w.r.t. `logits_te` through `weights` (the ids carry no gradient).

  Args:
    logits_te: [T,E] router logits, float32/bfloat16/float16. Math is float32.
    k: experts per token, 1 <= k <= E.
    mode: "softmax_topk" (softmax over E, then top-k), "topk_softmax" (top-k, then softmax
      over the k), or "sigmoid" (sigmoid scores, selection by score + bias_e);
      see `reference` for the exact semantics.
    renormalize: divide the k weights by their sum ("softmax_topk" and "sigmoid").
    bias_e: [E] float selection bias, "sigmoid" mode only.
    implementation: None (auto), "xla", "pallas", "pallas_tpu" or "pallas_gpu";
      see `pallas_kernels.dispatch`.

  Returns:
    `Routing(expert_ids [T,k] int32, weights [T,k] float32, group_sizes [E] int32,
    sort_perm [T*k] int32)`.

  Raises:
    ValueError: bad shapes or dtypes, k outside [1, E], an unknown mode or implementation,
      or a bias outside "sigmoid" mode.
  """
  dispatch.check_implementation(implementation)
  common.check_rank("logits_te", logits_te, 2, "TE")
  common.check_float("logits_te", logits_te)
  num_experts = logits_te.shape[1]
  if mode not in reference.MODES:
    raise ValueError(f"mode must be one of {reference.MODES}; got {mode!r}")
  if not isinstance(k, int) or not 1 <= k <= num_experts:
    raise ValueError(f"k must be an int in [1, E={num_experts}]; got {k!r}")
  if bias_e is not None:
    if mode != "sigmoid":
      raise ValueError(f"bias_e is only used in 'sigmoid' mode; got mode={mode!r}")
    common.check_float("bias_e", bias_e)
    if jnp.shape(bias_e) != (num_experts,):
      raise ValueError(f"bias_e must have shape [E]=[{num_experts}]; got {jnp.shape(bias_e)}")
  else:
    bias_e = jnp.zeros((num_experts,), jnp.float32)
  return _route(logits_te, bias_e, k, mode, bool(renormalize), implementation)
