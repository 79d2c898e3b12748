"""The `soft_moe` FFN kind: experts merged in parameter space, tokens run once through the merge.

    w_g = softmax(router(mean of a group's layer input))   routing (float32), see routing.py
    y_t = SwiGLU(x_t; sum_e w_{g(t), e} expert_e)          one merged FFN per group, merge.py

Lory (Zhong et al. 2024, arXiv 2405.03133) routes segments of T tokens causally; SMEAR
(Muqeeth et al. 2023) routes whole sequences. No auxiliary loss (Lory trains without one).

Parameters (DESIGN.md layout): router [D, E], w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D].
Experts are sharded along F (`mlp`) and D (`embed`), never along `expert`: every expert takes
part in every merge. Non-trainable state, only when asked for: the dense warm-up flag (see
warmup.py) and the expert-dropout key and counter.

Generation (`decode`): the prompt is processed as in training; then every row gets one merged
FFN from the mean of its prompt's layer inputs, reused for every generated token
(`decode_routing="prompt"`), or, as in training, re-merged at every multiple of T positions
from the mean of the segment just completed (`decode_routing="segments"`; exact for any prompt
length and single-token decode steps, except inside a first segment under the "paper" rule,
which reads that segment's future: the prompt stands in for it).

`soft_moe(params, x, cfg)` is the layer as a pure function of an explicit parameter pytree.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.layers.experts import Experts, ExpertWeights
from jaxlm.layers.ffn import FFN, FFNKind
from jaxlm.layers.params import normal, param
from jaxlm.layers.soft_moe.merge import MERGE, apply_merged, auto_chunk, merged_swiglu_groups, shard_merged
from jaxlm.layers.soft_moe import warmup
from jaxlm.layers.soft_moe.routing import FIRST_SEGMENT, GRANULARITY, chunk_layout, from_slots, group_means, packed_layout, router_probs, routing_metrics, to_slots
from jaxlm.sharding import shard

Aux = dict[str, dict[str, jax.Array]]


class SoftMoEState(nnx.Variable):
  """Non-trainable soft-MoE state (dense warm-up flag, dropout RNG): changed outside the optimizer."""




def _dense_weights(w_ge: jax.Array, dense: jax.Array | None) -> jax.Array:
  """During the dense warm-up every group uses expert 0 alone."""
  if dense is None:
    return w_ge
  return jnp.where(dense, jax.nn.one_hot(0, w_ge.shape[-1], dtype=w_ge.dtype), w_ge)


def soft_moe(
    params: dict[str, jax.Array],
    x_bld: jax.Array,
    cfg: ModelConfig,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
    dense: jax.Array | None = None,
) -> tuple[jax.Array, Aux]:
  """Pure soft-merged MoE layer: (y [B, L, D], aux with routing metrics).

  params: {"router": [D, E], "w_gate": [E, D, F], "w_up": [E, D, F], "w_down": [E, F, D]}.
  segment_ids (0 = padding) and positions describe packed documents; `dropout_key` enables
  expert dropout (training); `dense` (bool scalar) routes every group to expert 0.
  """
  m = cfg.soft_moe
  dt = jnp.dtype(cfg.dtype)
  x_bld = shard(x_bld.astype(dt), "batch", "seq", "embed")
  b, length, d = x_bld.shape
  gran = GRANULARITY.get(m.granularity)
  t = gran.group_len(m, length)
  valid_bl = None
  if segment_ids is None and length % t == 0:
    layout = chunk_layout(b, length, t)
  else:
    if segment_ids is None:
      segment_ids = jnp.ones((b, length), jnp.int32)
    else:
      valid_bl = segment_ids != 0  # 0 = padding (< 0: a tuned prompt, its own routing group)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    n_slots = min(length, -(-length // t) + m.extra_segments)
    layout = packed_layout(segment_ids, positions, t, n_slots)
  x_bgtd = shard(to_slots(x_bld, layout, t), "batch", None, None, "embed")
  probs_bge = router_probs(group_means(x_bgtd, layout.mask_bgt), params["router"])
  w_bge = _dense_weights(gran.weights(probs_bge, layout.continues_bg, m, dropout_key=dropout_key), dense)
  experts = ExpertWeights.of(params)
  n_slots = x_bgtd.shape[1]
  chunk = m.merge_chunk or auto_chunk(n_slots)
  y_bgtd = apply_merged(x_bgtd, w_bge, experts, merge=MERGE.get(m.merge), chunk=chunk)
  y_bgtd = jnp.where(layout.mask_bgt[..., None], y_bgtd, 0)
  y_bld = from_slots(y_bgtd, layout, length)
  metrics = routing_metrics(w_bge, layout.mask_bgt, layout.keep_bl, valid_bl)
  return shard(y_bld, "batch", "seq", "embed"), {"metrics": metrics}


# -- generation ----------------------------------------------------------------------------------


class DecodeState(NamedTuple):
  """Per-row state of one soft-MoE layer while generating."""

  merged: ExpertWeights  # the row's merged FFN: gate [B, D, F], up [B, D, F], down [B, F, D]
  sum_bd: jax.Array  # float32: layer inputs summed over the current routing window
  count_b: jax.Array  # int32: tokens in the window; -1 until the prompt has been processed


def route_rows(params: dict[str, jax.Array], mean_bd: jax.Array, cfg: ModelConfig, dense: jax.Array | None, *, first_b: jax.Array | None = None) -> ExpertWeights:
  """One merged FFN per row (compute dtype) from a mean layer input [B, D].

  Rows where `first_b` is set are in a document's first segment: the first-segment rule
  applies to their router probabilities (`mean_bd` is then the mean of that segment so far).
  """
  probs_be = router_probs(mean_bd[:, None], params["router"])[:, 0]
  if first_b is not None:
    probs_be = jnp.where(first_b[:, None], FIRST_SEGMENT.get(cfg.soft_moe.first_segment)(probs_be), probs_be)
  w_be = _dense_weights(probs_be, dense)
  merged = ExpertWeights.of(params).merge(w_be, MERGE.get(cfg.soft_moe.merge), dense=True)
  dt = jnp.dtype(cfg.dtype)
  return shard_merged(ExpertWeights(*(w.astype(dt) for w in merged)))


def _masked_sum(x_bld: jax.Array, mask_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Float32 sum [B, D] and count [B] of the tokens where `mask_bl` is set."""
  s = jnp.einsum("bld,bl->bd", x_bld.astype(jnp.float32), mask_bl.astype(jnp.float32))
  return s, jnp.sum(mask_bl, axis=1).astype(jnp.int32)


