"""The decoder LM: embeddings -> blocks (attention + FFN of a registered kind) -> norm -> head.

Layer pattern. Layer i holds the FFN kind `cfg.layer_ffn(i)`: dense for the first
`first_k_dense` layers, then `cfg.ffn` on every `ffn_every`-th layer and dense in between.
With `scan_layers`, the repeating unit of `ffn_every` blocks is stacked on a leading axis and
scanned (the dense prefix stays unrolled): one compiled body however deep the model is.

Inputs. `model(tokens)` looks the tokens up in the embedding table; `model(embeddings=x_bld)`
takes the input embeddings themselves (prompt tuning prepends learned ones, `jaxlm.peft`).

Aux. Each FFN may return `{"losses": {...}, "metrics": {...}}`; the model returns
`aux = {"losses": {name: sum over layers}, "metrics": {name: [n_layers_of_kind, ...]}}`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers.attention import Attention, KVCache
from jaxlm.layers.embed import Embed
from jaxlm.layers.ffn import FFN
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.linear import project
from jaxlm.layers.params import normal, param
from jaxlm.sharding import shard

Aux = dict[str, dict[str, jax.Array]]

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def combine_aux(auxes: list[Aux], *, stacked: bool = False) -> Aux:
  """Sum losses and join metrics, in layer order, over a list of aux dicts.

  Per-layer aux dicts (`stacked=False`) have their metrics stacked on a new leading axis;
  aux dicts that are already stacked over layers (`stacked=True`) are concatenated.
  """
  losses: dict[str, jax.Array] = {}
  metrics: dict[str, list[jax.Array]] = {}
  for aux in auxes:
    for k, v in aux.get("losses", {}).items():
      losses[k] = losses[k] + v if k in losses else v
    for k, v in aux.get("metrics", {}).items():
      metrics.setdefault(k, []).append(v)
  join = jnp.concatenate if stacked else jnp.stack
  return {"losses": losses, "metrics": {k: join(v) for k, v in metrics.items()}}


class BlockCache(NamedTuple):
  """One block's generation state: the attention KV cache, and the FFN's own per-row state
  (None for FFN kinds without `init_decode_state`; the soft MoE keeps each row's merged FFN)."""

  attn: KVCache
  ffn: Any = None


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, cfg: ModelConfig, ffn_kind: str, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
    self.ffn = FFN.get(ffn_kind)(cfg, rngs=rngs)

  def __call__(self, x_bld, *, positions, segment_ids=None, cache: BlockCache | None = None):
    h, kv = self.attn(self.attn_norm(x_bld), positions=positions, segment_ids=segment_ids, cache=None if cache is None else cache.attn)
    x_bld = x_bld + h
    if cache is not None and cache.ffn is not None:  # generating with a stateful FFN
      y, ffn_state = self.ffn.decode(self.ffn_norm(x_bld), cache.ffn, positions=positions, segment_ids=segment_ids)
      aux = {}
    else:
      y, aux = self.ffn(self.ffn_norm(x_bld), segment_ids=segment_ids, positions=positions)
      ffn_state = None  # no cache, or an FFN kind without decoding state
    return shard(x_bld + y, "batch", "seq", "embed"), aux, (None if cache is None else BlockCache(kv, ffn_state))


class Unit(nnx.Module):
  """`ffn_every` consecutive blocks: the pattern that repeats and is scanned over."""

  def __init__(self, cfg: ModelConfig, kinds: tuple[str, ...], *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, k, rngs=rngs) for k in kinds])

  def __call__(self, x_bld, *, positions, segment_ids=None, caches: tuple | None = None):
    auxes, new_caches = [], []
    for i, block in enumerate(self.blocks):
      x_bld, aux, c = block(x_bld, positions=positions, segment_ids=segment_ids, cache=None if caches is None else caches[i])
      auxes.append(aux)
      new_caches.append(c)
    return x_bld, combine_aux(auxes), (None if caches is None else tuple(new_caches))


