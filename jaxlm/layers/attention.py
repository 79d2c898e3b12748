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

Variants (`AttentionConfig`, the Hugging Face families), applied in this order before RoPE:
  qkv_bias      q += b_q [H, K], k += b_k [G, K], v += b_v [G, K] (Qwen2)
  qk_norm       RMSNorm of q and k, scale `q_norm.scale`, `k_norm.scale`: "head" over each
                head's K, scale [K] (Qwen3); "proj" over the whole projection before the head
                split, scale [H, K] / [G, K] (OLMoE)
  clip_qkv      clamp q, k, v to [-c, c], after the norm (OLMoE, as transformers' OlmoeAttention)
  sliding_window  query i sees key j only if i - j < window, so `window` keys including its own
                (Mistral; transformers' `sliding_window_overlay`: kv_idx > q_idx - window). The
                distance is the token index without segment ids, the position difference with
                them (positions restart per document, so a packed document sees what it would
                alone, and a shared prompt key at position -p is p + i back), the slot
                difference with a cache (slots and positions differ by a per-row constant).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import AttentionConfig, ModelConfig, RopeScalingConfig
from jaxlm.layers.linear import project
from jaxlm.layers.norms import RMSNorm, rms_norm
from jaxlm.layers.params import normal, param, zeros
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


# The axes `qk_norm` normalises q [B, L, H, K] and k [B, L, G, K] over (its scale's shape).
QK_NORM_AXES = {"head": -1, "proj": (-2, -1)}


def segment_causal_mask(segment_ids_bl: jax.Array, positions_bl: jax.Array | None = None, window: int = 0) -> jax.Array:
  """[B, 1, L, L] boolean: causal, and within the same segment or to a shared key (segment id < 0);
  with a `window`, also positions[i] - positions[j] < window."""
  same = (segment_ids_bl[:, :, None] == segment_ids_bl[:, None, :]) | (segment_ids_bl[:, None, :] < 0)
  length = segment_ids_bl.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  mask = same & causal
  if window:
    mask = mask & (positions_bl[:, :, None] - positions_bl[:, None, :] < window)
  return mask[:, None]


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
    rope_scaling: RopeScalingConfig = RopeScalingConfig(),
    cfg: AttentionConfig = AttentionConfig(),
    b_q_hk: jax.Array | None = None,
    b_k_gk: jax.Array | None = None,
    b_v_gk: jax.Array | None = None,
    q_norm: jax.Array | None = None,
    k_norm: jax.Array | None = None,
    norm_eps: float = 1e-5,
    cache: KVCache | None = None,
    implementation: str | None = "xla",
) -> tuple[jax.Array, KVCache | None]:
  """The pure function over explicit weights (arrays or adapted weights). Returns (y [B, L, D], updated cache or None).

  `cfg` chooses the variants; their parameters: biases b_q [H, K], b_k, b_v [G, K] (qkv_bias),
  norm scales q_norm, k_norm ([K] for qk_norm "head", [H, K] / [G, K] for "proj").
  """
  dt = x_bld.dtype
  q = project("bld,dhk->blhk", x_bld, w_q_dhk)
  k = project("bld,dgk->blgk", x_bld, w_k_dgk)
  v = project("bld,dgk->blgk", x_bld, w_v_dgk)
  if cfg.qkv_bias:
    _require(cfg, "qkv_bias", b_q_hk=b_q_hk, b_k_gk=b_k_gk, b_v_gk=b_v_gk)
    q, k, v = q + b_q_hk.astype(dt), k + b_k_gk.astype(dt), v + b_v_gk.astype(dt)
  if cfg.qk_norm != "none":
    _require(cfg, "qk_norm", q_norm=q_norm, k_norm=k_norm)
    axis = QK_NORM_AXES[cfg.qk_norm]
    q, k = rms_norm(q, q_norm, norm_eps, axis=axis), rms_norm(k, k_norm, norm_eps, axis=axis)
  if cfg.clip_qkv:
    c = cfg.clip_qkv
    q, k, v = jnp.clip(q, -c, c), jnp.clip(k, -c, c), jnp.clip(v, -c, c)
  q = shard(apply_rope(q, positions_bl, rope_theta, rope_scaling), "batch", "seq", "heads", "head_dim")
  k = shard(apply_rope(k, positions_bl, rope_theta, rope_scaling), "batch", "seq", "kv_heads", "head_dim")
  v = shard(v, "batch", "seq", "kv_heads", "head_dim")

  window = cfg.sliding_window
  if cache is None:
    if segment_ids_bl is None:
      local = (window - 1, 0) if window else None  # i - j <= window - 1
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation=implementation)
    else:
      mask = segment_causal_mask(segment_ids_bl, positions_bl, window)
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  else:
    length = x_bld.shape[1]
    cache = KVCache(_write(cache.k, k, cache.index), _write(cache.v, v, cache.index), cache.index + length)
    slots = jnp.arange(cache.k.shape[1])
    query_slot = (cache.index - length)[:, None] + jnp.arange(length)[None, :]  # [B, L]
    mask = slots[None, None, :] <= query_slot[:, :, None]  # [B, L, S]
    if window:
      mask = mask & (query_slot[:, :, None] - slots[None, None, :] < window)
    out = jax.nn.dot_product_attention(q, cache.k.astype(dt), cache.v.astype(dt), mask=mask[:, None], implementation="xla")
  out = shard(out, "batch", "seq", "heads", "head_dim")
  y = project("blhk,hkd->bld", out, w_o_hkd)
  return y, cache


def _require(cfg: AttentionConfig, field: str, **arrays: jax.Array | None) -> None:
  missing = [name for name, a in arrays.items() if a is None]
  if missing:
    raise ValueError(f"attention: AttentionConfig.{field}={getattr(cfg, field)!r} needs {', '.join(missing)}")


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
    a = cfg.attention
    self.attn_cfg = a
    self.rope_scaling = cfg.rope_scaling
    self.norm_eps = cfg.norm_eps

    def bias(heads: int, heads_axis: str) -> nnx.Param | None:
      return param(rngs, zeros(), (heads, k), (heads_axis, "head_dim"), cfg.param_dtype, elementwise=True) if a.qkv_bias else None

    def norm(heads: int, heads_axis: str) -> RMSNorm | None:
      if a.qk_norm == "none":
        return None
      shape, axes = ((k,), ("head_dim",)) if a.qk_norm == "head" else ((heads, k), (heads_axis, "head_dim"))
      return RMSNorm(shape, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, axes=axes, rngs=rngs)

    self.b_q, self.b_k, self.b_v = bias(h, "heads"), bias(g, "kv_heads"), bias(g, "kv_heads")
    self.q_norm, self.k_norm = norm(h, "heads"), norm(g, "kv_heads")

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
          rope_scaling=self.rope_scaling,
          cfg=self.attn_cfg,
          **self._variant_params(),
          norm_eps=self.norm_eps,
          cache=cache,
          implementation=self.implementation,
      )
      return shard(y, "batch", "seq", "embed"), cache

  def _variant_params(self) -> dict[str, jax.Array]:
    """The variants' parameters as `attention()` keywords (only those this layer has)."""
    out = {}
    for name, var in (("b_q_hk", self.b_q), ("b_k_gk", self.b_k), ("b_v_gk", self.b_v)):
      if var is not None:
        out[name] = var[...]
    for name, norm in (("q_norm", self.q_norm), ("k_norm", self.k_norm)):
      if norm is not None:
        out[name] = norm.scale[...]
    return out
