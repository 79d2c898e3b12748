"""Rotary position embeddings (Su et al. 2021, RoFormer), rotate-half convention as in Llama.

Long-context variants rescale the inverse frequencies: one registered transform per
`RopeScalingConfig.kind`, `(inv_freq [K/2], cfg) -> inv_freq [K/2]`, all in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlm.config import RopeScalingConfig
from jaxlm.registry import Registry

ROPE_SCALING: Registry = Registry("rope scaling")


@ROPE_SCALING.register("none")
def _no_scaling(inv_freq: jax.Array, cfg: RopeScalingConfig) -> jax.Array:
  return inv_freq


@ROPE_SCALING.register("linear")
def _linear(inv_freq: jax.Array, cfg: RopeScalingConfig) -> jax.Array:
  """Position interpolation (Chen et al. 2023): positions / factor, i.e. every frequency / factor."""
  return inv_freq / cfg.factor


@ROPE_SCALING.register("llama3")
def _llama3(inv_freq: jax.Array, cfg: RopeScalingConfig) -> jax.Array:
  """Llama 3.1 (Meta 2024): wavelengths shorter than original_max_len / high_freq_factor are kept,
  longer than original_max_len / low_freq_factor divided by factor, and in between interpolated
  linearly in original_max_len / wavelength (as transformers' `_compute_llama3_parameters`)."""
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = cfg.original_max_len / cfg.low_freq_factor
  high_freq_wavelen = cfg.original_max_len / cfg.high_freq_factor
  smooth = (cfg.original_max_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
  interpolated = (1 - smooth) * inv_freq / cfg.factor + smooth * inv_freq
  out = jnp.where(wavelen > low_freq_wavelen, inv_freq / cfg.factor, inv_freq)
  return jnp.where((wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen), interpolated, out)


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig = RopeScalingConfig()) -> jax.Array:
  """float32 [K/2]: theta^(-2i/K), then the `scaling.kind` transform."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  return ROPE_SCALING.get(scaling.kind)(inv_freq, scaling)


def apply_rope(x_blhk: jax.Array, positions_bl: jax.Array, theta: float, scaling: RopeScalingConfig = RopeScalingConfig()) -> jax.Array:
  """Rotate pairs (x[..., i], x[..., i + K/2]) of each head by angle position * inv_freq[i].

  x_blhk: [B, L, H, K] queries or keys; positions_bl: [B, L] integer positions (restart at 0
  for each packed document, so relative offsets never cross documents); `scaling`: the
  long-context rescaling of the frequencies (none by default). Angles are computed in float32;
  the result has x's dtype.
  """
  inv_freq = inv_frequencies(x_blhk.shape[-1], theta, scaling)  # [K/2]
  angles = positions_bl.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, L, 1, K/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x_blhk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_blhk.dtype)
