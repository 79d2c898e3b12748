"""RMSNorm (Zhang & Sennrich 2019): y = x / rms(x) * scale, computed in float32."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.params import ones, param


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, *, axis: int | tuple[int, ...] = -1) -> jax.Array:
  """Normalise `x` to unit RMS over `axis` (in float32) and multiply by `scale`, which has the
  shape of those trailing axes (the last axis by default; (-2, -1) for OLMoE's query/key norm)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale (initialised to 1) over the trailing axes of shape `d`.

  `d` is the embedding width by default; a tuple normalises over several trailing axes jointly
  (e.g. (H, K): every head of a projection together), `axes` names them.
  """

  def __init__(
      self,
      d: int | Sequence[int],
      *,
      eps: float = 1e-5,
      param_dtype: str = "float32",
      axes: Sequence[str | None] = ("embed",),
      rngs: nnx.Rngs,
  ):
    shape = (d,) if isinstance(d, int) else tuple(d)
    self.eps = eps
    self.axis = -1 if len(shape) == 1 else tuple(range(-len(shape), 0))
    self.scale = param(rngs, ones(), shape, axes, param_dtype, elementwise=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps, axis=self.axis)
