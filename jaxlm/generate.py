"""KV-cache decoding: greedy, temperature, top-k and top-p sampling, several prompts in one batch.

Prompts of different lengths share one batch: they are right-padded, prefilled together, and
then every row continues from its own length (the cache keeps a per-row write index), so no
row ever attends to another row's padding. A model may keep `cache_offset` slots in front of
every row (prompt tuning's virtual tokens, written by its first `decode`). Decoding runs inside one jitted `lax.while_loop`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64  # tokens generated after each prompt
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0  # keep only the k most likely tokens (0: all)
  top_p: float = 1.0  # keep the smallest set of tokens with probability >= p (1: all)
  seed: int = 0  # sampling randomness

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits_bv: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Next token ids [B] from logits [B, V] (already restricted to allowed tokens)."""
  if cfg.temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = logits_bv.astype(jnp.float32) / cfg.temperature
  if cfg.top_k > 0:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the probability mass strictly before it is < p (the top token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < cfg.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "cfg", "n_allowed", "stop_ids", "banned", "pad_id"))
def _generate(graphdef, state, tokens_bp, lengths_b, *, cfg: SamplingConfig, n_allowed: int, stop_ids: tuple[int, ...], banned: tuple[int, ...], pad_id: int):
  model = nnx.merge(graphdef, state)
  model.eval()
  # The loop body rebuilds the model (fresh variables, `copy=True`): variables of this trace
  # cannot be used inside the loop's trace when the layers use NNX transforms (scan, remat).
  graphdef, state = nnx.split(model)
  batch, prompt_len = tokens_bp.shape
  cache = model.init_cache(batch, prompt_len + cfg.max_new_tokens)
  prompt_ids = (jnp.arange(prompt_len)[None, :] < lengths_b[:, None]).astype(jnp.int32)  # 0 = padding
  logits, cache = model.decode(tokens_bp, cache, segment_ids=prompt_ids)
  # Every row continues from its own length: point the write index there (after the slots a
  # wrapper keeps in front of every row: prompt tuning's virtual tokens).
  cache = _set_index(cache, model.cache_offset + lengths_b)
  vocab = logits.shape[-1]
  ids = jnp.arange(vocab)
  # Only the tokenizer's real tokens (embedding rows past its vocabulary are padding), never a
  # banned one (the tokenizer's pad and BOS).
  allowed = (ids < n_allowed) & ~jnp.isin(ids, jnp.asarray(banned, jnp.int32))

  def restrict(lg):
    return jnp.where(allowed[None, :], lg.astype(jnp.float32), -jnp.inf)

  last = jnp.take_along_axis(logits, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
  out = jnp.full((batch, cfg.max_new_tokens), pad_id, jnp.int32)
  key = jax.random.key(cfg.seed)

  def body(i, carry):
    out, last, cache, done, key = carry
    key, sub = jax.random.split(key)
    tok = sample_logits(restrict(last), sub, cfg)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    done = done | jnp.isin(tok, jnp.asarray(stop_ids, jnp.int32))
    logits, cache = nnx.merge(graphdef, state, copy=True).decode(tok[:, None], cache)
    return out, logits[:, 0], cache, done, key

  out, *_ = jax.lax.fori_loop(0, cfg.max_new_tokens, body, (out, last, cache, jnp.zeros((batch,), bool), key))
  return out


def _set_index(cache, index_b):
  from jaxlm.layers.attention import KVCache

  def fix(c):
    if isinstance(c, KVCache):
      return c._replace(index=jnp.broadcast_to(index_b, c.index.shape).astype(jnp.int32))
    return c

  return jax.tree.map(fix, cache, is_leaf=lambda c: isinstance(c, KVCache))


def generate_tokens(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    n_allowed: int,
    eos_id: int | Sequence[int],
    pad_id: int | None = None,
    banned: Sequence[int] = (),
) -> list[list[int]]:
  """Continuations (token ids, cut before the first end id) of every prompt.

  `eos_id`: the id, or ids, that end a continuation; sampled ids are below `n_allowed` (the
  tokenizer's vocabulary) and never in `banned`; `pad_id` (default: the first end id) fills the
  prompts' right padding (masked) and the rows that ended.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("every prompt needs at least one token")
  stop_ids = (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(int(i) for i in eos_id)
  if not stop_ids:
    raise ConfigError("generation needs at least one end id (eos_id)")
  pad_id = stop_ids[0] if pad_id is None else int(pad_id)
  banned = tuple(sorted({int(i) for i in banned} - set(stop_ids)))
  prompt_len = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), prompt_len), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  graphdef, state = nnx.split(model)
  out = np.asarray(_generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cfg=cfg, n_allowed=n_allowed, stop_ids=stop_ids, banned=banned, pad_id=pad_id))
  result = []
  for row in out.tolist():
    end = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
    result.append(row[:end])
  return result


def generate_text(model: nnx.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: SamplingConfig = SamplingConfig(), *, add_bos: bool = True) -> list[str]:
  """Decoded continuations of text prompts, with the tokenizer's special ids: BOS in front (when
  `add_bos` and it has one), generation ends at its stop ids and never samples its pad or BOS."""
  bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
  encoded = [bos + tokenizer.encode(p) for p in prompts]
  banned = [i for i in (tokenizer.pad_id, tokenizer.bos_id) if i is not None]
  outs = generate_tokens(model, encoded, cfg, n_allowed=tokenizer.vocab_size, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id, banned=banned)
  return [tokenizer.decode(o) for o in outs]
