"""Generation with the soft MoE: prompt-only routing matches training, re-routing every T tokens
matches training further (for any prompt length), padded prompts in one batch decode as if alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig, SoftMoEConfig
from jaxlm.generate import SamplingConfig, generate_tokens
from jaxlm.models import Transformer

T = 4
CFG = ModelConfig(
    vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=24, dtype="float32", ffn="soft_moe",
    soft_moe=SoftMoEConfig(n_experts=4, segment_len=T), init_std=0.3,  # large weights: routing matters
)

forward = nnx.jit(lambda model, x: model(x)[0])
prefill = nnx.jit(lambda model, x, cache: model.decode(x, cache, segment_ids=jnp.ones_like(x)))
step = nnx.jit(lambda model, x, cache: model.decode(x, cache))


def teacher_forced(model, toks, n_prompt):
  """Logits of every position after the prompt, decoding the given tokens one at a time."""
  cache = model.init_cache(toks.shape[0], toks.shape[1])
  logits, cache = prefill(model, toks[:, :n_prompt], cache)
  outs = [logits]
  for t in range(n_prompt, toks.shape[1]):
    logits, cache = step(model, toks[:, t : t + 1], cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("first_segment, scan", [("paper", False), ("uniform", True)])
def test_prompt_routing_equals_training_logits_of_segment_two(first_segment, scan):
  cfg = dataclasses.replace(CFG, scan_layers=scan, soft_moe=dataclasses.replace(CFG.soft_moe, first_segment=first_segment))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  toks = jax.random.randint(jax.random.key(1), (2, 3 * T), 3, cfg.vocab_size)
  full = forward(model, toks)
  dec = teacher_forced(model, toks, T)
  np.testing.assert_allclose(dec[:, : 2 * T], full[:, : 2 * T], atol=2e-5)  # the prompt, then segment 2
  assert not np.allclose(dec[:, 2 * T :], full[:, 2 * T :], atol=1e-3)  # segment 3 keeps the prompt's routing


# Prompts of T, 2T and T + 2 tokens (the segment of the first generated token is routed on the
# prompt's last complete segment, the unfinished one carries on); shorter than T under the
# uniform first-segment rule (the paper rule reads the first segment's future: not exact).
@pytest.mark.parametrize("n_prompt, first_segment", [(T, "paper"), (2 * T, "paper"), (T + 2, "paper"), (2, "uniform")])
def test_rerouting_every_t_tokens_equals_training(n_prompt, first_segment):
  cfg = dataclasses.replace(CFG, soft_moe=dataclasses.replace(CFG.soft_moe, decode_routing="segments", first_segment=first_segment))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  toks = jax.random.randint(jax.random.key(2), (2, 4 * T), 3, cfg.vocab_size)
  full = forward(model, toks)
  np.testing.assert_allclose(teacher_forced(model, toks, n_prompt), full, atol=2e-5)
  if n_prompt > T:  # prompt routing (the mean of the whole prompt) differs: the test can tell
    prompt_cfg = dataclasses.replace(cfg, soft_moe=dataclasses.replace(cfg.soft_moe, decode_routing="prompt"))
    prompt_model = Transformer(prompt_cfg, rngs=nnx.Rngs(0))
    nnx.update(prompt_model, nnx.state(model))
    assert not np.allclose(teacher_forced(prompt_model, toks, n_prompt)[:, n_prompt:], full[:, n_prompt:], atol=1e-3)


@pytest.mark.parametrize("decode_routing", ["prompt", "segments"])
def test_padded_prompts_decode_as_if_alone(decode_routing):
  model = Transformer(dataclasses.replace(CFG, soft_moe=dataclasses.replace(CFG.soft_moe, decode_routing=decode_routing)), rngs=nnx.Rngs(0))
  prompts = [[5, 9, 11, 13, 17, 19], [7, 8]]
  cfg = SamplingConfig(max_new_tokens=2 * T)
  together = generate_tokens(model, prompts, cfg, n_allowed=CFG.vocab_size, eos_id=2)
  alone = generate_tokens(model, prompts[1:], cfg, n_allowed=CFG.vocab_size, eos_id=2)
  assert together[1] == alone[0]  # the short prompt is right-padded in the batch: padding never routes
