"""Prompt tuning: the wrapper is the plain model on [prompt; tokens]; packed documents each see the
prompt as if alone; cached generation equals recomputing; only the prompt trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import peft
from jaxlm.config import ModelConfig, MoEConfig, PeftConfig, SoftMoEConfig
from jaxlm.generate import SamplingConfig, generate_tokens
from jaxlm.models import abstract_model
from jaxlm.peft.wrappers import PromptTuning

P = 3
PEFT = PeftConfig(method="prompt", prompt_len=P)
BASE = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, dtype="float32")
CFGS = {
    "dense": ModelConfig(**BASE),
    "moe": ModelConfig(**BASE, ffn="moe", moe=MoEConfig(n_experts=4, top_k=2)),
    # Lory segments of 4: the prompt (3 tokens) must be a routing group of its own.
    "soft_moe": ModelConfig(**BASE, ffn="soft_moe", soft_moe=SoftMoEConfig(n_experts=2, segment_len=4, extra_segments=4)),
}

logits_of = nnx.jit(lambda m, x, seg, pos: m(x, segment_ids=seg, positions=pos)[0])
_models = {}


def wrapped_model(kind):
  """The model of CFGS[kind] with host-random weights (no compile per shape of an eager init), wrapped."""
  if kind not in _models:
    graphdef, state = nnx.split(abstract_model(CFGS[kind]))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), state)
    _models[kind] = peft.apply(nnx.merge(graphdef, state), PEFT, seed=1)
  return _models[kind]


def test_wrapper_is_the_model_on_prompt_then_tokens():
  wrapped = wrapped_model("dense")
  assert isinstance(wrapped, PromptTuning) and wrapped.cfg == CFGS["dense"] and wrapped.cache_offset == P
  table, prompt = np.asarray(wrapped.model.embed.w_vd[...]), np.asarray(wrapped.prompt[...])
  assert all((table == row).all(axis=1).any() for row in prompt)  # initialised from vocabulary rows
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 3, 64)

  @nnx.jit
  def both(wrapped, tokens):
    x = jnp.concatenate([jnp.broadcast_to(wrapped.prompt[...], (2, P, 16)), wrapped.model.embed(tokens)], axis=1)
    return wrapped(tokens)[0], wrapped.model(embeddings=x)[0][:, P:]

  got, want = both(wrapped, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(CFGS))
def test_packed_documents_each_see_the_prompt_as_if_alone(kind):
  a, b = [5, 9, 11, 40], [7, 7, 30, 12, 61]
  pad = lambda doc: doc + [0] * (12 - len(doc))
  # Row 0: a and b packed (+3 padding); rows 1 and 2: a, b alone (right-padded).
  tokens = jnp.array([pad(a + b), pad(a), pad(b)])
  seg = jnp.array([pad([1] * 4 + [2] * 5), pad([1] * 4), pad([1] * 5)])
  pos = jnp.array([pad(list(range(4)) + list(range(5))), pad(list(range(4))), pad(list(range(5)))])

  wrapped = wrapped_model(kind)
  out = np.asarray(logits_of(wrapped, tokens, seg, pos))
  np.testing.assert_allclose(out[0, :4], out[1, :4], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[0, 4:9], out[2, :5], rtol=1e-4, atol=1e-5)
  if kind == "dense":  # alone = the plain model on [prompt; a], causal (attention does not depend on the FFN kind)
    x = jnp.concatenate([wrapped.prompt[...], wrapped.model.embed.w_vd[...][jnp.array(a)]])[None]
    plain = nnx.jit(lambda model, x: model(embeddings=x)[0])(wrapped.model, x)
    np.testing.assert_allclose(out[1, :4], plain[0, P:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["moe", "soft_moe"])
def test_moe_layers_give_the_prompt_its_own_ffn(kind):
  """Virtual tokens (segment id -1) are routed like real ones; the soft MoE routes them as a
  document of their own: row 0 = [prompt; a] gives the outputs of rows 1 (prompt) and 2 (a)."""
  ffn = wrapped_model(kind).model.blocks[0].ffn
  x = jax.random.normal(jax.random.key(4), (1, 7, 16))
  rows = jnp.concatenate([x, jnp.pad(x[:, :P], ((0, 0), (0, 7 - P), (0, 0))), jnp.pad(x[:, P:], ((0, 0), (0, P), (0, 0)))])
  seg = jnp.array([[-1] * P + [1] * 4, [1] * P + [0] * 4, [1] * 4 + [0] * P])
  pos = jnp.array([list(range(-P, 4)), list(range(7)), list(range(7))])
  out = np.asarray(nnx.jit(lambda f, x, seg, pos: f(x, segment_ids=seg, positions=pos)[0])(ffn, rows, seg, pos))
  assert np.abs(out[0, :P]).min() > 0
  np.testing.assert_allclose(out[0, :P], out[1, :P], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out[0, P:], out[2, :4], rtol=1e-4, atol=1e-6)


def test_greedy_generation_with_cache_equals_recompute():
  wrapped = wrapped_model("dense")
  eos, n_new, n_allowed = 2, 6, 60
  prompts = [[1, 17, 33, 5, 8], [1, 40, 9]]
  got = generate_tokens(wrapped, prompts, SamplingConfig(max_new_tokens=n_new), n_allowed=n_allowed, eos_id=eos, banned=(0, 1))
  width = max(map(len, prompts)) + n_new
  ids = np.arange(64)
  banned = ~(((ids < n_allowed) & (ids > 2)) | (ids == eos))
  for prompt, g in zip(prompts, got):
    seq = list(prompt)
    for _ in range(n_new):  # the whole sequence again at every step (causal: the padding after it is unseen)
      logits = np.array(logits_of(wrapped, jnp.array([seq + [0] * (width - len(seq))]), None, None))[0, len(seq) - 1]
      logits[banned] = -np.inf
      tok = int(np.argmax(logits))
      if tok == eos:
        break
      seq.append(tok)
    assert g == seq[len(prompt) :]


def test_gradients_reach_only_the_prompt():
  wrapped = wrapped_model("dense")
  graphdef, train, frozen = nnx.split(wrapped, peft.trainable(PEFT), ...)
  assert [tuple(p) for p, _ in nnx.to_flat_state(train)] == [("prompt",)]
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 3, 64)
  weights = jax.random.normal(jax.random.key(2), (2, 6, 64))

  @jax.jit
  def grads(train, frozen):
    loss = lambda t: jnp.sum(nnx.merge(graphdef, t, frozen, copy=True)(tokens)[0] * weights)
    model = nnx.merge(graphdef, train, frozen, copy=True).model

    def plain_loss(prompt):  # the same gradient another way: the plain model's (causal), at its input embeddings
      x = jnp.concatenate([jnp.broadcast_to(prompt, (2, P, 16)), model.embed(tokens)], axis=1)
      return jnp.sum(model(embeddings=x)[0][:, P:] * weights)

    return jax.grad(loss)(train)["prompt"][...], jax.grad(plain_loss)(train["prompt"][...])

  got, want = grads(train, frozen)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert np.abs(got).max() > 0
