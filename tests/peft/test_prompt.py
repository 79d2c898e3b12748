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
from jaxlm.models import Transformer
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
  if kind not in _models:
    _models[kind] = peft.apply(Transformer(CFGS[kind], rngs=nnx.Rngs(0)), PEFT, seed=1)
  return _models[kind]


def with_prompt_inputs(b, length):
  """Segment ids and positions the wrapper gives [prompt; tokens] rows without their own."""
  return jnp.array([[-1] * P + [1] * length] * b), jnp.array([list(range(-P, length))] * b)


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

  @nnx.jit
  def run(wrapped, tokens, seg, pos):
    # Also: rows without segment ids (one document each), and the plain model without the prompt.
    return wrapped(tokens, segment_ids=seg, positions=pos)[0], wrapped(tokens)[0], wrapped.model(tokens)[0]

  out, unpacked, plain = map(np.asarray, run(wrapped_model(kind), tokens, seg, pos))
  np.testing.assert_allclose(out[0, :4], out[1, :4], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[0, 4:9], out[2, :5], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(unpacked[1:, :4], out[1:, :4], rtol=1e-4, atol=1e-5)
  assert np.abs(plain[1, :4] - out[1, :4]).max() > 1e-3  # the prompt matters


def test_greedy_generation_with_cache_equals_recompute():
  wrapped = wrapped_model("dense")
  eos, n_new, n_allowed = 2, 6, 60
  prompts = [[1, 17, 33, 5, 8], [1, 40, 9]]
  got = generate_tokens(wrapped, prompts, SamplingConfig(max_new_tokens=n_new), n_allowed=n_allowed, eos_id=eos)
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


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_gradients_reach_only_the_prompt(kind):
  wrapped = wrapped_model(kind)
  graphdef, train, frozen = nnx.split(wrapped, peft.trainable(PEFT), ...)
  assert [tuple(p) for p, _ in nnx.to_flat_state(train)] == [("prompt",)]
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 3, 64)
  weights = jax.random.normal(jax.random.key(2), (2, 6, 64))
  seg, pos = with_prompt_inputs(2, 6)

  @jax.jit
  def grads(train, frozen):
    loss = lambda t: jnp.sum(nnx.merge(graphdef, t, frozen)(tokens)[0] * weights)
    model = nnx.merge(graphdef, train, frozen).model

    def plain_loss(prompt):  # the same gradient another way: the plain model's, at its input embeddings
      x = jnp.concatenate([jnp.broadcast_to(prompt, (2, P, 16)), model.embed(tokens)], axis=1)
      return jnp.sum(model(embeddings=x, segment_ids=seg, positions=pos)[0][:, P:] * weights)

    return jax.grad(loss)(train)["prompt"][...], jax.grad(plain_loss)(train["prompt"][...])

  got, want = grads(train, frozen)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert np.abs(got).max() > 0
