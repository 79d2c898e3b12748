"""Routing of the soft-merged MoE: which tokens share one merged FFN, and with which weights.

Letters: B batch, L length, D embed, E experts, G routing groups (segments) per row, T tokens
per group.

Groups. A routing group is a run of tokens of one document that share one merged FFN. Group
boundaries sit where a document starts and, inside a document, at every position that is a
multiple of the group length (positions are in-document positions, as the packer writes them).
So segments never cross a document boundary, a document is cut into segments exactly as if it
were alone in its row, and two documents packed into one row never share a routing (a packed
document gets the same outputs as the same document on its own).

Layouts. Without `segment_ids` a row is one document and the groups are the L / T chunks of the
row (`chunk_layout`, a reshape). With `segment_ids` (packed rows) tokens are gathered into
`G = L / T + extra_segments` slots of T tokens (`packed_layout`): each document boundary that
is not a multiple of T from the row start costs one extra slot, and tokens of groups beyond the
last slot get no FFN output (counted by the `soft_moe_dropped` metric; raise
`model.soft_moe.extra_segments` if it is not ~0).

Granularities (registered, one signature):
  segment   Lory (Zhong et al. 2024, arXiv 2405.03133, Sec. 3.1): group k of a document is
            merged with softmax(router(mean of group k-1's layer input)); the first group of
            a document follows a first-segment rule (`FIRST_SEGMENT`).
  sequence  SMEAR (Muqeeth et al. 2023): one group per document, routed on its own mean (it
            reads the whole sequence: refused in a causal decoder without the opt-in), with
            optional expert dropout in training.

First-segment rules (registered, one signature):
  paper     the group routes on its own mean with stop-gradient on the routing weights
            (Lory's choice: tokens of segment 1 see their own segment's future through the
            routing, in the forward pass only).
  uniform   weights 1/E: strictly causal.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import SoftMoEConfig
from jaxlm.layers.linear import project
from jaxlm.registry import Registry

GRANULARITY: Registry = Registry("soft_moe granularity")
FIRST_SEGMENT: Registry = Registry("soft_moe first-segment rule")


class Layout(NamedTuple):
  """Where every token sits in the [B, G, T] slots, and how groups relate."""

  mask_bgt: jax.Array  # bool [B, G, T]: slot holds a real token (not padding, not empty)
  continues_bg: jax.Array  # bool [B, G]: group g continues the document of group g-1
  src_bgt: jax.Array | None  # int32 [B, G, T]: token index of every slot (None: reshape)
  src_ok_bgt: jax.Array | None  # bool [B, G, T]: the slot holds a token (padding tokens too)
  dst_bl: jax.Array | None  # int32 [B, L]: slot index g * T + t of every token (None: reshape)
  keep_bl: jax.Array | None  # bool [B, L]: the token has a slot (False: no FFN output)


def chunk_layout(batch: int, length: int, group_len: int) -> Layout:
  """Unpacked rows: group g is tokens [g T, (g + 1) T) of the row."""
  g = length // group_len
  mask = jnp.ones((batch, g, group_len), bool)
  continues = jnp.broadcast_to(jnp.arange(g) > 0, (batch, g))
  return Layout(mask, continues, None, None, None, None)


def packed_layout(segment_ids_bl: jax.Array, positions_bl: jax.Array, group_len: int, n_groups: int) -> Layout:
  """Packed rows (segment id 0 = padding; < 0: a tuned prompt shared by the row's documents, routed
  as its own document): document-aligned groups gathered into n_groups slots."""
  b, length = segment_ids_bl.shape
  t_l = jnp.arange(length, dtype=jnp.int32)
  prev_bl = jnp.concatenate([jnp.full((b, 1), -1, segment_ids_bl.dtype), segment_ids_bl[:, :-1]], axis=1)
  start_bl = (t_l == 0) | (segment_ids_bl != prev_bl) | (positions_bl % group_len == 0)
  gid_bl = jnp.cumsum(start_bl, axis=1, dtype=jnp.int32) - 1
  off_bl = t_l - jax.lax.cummax(jnp.where(start_bl, t_l, 0), axis=1)
  keep_bl = (gid_bl < n_groups) & (off_bl < group_len)
  rows = jnp.arange(b)[:, None]
  slot_g = jnp.where(start_bl & keep_bl, gid_bl, n_groups)  # out of range: dropped by the scatter
  first_bg = jnp.full((b, n_groups), length, jnp.int32).at[rows, slot_g].set(t_l[None, :], mode="drop")
  size_bg = jnp.zeros((b, n_groups), jnp.int32).at[rows, jnp.where(keep_bl, gid_bl, n_groups)].add(1, mode="drop")
  t_t = jnp.arange(group_len, dtype=jnp.int32)
  used_bgt = t_t < size_bg[:, :, None]
  src_bgt = jnp.where(used_bgt, first_bg[:, :, None] + t_t, 0)
  doc_bg = jnp.take_along_axis(segment_ids_bl, jnp.minimum(first_bg, length - 1), axis=1)
  doc_bg = jnp.where(size_bg > 0, doc_bg, 0)
  seg_bgt = jnp.take_along_axis(segment_ids_bl, src_bgt.reshape(b, -1), axis=1).reshape(src_bgt.shape)
  mask_bgt = used_bgt & (seg_bgt != 0)
  prev_doc_bg = jnp.concatenate([jnp.zeros((b, 1), doc_bg.dtype), doc_bg[:, :-1]], axis=1)
  continues_bg = (doc_bg != 0) & (doc_bg == prev_doc_bg)
  dst_bl = jnp.where(keep_bl, gid_bl * group_len + off_bl, 0)
  return Layout(mask_bgt, continues_bg, src_bgt, used_bgt, dst_bl, keep_bl)


@jax.custom_vjp
def _move(x_bnd: jax.Array, idx_bm: jax.Array, ok_bm: jax.Array, back_bn: jax.Array, back_ok_bn: jax.Array) -> jax.Array:
  """out[b, m] = x[b, idx[b, m]] where ok, else 0; `back`/`back_ok` is the inverse map.

  The map is one-to-one between the kept entries of both sides, so the cotangent is the same
  kind of gather in the other direction (autodiff would scatter-add, which XLA:CPU runs one
  element at a time).
  """
  y = jnp.take_along_axis(x_bnd, idx_bm[:, :, None], axis=1)
  return jnp.where(ok_bm[:, :, None], y, 0)


def _move_fwd(x, idx, ok, back, back_ok):
  return _move(x, idx, ok, back, back_ok), (idx, ok, back, back_ok)


def _move_bwd(res, g_bmd):
  idx, ok, back, back_ok = res
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return _move(g_bmd, back, back_ok, idx, ok), zero(idx), zero(ok), zero(back), zero(back_ok)


_move.defvjp(_move_fwd, _move_bwd)


def to_slots(x_bld: jax.Array, layout: Layout, group_len: int) -> jax.Array:
  """[B, L, D] -> [B, G, T, D]; slots without a token hold 0."""
  b, length, d = x_bld.shape
  if layout.src_bgt is None:
    return x_bld.reshape(b, length // group_len, group_len, d)
  _, g, t = layout.src_bgt.shape
  used = layout.src_ok_bgt.reshape(b, g * t)
  x = _move(x_bld, layout.src_bgt.reshape(b, g * t), used, layout.dst_bl, layout.keep_bl)
  return x.reshape(b, g, t, d)


def from_slots(y_bgtd: jax.Array, layout: Layout, length: int) -> jax.Array:
  """[B, G, T, D] -> [B, L, D]; tokens without a slot get 0."""
  b, g, t, d = y_bgtd.shape
  y = y_bgtd.reshape(b, g * t, d)
  if layout.dst_bl is None:
    return y
  return _move(y, layout.dst_bl, layout.keep_bl, layout.src_bgt.reshape(b, g * t), layout.src_ok_bgt.reshape(b, g * t))


def group_means(x_bgtd: jax.Array, mask_bgt: jax.Array) -> jax.Array:
  """Float32 [B, G, D]: mean layer input of every group's real tokens (0 for empty groups)."""
  m = mask_bgt.astype(jnp.float32)
  total = jnp.einsum("bgtd,bgt->bgd", x_bgtd.astype(jnp.float32), m)
  return total / jnp.maximum(jnp.sum(m, axis=-1), 1.0)[..., None]


