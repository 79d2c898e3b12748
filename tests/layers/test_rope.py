"""RoPE scaling: one registered transform per config kind, Llama 3.1 and linear inverse
frequencies equal transformers' `ROPE_INIT_FUNCTIONS`, and linear scaling is position / factor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ROPE_SCALINGS, RopeScalingConfig
from jaxlm.layers.rope import ROPE_SCALING, apply_rope, inv_frequencies


def test_registry_keys_are_the_config_kinds():
  assert ROPE_SCALING.keys() == sorted(ROPE_SCALINGS)


def hf_inv_freq(head_dim: int, theta: float, rope_parameters: dict) -> np.ndarray:
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_parameters={"rope_theta": theta, **rope_parameters})
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")
  assert attention_factor == 1.0
  return inv_freq.numpy()


@pytest.mark.parametrize(
    "head_dim, theta, factor, low, high, original",
    [
        (128, 500_000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B
        (64, 500_000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
        (8, 10_000.0, 8.0, 1.0, 4.0, 64),  # tiny: one frequency in each band
    ],
)
def test_llama3_inverse_frequencies_match_transformers(head_dim, theta, factor, low, high, original):
  params = dict(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=original)
  ref = hf_inv_freq(head_dim, theta, params)
  cfg = RopeScalingConfig(kind="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_len=original)
  ours = inv_frequencies(head_dim, theta, cfg)
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  base = inv_frequencies(head_dim, theta)
  wavelen = 2 * np.pi / np.asarray(base)
  kept, divided = wavelen < original / high, wavelen > original / low
  assert kept.any() and divided.any()  # the high- and low-frequency bands are both exercised
  np.testing.assert_array_equal(ours[kept], base[kept])
  np.testing.assert_allclose(ours[divided], base[divided] / factor, rtol=1e-7)


def test_linear_inverse_frequencies_match_transformers():
  ref = hf_inv_freq(64, 10_000.0, dict(rope_type="linear", factor=4.0))
  np.testing.assert_allclose(inv_frequencies(64, 10_000.0, RopeScalingConfig(kind="linear", factor=4.0)), ref, rtol=1e-6)


def test_linear_scaling_is_position_interpolation():
  """Linear scaling by f at position p rotates like no scaling at position p / f."""
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, 16))
  pos = jnp.array([[0, 1, 5, 17, 100, 4095]])
  scaled = apply_rope(x, pos, 1e4, RopeScalingConfig(kind="linear", factor=4.0))
  np.testing.assert_allclose(scaled, apply_rope(x, pos / 4.0, 1e4), atol=1e-4)
  np.testing.assert_array_equal(apply_rope(x, pos, 1e4, RopeScalingConfig()), apply_rope(x, pos, 1e4))