def _mean(s_bd: jax.Array, n_b: jax.Array) -> jax.Array:
  return s_bd / jnp.maximum(n_b, 1)[:, None]


def soft_moe_decode(
    params: dict[str, jax.Array],
    x_bld: jax.Array,
    state: DecodeState,
    cfg: ModelConfig,
    *,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    dense: jax.Array | None = None,
) -> tuple[jax.Array, DecodeState]:
  """The first call (count -1) is the prompt, processed as in training. Then:

  `decode_routing="prompt"`: each row's merged FFN comes from its prompt's mean, for good.
  `decode_routing="segments"`: as in training, segment k (positions [k T, (k + 1) T)) runs
  through the merge routed on segment k-1's mean. The prefill routes the segment of the next
  position on the prompt's last complete segment (the first-segment rule on the prompt, when
  it is shorter than T) and keeps the unfinished segment's sum and count; every later call
  adds its tokens and re-merges when the segment is complete (exact for single-token steps).
  """
  m = cfg.soft_moe
  x_bld = x_bld.astype(jnp.dtype(cfg.dtype))
  # The document's tokens: not padding (0), nor a tuned prompt (< 0), which is its own routing group.
  valid_bl = jnp.ones(x_bld.shape[:2], bool) if segment_ids is None else segment_ids > 0

  def prefill(state: DecodeState) -> tuple[jax.Array, DecodeState]:
    y, _ = soft_moe(params, x_bld, cfg, segment_ids=segment_ids, positions=positions, dense=dense)
    if m.decode_routing != "segments":
      merged = route_rows(params, _mean(*_masked_sum(x_bld, valid_bl)), cfg, dense)
      return y, DecodeState(merged, jnp.zeros_like(state.sum_bd), jnp.zeros_like(state.count_b))
    seg_bl = positions // m.segment_len
    k_b = jnp.max(jnp.where(valid_bl, positions + 1, 0), axis=1) // m.segment_len  # segment of the next position
    last_s, last_n = _masked_sum(x_bld, valid_bl & (seg_bl == k_b[:, None] - 1))
    tail_s, tail_n = _masked_sum(x_bld, valid_bl & (seg_bl == k_b[:, None]))
    first_b = k_b == 0
    mean_bd = jnp.where(first_b[:, None], _mean(tail_s, tail_n), _mean(last_s, last_n))
    merged = route_rows(params, mean_bd, cfg, dense, first_b=first_b)
    return y, DecodeState(merged, tail_s, tail_n)

  def step(state: DecodeState) -> tuple[jax.Array, DecodeState]:
    y = merged_swiglu_groups(x_bld, state.merged, token_axis="seq")  # every row through its own merged FFN
    s, n = _masked_sum(x_bld, valid_bl)
    s, n = state.sum_bd + s, state.count_b + n
    merged = state.merged
    if m.decode_routing == "segments":
      due_b = n >= m.segment_len

      def reroute(_):
        new = route_rows(params, _mean(s, n), cfg, dense)
        return ExpertWeights(*(jnp.where(due_b[:, None, None], a, b) for a, b in zip(new, merged)))

      merged = jax.lax.cond(jnp.any(due_b), reroute, lambda _: merged, None)
      s, n = jnp.where(due_b[:, None], 0.0, s), jnp.where(due_b, 0, n)
    return y, DecodeState(merged, s, n)

  return jax.lax.cond(jnp.all(state.count_b < 0), prefill, step, state)


# -- the module ----------------------------------------------------------------------------------