def router_probs(mean_bgd: jax.Array, router_de: jax.Array) -> jax.Array:
  """softmax(mean @ router) in float32: [B, G, E]."""
  logits = project("bgd,de->bge", mean_bgd.astype(jnp.float32), router_de)
  return jax.nn.softmax(logits, axis=-1)


# -- first-segment rules -------------------------------------------------------------------------

FirstSegmentRule = Callable[[jax.Array], jax.Array]


@FIRST_SEGMENT.register("paper")
def paper_first_segment(own_probs_bge: jax.Array) -> jax.Array:
  """Lory: the first segment routes on its own mean; no gradient reaches the router from it."""
  return jax.lax.stop_gradient(own_probs_bge)


@FIRST_SEGMENT.register("uniform")
def uniform_first_segment(own_probs_bge: jax.Array) -> jax.Array:
  """Strictly causal: every expert weighs 1/E."""
  return jnp.full_like(own_probs_bge, 1.0 / own_probs_bge.shape[-1])


# -- granularities -------------------------------------------------------------------------------


class Granularity:
  """How long a group is and how its routing weights come from the groups' router probabilities."""

  @staticmethod
  def group_len(cfg: SoftMoEConfig, seq_len: int) -> int:
    raise NotImplementedError

  @staticmethod
  def weights(own_probs_bge: jax.Array, continues_bg: jax.Array, cfg: SoftMoEConfig, *, dropout_key: jax.Array | None) -> jax.Array:
    """Routing weights [B, G, E] (float32, rows sum to 1)."""
    raise NotImplementedError


