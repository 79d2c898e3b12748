"""RMSNorm (Zhang & Sennrich 2019): y = x / rms(x) * scale, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.params import ones, param


def rms_norm(x: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
  """Normalise the last axis of `x` to unit RMS (in float32) and multiply by `scale_d`."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale_d.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the embedding axis with a learned scale (initialised to 1)."""

  def __init__(self, d: int, *, eps: float = 1e-5, param_dtype: str = "float32", rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, ones(), (d,), ("embed",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)
