"""Bottleneck adapters: fresh ones change nothing; a block equals h + up(gelu(down(h))) by hand;
SMEAR-merged experts are their parameter-space merge (one-hot: that expert); only adapters train."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import peft
from jaxlm.config import ModelConfig, PeftConfig
from jaxlm.errors import ConfigError
from jaxlm.generate import SamplingConfig, generate_tokens
from jaxlm.models import abstract_model, load_unrolled_into_scanned
from jaxlm.peft.wrappers import AttentionBottleneck, FFNBottleneck

D, M = 16, 4
BASE = dict(vocab_size=64, d_model=D, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, dtype="float32")
PEFT = PeftConfig(method="bottleneck", bottleneck_dim=M)
MIXTURE = PeftConfig(method="bottleneck", bottleneck_dim=M, n_experts=3, allow_noncausal_routing=True)
TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 3, 64)
SEG = jnp.array([[1] * 5 + [2] * 3, [1] * 6 + [0] * 2])
logits_of = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg)[0])


def gelu(z):
  return 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def randomize(var, seed, scale=0.3):
  var.set_value(jnp.asarray(np.random.default_rng(seed).normal(0.0, scale, var.shape), var.dtype))


def host_model(cfg):
  """A model of `cfg` with host-random weights (no compile per shape of an eager init)."""
  graphdef, state = nnx.split(abstract_model(cfg))
  rng = np.random.default_rng(0)
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), state))


@pytest.fixture(scope="module")
def plain():
  model = host_model(ModelConfig(**BASE))
  return model, logits_of(model, TOKENS, SEG)


@pytest.fixture(scope="module")
def dense(plain):
  """The plain model with fresh adapters after attn and ffn, and the plain model's logits."""
  model, before = plain
  return peft.apply(nnx.clone(model), PEFT), before


@pytest.fixture(scope="module")
def scanned_mixture(plain):
  """The same weights in a scanned model, with a mixture of adapters."""
  model, before = plain
  scanned = host_model(ModelConfig(**BASE, scan_layers=True))
  load_unrolled_into_scanned(model, scanned)
  return peft.apply(scanned, MIXTURE), before


@pytest.mark.parametrize("which", ["dense", "scanned_mixture"])
def test_fresh_adapters_change_nothing(which, request):
  model, before = request.getfixturevalue(which)
  np.testing.assert_allclose(logits_of(model, TOKENS, SEG), before, rtol=1e-6, atol=1e-7)
  if which == "scanned_mixture":  # stacked like the layers they sit in: [units, N, ...]
    ffn = model.units.blocks[0].ffn
    assert isinstance(ffn, FFNBottleneck) and ffn.down.shape == (2, 3, D, M) and ffn.router.shape == (2, D, 3)


def test_block_equals_hand_written_adapters(dense):
  model, _ = dense
  block = model.blocks[0]
  assert isinstance(block.attn, AttentionBottleneck) and isinstance(block.ffn, FFNBottleneck)
  randomize(block.attn.up, 1)
  randomize(block.ffn.up, 2)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, D)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  got = nnx.jit(lambda block, x: block(x, positions=pos)[0])(block, x)

  def adapter(h, wrapper):
    h = np.asarray(h, np.float64)
    return h + gelu(h @ np.asarray(wrapper.down[...])) @ np.asarray(wrapper.up[...])

  # The sublayers themselves (`base`) through jax, the adapters and residuals by hand.
  attn_out = nnx.jit(lambda block, x: block.attn.base(block.attn_norm(x), positions=pos)[0])(block, x)
  x1 = np.asarray(x) + adapter(attn_out, block.attn)
  ffn_out = nnx.jit(lambda block, x: block.ffn.base(block.ffn_norm(x))[0])(block, jnp.asarray(x1, jnp.float32))
  np.testing.assert_allclose(got, x1 + adapter(ffn_out, block.ffn), rtol=1e-4, atol=1e-5)
  assert np.abs(adapter(attn_out, block.attn) - np.asarray(attn_out)).max() > 1e-3  # the adapter acts


