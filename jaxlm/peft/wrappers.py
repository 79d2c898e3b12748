"""Adapters that add computation around the model or a sublayer instead of changing a weight.

  prompt      prompt tuning (Lester et al. 2021, arXiv 2104.08691): P learned virtual-token
              embeddings [P, D] in front of every sequence. `PromptTuning` wraps the whole
              Transformer (`peft.apply` returns the wrapper). The prompt starts as the
              embeddings of P random vocabulary rows (the paper's advice over random init).
  bottleneck  bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751): after a block's
              attention and/or FFN (`peft.bottleneck_at`), before the residual add,
              h <- h + up(gelu(down(h))), down [D, M], up [M, D] zero-initialised (a fresh
              adapter changes nothing). `AttentionBottleneck` / `FFNBottleneck` replace
              `block.attn` / `block.ffn` and hold the sublayer as `base`.
              Houlsby's adapters also have biases; these do not.

Letters: B batch, L length, D embed, P prompt length, M bottleneck width, N adapter experts.

Prompt tuning with packed rows (segment ids, 0 = padding, in-document positions from 0). The
prompt sits once at the row's start with segment id -1 and positions -P..-1. Attention lets
every query see keys with a negative segment id (causally, `jaxlm.layers.attention`); RoPE
being relative, each document then sees the prompt exactly as if it were alone behind it. The
MoE layers treat segment id != 0 as a real token, so the virtual tokens get their FFN; the soft
MoE routes them as a document of their own. Rows without segment ids get id 1 for every token,
so each FFN kind sees the same layout either way. Generation: `init_cache` keeps P slots in
front of every row (`cache_offset`) and marks the cache fresh; the first `decode` (the prefill)
writes the virtual tokens there; later calls continue at in-document position slot - P.

SMEAR-merged adapter experts (Muqeeth et al. 2023, arXiv 2306.03745), `peft.n_experts` = N:
N (down, up) pairs and a router [D, N]; p = softmax(router(mean sublayer input of the
document)), per row, or per document of a packed row; the adapter is sum_n p_n down_n,
sum_n p_n up_n. It is applied per token as sum_n p_n (h down_n), then gelu, then
sum_n p_n (a up_n): the same numbers (each projection is linear in its weight) without a merged
adapter per document. The routing reads the whole document, future tokens included: the config
refuses it without `peft.allow_noncausal_routing`, and generation with it is refused.

Scanned layers (`units/...`): adapter variables get the leading layer axis of the weights they
sit next to, so the scan over layers slices them like the base. None of these is mergeable into
the base weights: `jaxlm.peft.merge` refuses every `Wrapper`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import PeftConfig
from jaxlm.errors import ConfigError
from jaxlm.layers.ffn import FFNKind
from jaxlm.layers.linear import project
from jaxlm.models.transformer import Block, cache_index
from jaxlm.peft import targets as tg
from jaxlm.peft.methods import METHODS, Method, is_adapter
from jaxlm.peft.modules import AdapterParam, host_rng, new_variable
from jaxlm.sharding import logical_axes_of

FRESH = "prompt_tuning_fresh"  # key of a fresh prompt-tuning cache: the virtual tokens are not written yet
NO_DECODE = "generation with SMEAR-merged bottleneck experts (peft.n_experts > 0) is not supported: they route on whole documents"


class Wrapper(nnx.Module):
  """Base of the wrappers (prompt tuning, bottleneck adapters): not mergeable."""


# -- prompt tuning ----------------------------------------------------------------------------


class PromptTuning(Wrapper):
  """A Transformer (`model`) behind P learned virtual tokens (`prompt` [P, D]).

  `wrapper(tokens, segment_ids=, positions=) -> (logits [B, L, V], aux)`: logits of the real
  tokens only, as the plain model would give them (`hidden` and `head_fn` likewise).
  """

  def __init__(self, model: nnx.Module, prompt_len: int, *, key: jax.Array):
    self.model = model
    table = model.embed.w_vd
    like = table.get_value()
    vocab, d = table.shape

    def init() -> jax.Array:  # float32 like every adapter, whatever the table's dtype
      rows = host_rng(key).choice(vocab, prompt_len, replace=prompt_len > vocab)
      return jnp.take(like, jnp.asarray(rows), axis=0).astype(jnp.float32)

    self.prompt = new_variable(AdapterParam, init, (prompt_len, d), jnp.float32, (None, "embed"), like)

  @property
  def cfg(self):
    return self.model.cfg

  @property
  def cache_offset(self) -> int:
    return self.prompt.shape[0]

  def _with_prompt(self, tokens_bl: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None):
    """Input embeddings [B, P + L, D], segment ids and positions with the prompt in front."""
    b, length = tokens_bl.shape
    p = self.cache_offset
    x_bld = self.model.embed(tokens_bl)
    prompt_bpd = jnp.broadcast_to(self.prompt[...].astype(x_bld.dtype), (b, p, x_bld.shape[-1]))
    seg = jnp.ones((b, length), jnp.int32) if segment_ids is None else segment_ids
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)) if positions is None else positions
    return (
        jnp.concatenate([prompt_bpd, x_bld], axis=1),
        jnp.concatenate([jnp.full((b, p), -1, seg.dtype), seg], axis=1),
        jnp.concatenate([jnp.broadcast_to(jnp.arange(-p, 0, dtype=pos.dtype), (b, p)), pos], axis=1),
    )

  def __call__(self, tokens_bl: jax.Array, *, segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
    x_bld, aux = self.hidden(tokens_bl, segment_ids=segment_ids, positions=positions)
    return self.head_fn()(x_bld), aux

  def hidden(self, tokens_bl: jax.Array, *, segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
    """Final hidden states of the real tokens [B, L, D] and aux (`Transformer.hidden`)."""
    with jax.named_scope("prompt_tuning"):
      x_bld, seg, pos = self._with_prompt(tokens_bl, segment_ids, positions)
      x_bld, aux = self.model.hidden(embeddings=x_bld, segment_ids=seg, positions=pos)
      return x_bld[:, self.cache_offset :], aux

  def head_fn(self):
    return self.model.head_fn()

  def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
    """The model's cache with P more slots per row, marked fresh (None: a pytree node without leaves)."""
    return {**self.model.init_cache(batch, self.cache_offset + max_len), FRESH: None}

  def decode(self, tokens_bl: jax.Array, cache: dict[str, Any], *, segment_ids: jax.Array | None = None):
    """Like `Transformer.decode`; on a fresh cache the virtual tokens are written first."""
    if FRESH in cache:  # the prefill (every row at slot 0)
      inner = {k: v for k, v in cache.items() if k != FRESH}
      x_bld, seg, pos = self._with_prompt(tokens_bl, segment_ids, None)
      logits, cache = self.model.decode(None, inner, embeddings=x_bld, segment_ids=seg, positions=pos)
      return logits[:, self.cache_offset :], cache
    positions = cache_index(cache)[:, None] - self.cache_offset + jnp.arange(tokens_bl.shape[1], dtype=jnp.int32)[None, :]
    return self.model.decode(tokens_bl, cache, segment_ids=segment_ids, positions=positions)


