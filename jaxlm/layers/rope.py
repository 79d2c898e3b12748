"""Rotary position embeddings (Su et al. 2021, RoFormer), rotate-half convention as in Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x_blhk: jax.Array, positions_bl: jax.Array, theta: float) -> jax.Array:
  """Rotate pairs (x[..., i], x[..., i + K/2]) of each head by angle position * theta^(-2i/K).

  x_blhk: [B, L, H, K] queries or keys; positions_bl: [B, L] integer positions (restart at 0
  for each packed document, so relative offsets never cross documents). Angles are computed in
  float32; the result has x's dtype.
  """
  k = x_blhk.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)  # [K/2]
  angles = positions_bl.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, L, 1, K/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x_blhk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_blhk.dtype)
