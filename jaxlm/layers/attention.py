"""Grouped-query self-attention with RoPE, causal + packed-segment masking and a KV cache.

Shapes: x [B, L, D]; w_q [D, H, K]; w_k, w_v [D, G, K] (G = kv heads, H % G == 0);
w_o [H, K, D]. The score computation goes through `jax.nn.dot_product_attention`, which
handles the grouping of H query heads onto G key/value heads.

Masks. Training: query i sees key j iff j <= i and both lie in the same packed document
(segment id). Keys with a negative segment id are shared by every document of their row (still
causally): prompt tuning's virtual tokens (`jaxlm.peft.wrappers.PromptTuning`) sit at the row's
start with segment id -1 and positions -P..-1, so, RoPE being relative, every packed document
sees the same prompt at the same distances as if it were alone behind it. Decoding with a cache: cache slots are absolute positions 0..S-1 of each row;
the L new tokens of row b are written at slots index[b] .. index[b]+L-1 and see every slot
<= their own. Rows may sit at different indices (prompts of different lengths).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers.linear import project
from jaxlm.layers.params import normal, param
from jaxlm.layers.rope import apply_rope
from jaxlm.sharding import shard


class KVCache(NamedTuple):
  """Per-layer cache: keys and values [B, S, G, K], and the next slot of every row [B]."""

  k: jax.Array
  v: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: jnp.dtype) -> "KVCache":
    z = jnp.zeros((batch, max_len, n_kv_heads, head_dim), dtype)
    return cls(z, z, jnp.zeros((batch,), jnp.int32))


def segment_causal_mask(segment_ids_bl: jax.Array) -> jax.Array:
  """[B, 1, L, L] boolean: causal, and within the same segment or to a shared key (segment id < 0)."""
  same = (segment_ids_bl[:, :, None] == segment_ids_bl[:, None, :]) | (segment_ids_bl[:, None, :] < 0)
  length = segment_ids_bl.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return (same & causal)[:, None]


def _write(cache_bsgk: jax.Array, new_blgk: jax.Array, index_b: jax.Array) -> jax.Array:
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0))(cache_bsgk, new_blgk.astype(cache_bsgk.dtype), index_b)


def attention(
    x_bld: jax.Array,
    w_q_dhk: jax.Array,
    w_k_dgk: jax.Array,
    w_v_dgk: jax.Array,
    w_o_hkd: jax.Array,
    *,
    positions_bl: jax.Array,
    segment_ids_bl: jax.Array | None,
    rope_theta: float,
    cache: KVCache | None = None,
    implementation: str | None = "xla",
) -> tuple[jax.Array, KVCache | None]:
  """The pure function over explicit weights (arrays or adapted weights). Returns (y [B, L, D], updated cache or None)."""
  dt = x_bld.dtype
  q = project("bld,dhk->blhk", x_bld, w_q_dhk)
  k = project("bld,dgk->blgk", x_bld, w_k_dgk)
  v = project("bld,dgk->blgk", x_bld, w_v_dgk)
  q = shard(apply_rope(q, positions_bl, rope_theta), "batch", "seq", "heads", "head_dim")
  k = shard(apply_rope(k, positions_bl, rope_theta), "batch", "seq", "kv_heads", "head_dim")
  v = shard(v, "batch", "seq", "kv_heads", "head_dim")

  if cache is None:
    if segment_ids_bl is None:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    else:
      mask = segment_causal_mask(segment_ids_bl)
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  else:
    length = x_bld.shape[1]
    cache = KVCache(_write(cache.k, k, cache.index), _write(cache.v, v, cache.index), cache.index + length)
    slots = jnp.arange(cache.k.shape[1])
    query_slot = (cache.index - length)[:, None] + jnp.arange(length)[None, :]  # [B, L]
    mask = (slots[None, None, :] <= query_slot[:, :, None])[:, None]  # [B, 1, L, S]
    out = jax.nn.dot_product_attention(q, cache.k.astype(dt), cache.v.astype(dt), mask=mask, implementation="xla")
  out = shard(out, "batch", "seq", "heads", "head_dim")
  y = project("blhk,hkd->bld", out, w_o_hkd)
  return y, cache


class Attention(nnx.Module):
  """Grouped-query attention block (no norm, no residual: those live in the decoder block)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    self.dtype = jnp.dtype(cfg.dtype)
    self.rope_theta = cfg.rope_theta
    self.implementation = None if cfg.attention_impl == "auto" else cfg.attention_impl
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.w_q = param(rngs, normal(cfg.init_std), (d, h, k), ("embed", "heads", "head_dim"), cfg.param_dtype, fan_in=(0,))
    self.w_k = param(rngs, normal(cfg.init_std), (d, g, k), ("embed", "kv_heads", "head_dim"), cfg.param_dtype, fan_in=(0,))
    self.w_v = param(rngs, normal(cfg.init_std), (d, g, k), ("embed", "kv_heads", "head_dim"), cfg.param_dtype, fan_in=(0,))
    self.w_o = param(rngs, normal(out_std), (h, k, d), ("heads", "head_dim", "embed"), cfg.param_dtype, fan_in=(0, 1))

  def __call__(
      self,
      x_bld: jax.Array,
      *,
      positions: jax.Array,
      segment_ids: jax.Array | None = None,
      cache: KVCache | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    with jax.named_scope("attention"):
      y, cache = attention(
          x_bld.astype(self.dtype),
          self.w_q[...],
          self.w_k[...],
          self.w_v[...],
          self.w_o[...],
          positions_bl=positions,
          segment_ids_bl=segment_ids,
          rope_theta=self.rope_theta,
          cache=cache,
          implementation=self.implementation,
      )
      return shard(y, "batch", "seq", "embed"), cache