def _prompt(model: nnx.Module, cfg: PeftConfig, key: jax.Array, **_: Any) -> nnx.Module:
  return PromptTuning(model, cfg.prompt_len, key=key)


METHODS.register("prompt", Method(_prompt, is_adapter))


# -- bottleneck adapters ----------------------------------------------------------------------


def document_probs(x_bld: jax.Array, router_dn: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """Float32 [B, L, N]: softmax(router(mean of x over the token's document)) for every token.

  A document is a row, or, with segment ids, a run of equal ids (as the packer writes them)."""
  x = x_bld.astype(jnp.float32)
  if segment_ids is None:
    return jax.nn.softmax(project("bd,dn->bn", jnp.mean(x, axis=1), router_dn), axis=-1)[:, None, :]
  b, length, d = x.shape
  start_bl = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  doc = (jnp.cumsum(start_bl, axis=1) - 1 + length * jnp.arange(b)[:, None]).reshape(-1)  # unique over the batch
  sums_sd = jax.ops.segment_sum(x.reshape(b * length, d), doc, num_segments=b * length)
  counts_s = jax.ops.segment_sum(jnp.ones((b * length,), jnp.float32), doc, num_segments=b * length)
  probs_sn = jax.nn.softmax(project("sd,dn->sn", sums_sd / jnp.maximum(counts_s, 1.0)[:, None], router_dn), axis=-1)
  return probs_sn[doc].reshape(b, length, -1)


class Bottleneck(Wrapper):
  """A sublayer (`base`) whose output h becomes h + up(gelu(down(h))); a mixture of N adapters
  with `n_experts` (SMEAR-merged per document, routed on the sublayer's input)."""

  def __init__(self, base: nnx.Module, *, d_model: int, width: int, n_experts: int, key: jax.Array, n_scan: int):
    self.base = base
    var = next(v for _, v in nnx.iter_graph(base) if isinstance(v, nnx.Param))
    like, dtype = var.get_value(), np.float32  # float32 like every adapter, whatever the base's dtype
    stack, s_ax = tuple(var.shape[:n_scan]), logical_axes_of(var)[:n_scan]
    nb, nb_ax = ((n_experts,), (None,)) if n_experts else ((), ())
    k_down, k_router = jax.random.split(key)
    down, up = stack + nb + (d_model, width), stack + nb + (width, d_model)
    init_down = lambda: (host_rng(k_down).normal(0.0, 1.0, down) / math.sqrt(d_model)).astype(dtype)
    self.down = new_variable(AdapterParam, init_down, down, dtype, s_ax + nb_ax + ("embed", "lora_rank"), like)
    self.up = new_variable(AdapterParam, lambda: np.zeros(up, dtype), up, dtype, s_ax + nb_ax + ("lora_rank", "embed"), like)
    r = stack + (d_model, n_experts)
    init_router = lambda: host_rng(k_router).normal(0.0, 0.02, r).astype(np.float32)
    self.router = new_variable(AdapterParam, init_router, r, jnp.float32, s_ax + ("embed", None), like) if n_experts else None
    self.n_experts = n_experts

  def adapt(self, h_bld: jax.Array, x_bld: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """h + up(gelu(down(h))); `x_bld` (the sublayer's input) routes a mixture."""
    if not self.n_experts:
      a_blm = jax.nn.gelu(project("bld,dm->blm", h_bld, self.down[...]), approximate=False)
      return h_bld + project("blm,md->bld", a_blm, self.up[...])
    p_bln = document_probs(x_bld, self.router[...], segment_ids).astype(h_bld.dtype)
    z_blm = jnp.einsum("blnm,bln->blm", project("bld,ndm->blnm", h_bld, self.down[...]), p_bln)
    a_blnm = jax.nn.gelu(z_blm, approximate=False)[:, :, None, :] * p_bln[..., None]
    return h_bld + project("blnm,nmd->bld", a_blnm, self.up[...])


class AttentionBottleneck(Bottleneck):
  """`block.attn` with an adapter on its output (the attention's call signature)."""

  def __call__(self, x_bld: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None, cache: Any = None):
    if cache is not None and self.n_experts:
      raise ConfigError(NO_DECODE)
    h_bld, cache = self.base(x_bld, positions=positions, segment_ids=segment_ids, cache=cache)
    return self.adapt(h_bld, x_bld, segment_ids), cache


def _refuse_decoding(*_: Any) -> None:
  raise ConfigError(NO_DECODE)


class FFNBottleneck(Bottleneck, FFNKind):
  """`block.ffn` with an adapter on its output: an FFN kind itself (call, and decoding state of
  stateful kinds such as the soft MoE, forwarded to `base`)."""

  @property
  def init_decode_state(self) -> Callable[..., Any] | None:
    return _refuse_decoding if self.n_experts else self.base.init_decode_state

  def __call__(self, x_bld: jax.Array, *, segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
    y_bld, aux = self.base(x_bld, segment_ids=segment_ids, positions=positions)
    return self.adapt(y_bld, x_bld, segment_ids), aux

  def decode(self, x_bld: jax.Array, state: Any, *, positions: jax.Array, segment_ids: jax.Array | None = None):
    y_bld, state = self.base.decode(x_bld, state, positions=positions, segment_ids=segment_ids)
    return self.adapt(y_bld, x_bld, segment_ids), state


SUBLAYERS = {"attn": AttentionBottleneck, "ffn": FFNBottleneck}


def _bottleneck(model: nnx.Module, cfg: PeftConfig, key: jax.Array, **_: Any) -> nnx.Module:
  if cfg.top_k:
    raise ConfigError("peft.top_k: SMEAR-merged bottleneck experts merge all N adapters softly; set peft.top_k=0")
  blocks = [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, Block)]
  keys = iter(jax.random.split(key, max(len(blocks) * len(cfg.bottleneck_at), 1)))
  for path, block in blocks:
    for name in cfg.bottleneck_at:
      wrapper = SUBLAYERS[name](getattr(block, name), d_model=model.cfg.d_model, width=cfg.bottleneck_dim, n_experts=cfg.n_experts, key=next(keys), n_scan=tg.n_scan(path))
      setattr(block, name, wrapper)
  return model


METHODS.register("bottleneck", Method(_bottleneck, is_adapter))