def test_smear_mixture_is_the_merge_in_parameter_space(scanned_mixture):
  model, _ = scanned_mixture
  # One layer's adapter, sliced out of the stacked [units, ...] variables.
  w = model.units.blocks[0].ffn
  rng = np.random.default_rng(2)
  normal = lambda shape: rng.normal(size=shape).astype(np.float32)
  down, up, router = np.asarray(w.down[...][0]), normal(w.up.shape[1:]), normal(w.router.shape[1:])
  one = nnx.clone(w)
  for var, value in ((one.down, down), (one.up, up), (one.router, router)):
    var.set_value(jnp.asarray(value))
  adapt = nnx.jit(lambda w, h, x, seg: w.adapt(h, x, seg))
  x, h = normal((2, 6, D)), normal((2, 6, D))

  # Soft routing per row: the adapter of the merged weights sum_n p_n down_n, sum_n p_n up_n.
  logits = x.mean(1) @ router
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want = np.stack([h[b] + gelu(h[b] @ np.einsum("n,ndm->dm", p[b], down)) @ np.einsum("n,nmd->md", p[b], up) for b in range(2)])
  np.testing.assert_allclose(adapt(one, jnp.asarray(h), jnp.asarray(x), None), want, rtol=1e-4, atol=1e-5)

  # One-hot routing per packed document: documents with means 3 e_0 and 3 e_1, router columns
  # 0 and 1 pointing at them (logits 1000 vs 0): each document gets its expert's adapter alone.
  seg = np.array([[1, 1, 1, 2, 2, 2]])
  x1 = x[:1] - np.where(seg[..., None] == 1, x[:1, :3].mean(1, keepdims=True), x[:1, 3:].mean(1, keepdims=True))
  x1[0, :3, 0] += 3.0
  x1[0, 3:, 1] += 3.0
  one.router.set_value(jnp.asarray(np.eye(D, 3, dtype=np.float32) * 1000 / 3 * (np.arange(3) < 2)))
  got = np.asarray(adapt(one, jnp.asarray(h[:1]), jnp.asarray(x1), jnp.asarray(seg)))
  for n, tokens in ((0, slice(0, 3)), (1, slice(3, 6))):
    hd = h[0, tokens]
    np.testing.assert_allclose(got[0, tokens], hd + gelu(hd @ down[n]) @ up[n], rtol=1e-4, atol=1e-5)


def test_gradients_reach_only_the_adapters(scanned_mixture):
  model, _ = scanned_mixture
  for block in model.units.blocks:  # up != 0, so that every adapter variable gets a gradient
    randomize(block.attn.up, 6)
    randomize(block.ffn.up, 7)
  graphdef, train, frozen = nnx.split(model, peft.trainable(MIXTURE), ...)
  train_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(train)}
  assert train_paths == {f"units/blocks/0/{s}/{v}" for s in ("attn", "ffn") for v in ("down", "up", "router")}
  assert len(nnx.to_flat_state(nnx.state(frozen, nnx.Param))) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))

  @jax.jit
  def grads(train, frozen):
    return jax.grad(lambda t: jnp.sum(nnx.merge(graphdef, t, frozen, copy=True)(TOKENS, segment_ids=SEG)[0] ** 2))(train)

  for path, g in nnx.to_flat_state(grads(train, frozen)):
    assert np.abs(np.asarray(g[...])).max() > 0, path


def test_merge_refuses_and_generation_refuses_a_mixture(dense, scanned_mixture):
  with pytest.raises(ConfigError, match="bottleneck"):
    peft.merge(dense[0])
  with pytest.raises(ConfigError, match="SMEAR"):
    generate_tokens(scanned_mixture[0], [[1, 5, 9]], SamplingConfig(max_new_tokens=2), n_allowed=64, eos_id=2)


def test_greedy_generation_with_cache_equals_recompute(dense):
  model, _ = dense
  for i, block in enumerate(model.blocks):
    randomize(block.attn.up, 10 + i)
    randomize(block.ffn.up, 20 + i)
  prompt, n_new, eos = [1, 17, 33, 5], 5, 2
  got = generate_tokens(model, [prompt], SamplingConfig(max_new_tokens=n_new), n_allowed=64, eos_id=eos, banned=(0, 1))[0]
  banned = np.arange(64) <= 2
  banned[eos] = False
  seq, width = list(prompt), len(prompt) + n_new
  for _ in range(n_new):  # the whole sequence again at every step (causal: the padding after it is unseen)
    logits = np.array(logits_of(model, jnp.array([seq + [0] * (width - len(seq))]), None))[0, len(seq) - 1]
    logits[banned] = -np.inf
    tok = int(np.argmax(logits))
    if tok == eos:
      break
    seq.append(tok)
  assert got == seq[len(prompt) :]
