"""Generation: the KV-cache loop equals recomputing the whole sequence; batching changes nothing;
the tokenizer's own special ids (not 0/1/2) end continuations and are never sampled."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.generate import SamplingConfig, generate_text, generate_tokens, sample_logits
from jaxlm.models import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, dtype="float32")
EOS = 2


@pytest.fixture(scope="module")
def model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


def greedy_without_cache(model, prompt, n, n_allowed, *, stop=(EOS,), banned=(0, 1)):
  fwd = nnx.jit(lambda m, x: m(x)[0])
  seq = list(prompt)
  for _ in range(n):
    logits = np.array(fwd(model, jnp.asarray([seq])))[0, -1]
    logits[n_allowed:] = -np.inf
    logits[list(banned)] = -np.inf  # never pad or BOS
    tok = int(np.argmax(logits))
    if tok in stop:
      break
    seq.append(tok)
  return seq[len(prompt) :]


def test_greedy_cache_decoding_equals_full_recompute(model):
  prompt = [1, 17, 33, 5]
  got = generate_tokens(model, [prompt], SamplingConfig(max_new_tokens=10), n_allowed=60, eos_id=EOS, banned=(0, 1))[0]
  assert got == greedy_without_cache(model, prompt, 10, 60)


def test_prompts_of_different_lengths_in_one_batch_equal_each_alone(model):
  prompts = [[1, 9], [1, 40, 41, 42, 43, 44, 7], [1, 3, 3]]
  cfg = SamplingConfig(max_new_tokens=6)
  together = generate_tokens(model, prompts, cfg, n_allowed=64, eos_id=EOS)
  alone = [generate_tokens(model, [p], cfg, n_allowed=64, eos_id=EOS)[0] for p in prompts]
  assert together == alone


def test_scanned_rematerialised_model_generates_the_same(model):
  """Layers under nnx.scan + nnx.remat decode inside the sampling loop like unrolled ones."""
  import dataclasses

  from jaxlm.models import load_unrolled_into_scanned

  scanned = Transformer(dataclasses.replace(CFG, scan_layers=True, remat="full"), rngs=nnx.Rngs(1))
  load_unrolled_into_scanned(model, scanned)
  prompts = [[1, 12, 13], [1, 50]]
  cfg = SamplingConfig(max_new_tokens=5)
  assert generate_tokens(scanned, prompts, cfg, n_allowed=64, eos_id=EOS) == generate_tokens(model, prompts, cfg, n_allowed=64, eos_id=EOS)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
  prompts = [[1, 12, 13], [1, 50]]
  greedy = generate_tokens(model, prompts, SamplingConfig(max_new_tokens=5), n_allowed=64, eos_id=EOS)
  assert generate_tokens(model, prompts, SamplingConfig(max_new_tokens=5, temperature=1.0, top_k=1, seed=3), n_allowed=64, eos_id=EOS) == greedy
  assert generate_tokens(model, prompts, SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=3), n_allowed=64, eos_id=EOS) == greedy


def test_sampling_respects_top_k_top_p_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.vmap(lambda k, cfg=None: sample_logits(logits, k, SamplingConfig(temperature=1.0))[0])
  counts = np.bincount(np.asarray(draw(keys)), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  top2 = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(temperature=1.0, top_k=2))[0])(keys))
  assert set(top2) == {0, 1}
  nucleus = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(temperature=1.0, top_p=0.85))[0])(keys))
  assert set(nucleus) == {0, 1, 2}  # 0.5 + 0.3 < 0.85, so the third token is needed; the fourth is not
  cold = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(temperature=0.05))[0])(keys))
  assert (cold == 0).mean() > 0.99


def test_bad_sampling_settings():
  with pytest.raises(ConfigError, match="top_p"):
    SamplingConfig(top_p=0)
  with pytest.raises(ConfigError, match="temperature"):
    SamplingConfig(temperature=-1)


class Numbers:
  """A tokenizer of space-separated ids whose special ids are not 0/1/2."""

  vocab_size, bos_id, pad_id = 60, 5, 7

  def __init__(self, stop_ids):
    self.eos_id, self.stop_ids = stop_ids[0], tuple(stop_ids)

  def encode(self, text):
    return [int(t) for t in text.split()]

  def decode(self, ids):
    return " ".join(map(str, ids))


def test_generation_ends_at_the_tokenizers_stop_ids(model):
  """A sampled continuation of [BOS=5] 9 17 that reaches no end id (62 is never sampled) is cut
  before its k-th token once that token is the tokenizer's EOS, or another of its stop ids: the
  same seed draws the same tokens until then."""
  prompt, n = [Numbers.bos_id, 9, 17], 8
  cfg = SamplingConfig(max_new_tokens=n, temperature=1.0, seed=0)
  free = generate_tokens(model, [prompt], cfg, n_allowed=60, eos_id=62, banned=(5, 7))[0]
  assert len(free) == n and not {5, 7} & set(free)
  k = next(j for j in range(2, n) if free[j] not in free[:j] and free[j] not in (0, 1, 2))
  assert generate_text(model, Numbers([free[k]]), ["9 17"], cfg) == [" ".join(map(str, free[:k]))]
  assert generate_text(model, Numbers([61, free[k]]), ["9 17"], cfg) == [" ".join(map(str, free[:k]))]
  assert generate_tokens(model, [prompt], cfg, n_allowed=60, eos_id=[free[k], 62], banned=(5, 7)) == [free[:k]]


def test_byte_tokenizer_generates_as_before():
  """Byte runs: pad 0 and BOS 1 are never sampled, EOS 2 ends (the former fixed ids)."""
  cfg = dataclasses.replace(CFG, vocab_size=384)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tok, n = ByteTokenizer(), 6
  prompt = [tok.bos_id] + tok.encode("ab")
  want = greedy_without_cache(model, prompt, n, tok.vocab_size, stop=(2,), banned=(0, 1))
  assert generate_tokens(model, [prompt], SamplingConfig(max_new_tokens=n), n_allowed=tok.vocab_size, eos_id=tok.stop_ids, pad_id=0, banned=(0, 1)) == [want]
  assert generate_text(model, tok, ["ab"], SamplingConfig(max_new_tokens=n)) == [tok.decode(want)]
