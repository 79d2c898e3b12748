"""The decoder: scan == unrolled, causality, packing isolation, remat, KV-cache decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.models import Transformer, load_unrolled_into_scanned

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, dtype="float32")


@nnx.jit
def logits_of(model, x, segment_ids=None, positions=None):
  return model(x, segment_ids=segment_ids, positions=positions)[0]


decode = nnx.jit(lambda model, x, cache: model.decode(x, cache))


def tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 3, CFG.vocab_size)


@pytest.mark.parametrize("first_k_dense", [0, 1])
def test_scan_equals_unrolled(first_k_dense):
  cfg = dataclasses.replace(CFG, first_k_dense=first_k_dense, n_layers=3 if first_k_dense else 4)
  unrolled = Transformer(cfg, rngs=nnx.Rngs(0))
  scanned = Transformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(1))
  load_unrolled_into_scanned(unrolled, scanned)
  x = tokens((2, 12))
  np.testing.assert_allclose(logits_of(unrolled, x), logits_of(scanned, x), atol=1e-5)

  def loss(m):
    return jnp.mean(m(x)[0] ** 2)

  g_unrolled = nnx.jit(nnx.grad(loss))(unrolled)
  g_scanned = nnx.jit(nnx.grad(loss))(scanned)
  np.testing.assert_allclose(g_unrolled["embed"]["w_vd"][...], g_scanned["embed"]["w_vd"][...], atol=1e-6)
  np.testing.assert_allclose(
      g_unrolled["blocks"][cfg.n_layers - 1]["ffn"]["w_down"][...], g_scanned["units"]["blocks"][0]["ffn"]["w_down"][...][-1], atol=1e-6
  )


@pytest.mark.parametrize("scan", [False, True])
def test_causal_perturbation(scan):
  model = Transformer(dataclasses.replace(CFG, scan_layers=scan), rngs=nnx.Rngs(0))
  x = tokens((1, 16))
  base = logits_of(model, x)
  for t in (0, 7, 15):
    changed = logits_of(model, x.at[0, t].set((x[0, t] + 1) % CFG.vocab_size))
    np.testing.assert_array_equal(base[:, :t], changed[:, :t])
    assert not np.allclose(base[:, t], changed[:, t])


def test_packed_documents_are_independent():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  a, b = tokens((1, 5), 1), tokens((1, 7), 2)
  packed = jnp.concatenate([a, b], 1)
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  out = logits_of(model, packed, seg, pos)
  np.testing.assert_allclose(out[:, :5], logits_of(model, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], logits_of(model, b), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_does_not_change_values_or_gradients(policy):
  x = tokens((2, 8))
  ref = Transformer(CFG, rngs=nnx.Rngs(0))
  rem = Transformer(dataclasses.replace(CFG, remat=policy), rngs=nnx.Rngs(0))
  grad = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(x)[0] ** 2)))
  (l1, g1), (l2, g2) = grad(ref), grad(rem)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_keeps_float32_master_weights_and_logits():
  model = Transformer(dataclasses.replace(CFG, dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits = logits_of(model, tokens((1, 8)))
  assert logits.dtype == jnp.float32
  f32 = logits_of(Transformer(CFG, rngs=nnx.Rngs(0)), tokens((1, 8)))
  np.testing.assert_allclose(logits, f32, atol=0.1)  # same function, bf16 rounding only


def test_untied_head_is_separate_parameter():
  model = Transformer(dataclasses.replace(CFG, tie_embeddings=False), rngs=nnx.Rngs(0))
  assert model.lm_head.shape == (CFG.d_model, CFG.vocab_size)
  x = tokens((1, 4))
  before = logits_of(model, x)
  model.lm_head[...] = model.lm_head[...] * 2
  np.testing.assert_allclose(logits_of(model, x), 2 * before, rtol=1e-5)  # logits are linear in the head


@pytest.mark.parametrize("scan", [False, True])
def test_decode_with_cache_equals_forward(scan):
  model = Transformer(dataclasses.replace(CFG, scan_layers=scan), rngs=nnx.Rngs(0))
  x = tokens((2, 10))
  full = logits_of(model, x)
  cache = model.init_cache(2, 10)
  logits, cache = decode(model, x[:, :4], cache)
  outs = [logits]
  for t in range(4, 10):
    logits, cache = decode(model, x[:, t : t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)
