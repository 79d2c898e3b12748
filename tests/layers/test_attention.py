"""Attention against a per-head loop reference; causality and packed-document isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers import Attention, KVCache, apply_rope
from jaxlm.layers.attention import attention

CFG = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1, dtype="float32")


def reference(x, wq, wk, wv, wo, positions, segment_ids, theta):
  """Naive attention: every query head looks up its kv head (h // (H/G)) in explicit loops."""
  b, l, _ = x.shape
  h, g = wq.shape[1], wk.shape[1]
  q = apply_rope(jnp.einsum("bld,dhk->blhk", x, wq), positions, theta)
  k = apply_rope(jnp.einsum("bld,dgk->blgk", x, wk), positions, theta)
  v = jnp.einsum("bld,dgk->blgk", x, wv)
  out = np.zeros(q.shape, np.float32)
  for bi in range(b):
    for hi in range(h):
      gi = hi // (h // g)
      for i in range(l):
        allowed = [j for j in range(i + 1) if segment_ids[bi, j] == segment_ids[bi, i]]
        s = np.array([np.dot(q[bi, i, hi], k[bi, j, gi]) for j in allowed]) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max())
        p /= p.sum()
        out[bi, i, hi] = sum(pj * v[bi, j, gi] for pj, j in zip(p, allowed))
  return jnp.einsum("blhk,hkd->bld", out, wo)


def _weights(layer):
  return layer.w_q[...], layer.w_k[...], layer.w_v[...], layer.w_o[...]


def test_matches_loop_reference_with_packing():
  layer = Attention(CFG, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, 32))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0]])
  pos = jnp.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0]])
  y, _ = layer(x, positions=pos, segment_ids=seg)
  ref = reference(x, *_weights(layer), pos, seg, CFG.rope_theta)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_causal_perturbation():
  """Changing the input at position t changes no output before t."""
  layer = Attention(CFG, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 9, 32))
  pos = jnp.arange(9)[None]
  y0, _ = layer(x, positions=pos)
  for t in (0, 4, 8):
    y1, _ = layer(x.at[:, t].add(3.0), positions=pos)
    np.testing.assert_array_equal(y0[:, :t], y1[:, :t])
    assert not np.allclose(y0[:, t:], y1[:, t:])


def test_packed_document_equals_document_alone():
  layer = Attention(CFG, rngs=nnx.Rngs(0))
  a = jax.random.normal(jax.random.key(1), (1, 4, 32))
  b = jax.random.normal(jax.random.key(2), (1, 5, 32))
  packed, _ = layer(jnp.concatenate([a, b], 1), positions=jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4]]), segment_ids=jnp.array([[1] * 4 + [2] * 5]))
  alone, _ = layer(b, positions=jnp.arange(5)[None])
  np.testing.assert_allclose(packed[:, 4:], alone, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
  def score(i, j):
    return jnp.sum(apply_rope(q, jnp.array([[i]]), 1e4) * apply_rope(k, jnp.array([[j]]), 1e4))
  np.testing.assert_allclose(score(5, 2), score(103, 100), rtol=1e-4)
  assert not np.isclose(score(5, 2), score(5, 4))


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_kv_cache_decoding_equals_full_attention(prompt_len):
  layer = Attention(CFG, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 32))
  full, _ = layer(x, positions=jnp.broadcast_to(jnp.arange(8), (2, 8)))
  cache = KVCache.zeros(2, 8, CFG.n_kv_heads, CFG.resolved_head_dim, jnp.float32)
  outs = []
  y, cache = layer(x[:, :prompt_len], positions=jnp.broadcast_to(jnp.arange(prompt_len), (2, prompt_len)), cache=cache)
  outs.append(y)
  for t in range(prompt_len, 8):
    y, cache = layer(x[:, t : t + 1], positions=jnp.full((2, 1), t), cache=cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  np.testing.assert_array_equal(cache.index, [8, 8])


def test_pure_function_matches_module():
  layer = Attention(CFG, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(1), (1, 6, 32))
  pos = jnp.arange(6)[None]
  y_mod, _ = layer(x, positions=pos)
  y_fn, _ = attention(x, *_weights(layer), positions_bl=pos, segment_ids_bl=None, rope_theta=CFG.rope_theta)
  np.testing.assert_array_equal(y_mod, y_fn)