class Transformer(nnx.Module):
  """Llama-style decoder. `model(tokens, segment_ids=, positions=) -> (logits [B,L,V] f32, aux)`,
  which is `model.head_fn()(model.hidden(tokens, ...)[0])`."""

  # Cache slots before a row's first token (a wrapper that puts virtual tokens there, e.g. prompt
  # tuning, says how many): generation points row b's write index at cache_offset + its length.
  cache_offset: int = 0

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    kinds = cfg.ffn_kinds
    if cfg.scan_layers:
      k0, period = cfg.first_k_dense, cfg.ffn_every
      self.prefix = nnx.List([Block(cfg, kinds[i], rngs=rngs) for i in range(k0)])
      unit_kinds = kinds[k0 : k0 + period]

      @nnx.split_rngs(splits=cfg.n_units)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
      def make_units(rngs: nnx.Rngs) -> Unit:
        return Unit(cfg, unit_kinds, rngs=rngs)

      self.units = make_units(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, kinds[i], rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype, fan_in=(0,))

  # -- the layer stack ---------------------------------------------------------------------

  def _remat(self, fn):
    if self.cfg.remat == "none":
      return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)

  def _layers(self, x_bld, positions, segment_ids, cache):
    """Run every block; `cache` is None or the structure made by `init_cache`."""
    auxes: list[Aux] = []
    new_cache: dict[str, Any] = {}

    def run_block(block, x, cache_i):
      return block(x, positions=positions, segment_ids=segment_ids, cache=cache_i)

    run_block = self._remat(run_block)
    if not self.cfg.scan_layers:
      caches = []
      for i, block in enumerate(self.blocks):
        x_bld, aux, c = run_block(block, x_bld, None if cache is None else cache["blocks"][i])
        auxes.append(aux)
        caches.append(c)
      new_cache["blocks"] = caches
      return x_bld, combine_aux(auxes), (new_cache if cache is not None else None)

    caches = []
    for i, block in enumerate(self.prefix):
      x_bld, aux, c = run_block(block, x_bld, None if cache is None else cache["prefix"][i])
      auxes.append(aux)
      caches.append(c)
    new_cache["prefix"] = caches

    def run_unit(unit, x, unit_caches):
      return unit(x, positions=positions, segment_ids=segment_ids, caches=unit_caches)

    run_unit = self._remat(run_unit)

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0), transform_metadata={nnx.PARTITION_NAME: None})
    def scan_units(x, unit, unit_caches):
      x, aux, unit_caches = run_unit(unit, x, unit_caches)
      return x, aux, unit_caches

    x_bld, unit_aux, unit_caches = scan_units(x_bld, self.units, None if cache is None else cache["units"])
    new_cache["units"] = unit_caches
    # Scanned aux: losses [n_units] -> summed; metrics [n_units, m, ...] -> [n_units * m, ...].
    flat = {
        "losses": {k: v.sum(0) for k, v in unit_aux.get("losses", {}).items()},
        "metrics": {k: v.reshape((-1,) + v.shape[2:]) for k, v in unit_aux.get("metrics", {}).items()},
    }
    return x_bld, combine_aux([combine_aux(auxes), flat], stacked=True), (new_cache if cache is not None else None)

  def head_fn(self) -> Callable[[jax.Array], jax.Array]:
    """The output head as a pure function: final hidden states x_bld (after the final norm) ->
    logits [B, L, V] in float32.

    The weights are read once, here, so the function can be called inside jax transforms: the
    train step applies it chunk by chunk (`jaxlm.train.loss`) and never holds the whole float32
    [B, L, V] logits. An adapted head reads its dropout key here too: a LoRA dropout on the head
    draws the same mask pattern in every chunk.
    """
    if self.cfg.tie_embeddings:
      return self.embed.attend_fn()
    w_dv = self.lm_head[...]

    def head(x_bld: jax.Array) -> jax.Array:
      logits = project("bld,dv->blv", x_bld, w_dv, preferred_element_type=jnp.float32)
      return shard(logits, "batch", "seq", "vocab")

    return head

  # -- public ------------------------------------------------------------------------------

  def _inputs(self, tokens_bl: jax.Array | None, embeddings: jax.Array | None) -> jax.Array:
    if (tokens_bl is None) == (embeddings is None):
      raise ValueError("pass either tokens or embeddings")
    if embeddings is None:
      return self.embed(tokens_bl)
    return shard(embeddings.astype(self.embed.dtype), "batch", "seq", "embed")

  def __call__(
      self,
      tokens_bl: jax.Array | None = None,
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      embeddings: jax.Array | None = None,
  ) -> tuple[jax.Array, Aux]:
    """Logits [B, L, V] in float32 and aux, from tokens [B, L] or input `embeddings` [B, L, D].
    Packed batches pass segment_ids (0 = padding; < 0: keys every document sees, see attention)."""
    x_bld, aux = self.hidden(tokens_bl, segment_ids=segment_ids, positions=positions, embeddings=embeddings)
    return self.head_fn()(x_bld), aux

  def hidden(
      self,
      tokens_bl: jax.Array | None = None,
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      embeddings: jax.Array | None = None,
  ) -> tuple[jax.Array, Aux]:
    """Final hidden states [B, L, D] (after the final norm; `head_fn()` maps them to logits) and aux."""
    with jax.named_scope("transformer"):
      x_bld = self._inputs(tokens_bl, embeddings)
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x_bld.shape[1], dtype=jnp.int32), x_bld.shape[:2])
      x_bld, aux, _ = self._layers(x_bld, positions, segment_ids, None)
      return self.final_norm(x_bld), aux

  def _ffns(self) -> list[Any]:
    """Layer i's FFN module; with scanned layers, unit position j's (stacked) module stands for its layers."""
    if not self.cfg.scan_layers:
      return [b.ffn for b in self.blocks]
    k0, period = self.cfg.first_k_dense, self.cfg.ffn_every
    return [b.ffn for b in self.prefix] + [self.units.blocks[(i - k0) % period].ffn for i in range(k0, self.cfg.n_layers)]

  def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
    """An empty KV cache for `batch` rows of up to `max_len` tokens, shaped like the layers."""
    cfg = self.cfg
    ffns = self._ffns()

    def one(i: int) -> BlockCache:
      ffn_state = ffns[i].init_decode_state  # the module's own (a PEFT wrapper forwards its kind's)
      kv = KVCache.zeros(batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim, jnp.dtype(cfg.dtype))
      return BlockCache(kv, None if ffn_state is None else ffn_state(cfg, batch, max_len))

    if not cfg.scan_layers:
      return {"blocks": [one(i) for i in range(cfg.n_layers)]}
    k0, n_units = cfg.first_k_dense, cfg.n_units
    stack = lambda c: jax.tree.map(lambda a: jnp.broadcast_to(a, (n_units,) + a.shape), c)
    return {"prefix": [one(i) for i in range(k0)], "units": tuple(stack(one(k0 + j)) for j in range(cfg.ffn_every))}

  def decode(
      self,
      tokens_bl: jax.Array | None,
      cache: dict[str, Any],
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      embeddings: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Append `tokens_bl` (or input `embeddings` [B, L, D]) to the cache (row b at its own
    index) and return their logits.

    `segment_ids` (0 = padding) marks the right padding of a batch of prompts in the prefill,
    for FFN kinds whose decoding state reads the prompt (soft-MoE prompt routing).
    `positions` default to the cache slots the tokens are written to.
    """
    x_bld = self._inputs(tokens_bl, embeddings)
    if positions is None:
      positions = cache_index(cache)[:, None] + jnp.arange(x_bld.shape[1], dtype=jnp.int32)[None, :]
    x_bld, _, cache = self._layers(x_bld, positions, segment_ids, cache)
    return self.head_fn()(self.final_norm(x_bld)), cache


def cache_index(cache: dict[str, Any]) -> jax.Array:
  """The next write slot [B] of every row of a cache made by `init_cache`."""
  if "blocks" in cache:
    return cache["blocks"][0].attn.index
  if cache["prefix"]:
    return cache["prefix"][0].attn.index
  return cache["units"][0].attn.index[0]