@FFN.register("soft_moe")
class SoftMergedMoE(FFNKind):
  """Soft-merged MoE FFN; `__call__(x_bld, segment_ids=None, positions=None) -> (y_bld, aux)`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    m = cfg.soft_moe
    d, f, e = cfg.d_model, cfg.d_ff, m.n_experts
    self.cfg = cfg
    self.router = param(rngs, normal(cfg.init_std), (d, e), ("embed", None), cfg.param_dtype, fan_in=(0,))
    self.experts = Experts(cfg, e, f, expert_axis=None, rngs=rngs)
    # True until the dense warm-up ends (warmup.scheduled_edits clears it).
    # (Shape [1], not []: a scalar's empty sharding metadata cannot take the scanned layer axis.)
    self.dense = SoftMoEState(jnp.ones((1,), bool), out_sharding=(None,), eager_sharding=False) if m.dense_warmup > 0 else None
    # Expert dropout: raw key data and a counter (plain integer arrays checkpoint anywhere).
    dropout = m.expert_dropout > 0
    self.dropout_key = SoftMoEState(jax.random.key_data(rngs.params()), out_sharding=(None,), eager_sharding=False) if dropout else None
    self.dropout_step = SoftMoEState(jnp.zeros((1,), jnp.uint32), out_sharding=(None,), eager_sharding=False) if dropout else None
    self.deterministic = False  # model.eval() sets True: no expert dropout

  # -- the FFN protocol ----------------------------------------------------------------------

  @staticmethod
  def group_len(cfg: ModelConfig, seq_len: int) -> int:
    return GRANULARITY.get(cfg.soft_moe.granularity).group_len(cfg.soft_moe, seq_len)

  @staticmethod
  def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The merged SwiGLU (6 D F) plus the merge and the router, amortised over a group:
    2 x E x 3 D F / T + 2 D E / T (Lory: E / T extra)."""
    e, d, f = cfg.soft_moe.n_experts, cfg.d_model, cfg.d_ff
    t = SoftMergedMoE.group_len(cfg, seq_len)
    return 2 * 3 * d * f + (2 * e * 3 * d * f + 2 * d * e) / t

  @staticmethod
  def inactive_params(cfg: ModelConfig) -> int:
    """Active = one merged expert per token (how Lory counts, e.g. "0.3B active, 8 experts")."""
    return (cfg.soft_moe.n_experts - 1) * 3 * cfg.d_model * cfg.d_ff

  @staticmethod
  def validate(exp: Experiment, mesh_shape: dict[str, int]) -> None:
    """Checks that need the registries or the mesh (ConfigError naming the field)."""
    m = exp.model.soft_moe
    if m.merge not in MERGE:
      raise ConfigError(f"model.soft_moe.merge {m.merge!r} is not a merge implementation; known: {', '.join(MERGE.keys())}")
    if m.merge == "pallas":
      try:
        import pallas_kernels.merge  # noqa: F401
      except ImportError as e:
        raise ConfigError(f"model.soft_moe.merge='pallas' needs pallas_kernels.merge: {e}") from None
    n = warmup.warmup_steps(exp)
    if m.dense_warmup > 0 and not 0 < n < exp.train.steps:
      # n = 0 would set the dense flag and never clear it; n >= steps would never copy the experts.
      raise ConfigError(
          f"model.soft_moe.dense_warmup={m.dense_warmup} x train.steps={exp.train.steps} rounds to {n} warm-up steps; "
          f"it must give between 1 and train.steps - 1 (dense_warmup=0: no warm-up)"
      )

  scheduled_edits = staticmethod(warmup.scheduled_edits)  # end of the dense warm-up (applied by the trainer)

  @staticmethod
  def init_decode_state(cfg: ModelConfig, batch: int, max_len: int) -> DecodeState:
    del max_len
    d, f, dt = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.dtype)
    merged = ExpertWeights(jnp.zeros((batch, d, f), dt), jnp.zeros((batch, d, f), dt), jnp.zeros((batch, f, d), dt))
    return DecodeState(merged, jnp.zeros((batch, d), jnp.float32), jnp.full((batch,), -1, jnp.int32))

  # -- calls ---------------------------------------------------------------------------------

  def params(self) -> dict[str, jax.Array]:
    return {"router": self.router[...], **self.experts.params()}

  def _dense_flag(self) -> jax.Array | None:
    return None if self.dense is None else self.dense[...][0]

  def __call__(self, x_bld: jax.Array, *, segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    with jax.named_scope("soft_moe"):
      key = None
      if self.dropout_key is not None and not self.deterministic:
        key = jax.random.fold_in(jax.random.wrap_key_data(self.dropout_key[...]), self.dropout_step[...][0])
        self.dropout_step[...] = self.dropout_step[...] + 1
      return soft_moe(self.params(), x_bld, self.cfg, segment_ids=segment_ids, positions=positions, dropout_key=key, dense=self._dense_flag())

  def decode(self, x_bld: jax.Array, state: DecodeState, *, positions: jax.Array, segment_ids: jax.Array | None = None) -> tuple[jax.Array, DecodeState]:
    with jax.named_scope("soft_moe_decode"):
      return soft_moe_decode(self.params(), x_bld, state, self.cfg, positions=positions, segment_ids=segment_ids, dense=self._dense_flag())