@GRANULARITY.register("segment")
class SegmentGranularity(Granularity):
  """Lory: segment k uses the router probabilities of segment k-1 of the same document."""

  @staticmethod
  def group_len(cfg: SoftMoEConfig, seq_len: int) -> int:
    return min(cfg.segment_len, seq_len)

  @staticmethod
  def weights(own_probs_bge, continues_bg, cfg, *, dropout_key=None):
    prev_bge = jnp.concatenate([jnp.zeros_like(own_probs_bge[:, :1]), own_probs_bge[:, :-1]], axis=1)
    first_bge = FIRST_SEGMENT.get(cfg.first_segment)(own_probs_bge)
    w = jnp.where(continues_bg[..., None], prev_bge, first_bge)
    return expert_dropout(w, cfg.expert_dropout, dropout_key)


@GRANULARITY.register("sequence")
class SequenceGranularity(Granularity):
  """SMEAR: one routing per document from its own mean (with gradient)."""

  @staticmethod
  def group_len(cfg: SoftMoEConfig, seq_len: int) -> int:
    return seq_len

  @staticmethod
  def weights(own_probs_bge, continues_bg, cfg, *, dropout_key=None):
    del continues_bg
    return expert_dropout(own_probs_bge, cfg.expert_dropout, dropout_key)


def expert_dropout(w_bge: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """SMEAR expert dropout: zero each weight with probability `rate`, renormalise (training only).

  A group whose every weight was dropped keeps its weights.
  """
  if key is None or rate == 0:
    return w_bge
  keep = jax.random.bernoulli(key, 1.0 - rate, w_bge.shape)
  kept = jnp.where(keep, w_bge, 0.0)
  total = jnp.sum(kept, axis=-1, keepdims=True)
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), w_bge)


# -- metrics -------------------------------------------------------------------------------------


def routing_metrics(w_bge: jax.Array, mask_bgt: jax.Array, keep_bl: jax.Array | None, valid_bl: jax.Array | None) -> dict[str, jax.Array]:
  """Token-weighted over real tokens: routing entropy, experts activated (weight > 2/E, the
  Lory paper's count), mean routing weight per expert [E], fraction of tokens without a slot."""
  e = w_bge.shape[-1]
  w = jax.lax.stop_gradient(w_bge)
  n_bg = jnp.sum(mask_bgt, axis=-1).astype(jnp.float32)
  total = jnp.maximum(jnp.sum(n_bg), 1.0)
  entropy_bg = -jnp.sum(w * jnp.log(jnp.maximum(w, 1e-30)), axis=-1)
  active_bg = jnp.sum(w > 2.0 / e, axis=-1).astype(jnp.float32)
  metrics = {
      "soft_moe_entropy": jnp.sum(entropy_bg * n_bg) / total,
      "soft_moe_activated": jnp.sum(active_bg * n_bg) / total,
      "soft_moe_routing": jnp.einsum("bge,bg->e", w, n_bg) / total,
  }
  dropped = jnp.float32(0)
  if keep_bl is not None:
    valid = jnp.ones_like(keep_bl) if valid_bl is None else valid_bl
    dropped = jnp.sum(valid & ~keep_bl).astype(jnp.float32) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  metrics["soft_moe_dropped"] = dropped
  return metrics
