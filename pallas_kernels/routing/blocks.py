"""What both routing kernels share: per-block top-k math and the global dispatch order.

Both routing kernels process tokens in independent blocks of `block_t` rows (so the grid is
parallel on TPU megacore and GPU SMs alike). Each block reports, per expert, how many of its
tokens chose that expert (`block_counts`), and per assignment, how many earlier tokens *of the
same block* chose the same expert (`rank`). Because a token picks an expert at most once, the
stable position of assignment (t, j) with expert e among all assignments sorted by expert is

    start[e] + (tokens of earlier blocks that chose e) + rank[t, j],

with `start` the exclusive cumulative sum of the group sizes. This module does that O(T*k)
arithmetic in XLA and inverts the positions into `sort_perm` with one scatter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.routing.reference import Routing


def pick_topk(
    select_te: jax.Array, score_te: jax.Array, k: int, iota_te: jax.Array, iota_tk: jax.Array
) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
  """k rounds of row-wise (max, lowest lane holding it) over experts not yet chosen.

  Uses only elementwise ops and row reductions, so it lowers with Mosaic and Triton alike.

  Args:
    select_te: [t,e] float32 selection scores (padding lanes must hold -inf).
    score_te: [t,e] float32 weight scores.
    k: picks per row.
    iota_te: [t,e] int32 lane (expert) index.
    iota_tk: [t,kk] int32 slot index, kk >= k (extra slots stay 0).

  Returns:
    (ids [t,kk] int32, picked scores [t,kk] float32, the k one-hot [t,e] bool masks).
  """
  num_lanes = select_te.shape[1]
  chosen = jnp.zeros(select_te.shape, jnp.bool_)
  ids = jnp.zeros(iota_tk.shape, jnp.int32)
  vals = jnp.zeros(iota_tk.shape, jnp.float32)
  hits = []
  for j in range(k):
    avail = jnp.where(chosen, -jnp.inf, select_te)
    best = jnp.max(avail, axis=1, keepdims=True)
    lane = jnp.min(
        jnp.where(jnp.logical_and(avail == best, jnp.logical_not(chosen)), iota_te, num_lanes),
        axis=1,
        keepdims=True,
    )
    hit = iota_te == lane
    val = jnp.sum(jnp.where(hit, score_te, 0.0), axis=1, keepdims=True)
    ids = jnp.where(iota_tk == j, lane, ids)
    vals = jnp.where(iota_tk == j, val, vals)
    chosen = jnp.logical_or(chosen, hit)
    hits.append(hit)
  return ids, vals, hits


def finish_weights(vals_tk: jax.Array, valid_tk: jax.Array, mode: str, renormalize: bool):
  """Weights from the picked scores; `valid_tk` masks slots past k (GPU lane padding)."""
  if mode == "topk_softmax":
    best = jnp.max(jnp.where(valid_tk, vals_tk, -jnp.inf), axis=1, keepdims=True)
    e = jnp.where(valid_tk, jnp.exp(vals_tk - best), 0.0)
    return e / jnp.sum(e, axis=1, keepdims=True)
  if renormalize:
    return vals_tk / jnp.sum(jnp.where(valid_tk, vals_tk, 0.0), axis=1, keepdims=True)
  return vals_tk


def assemble(
    expert_ids_tk: jax.Array,
    weights_tk: jax.Array,
    rank_tk: jax.Array,
    block_counts_be: jax.Array,
    block_t: int,
) -> Routing:
  """The `Routing` of a blocked routing kernel.

  Args:
    expert_ids_tk: [T,k] int32 chosen experts.
    weights_tk: [T,k] float32 weights.
    rank_tk: [T,k] int32, earlier tokens of the same block that chose the same expert.
    block_counts_be: [ceil(T/block_t), E] int32, per block, tokens that chose each expert.
    block_t: the kernel's token block.
  """
  num_tokens, k = expert_ids_tk.shape
  group_sizes = jnp.sum(block_counts_be, axis=0, dtype=jnp.int32)
  block_start_be = jnp.cumsum(block_counts_be, axis=0, dtype=jnp.int32) - block_counts_be
  expert_start_e = jnp.cumsum(group_sizes, dtype=jnp.int32) - group_sizes
  block_t1 = (jnp.arange(num_tokens, dtype=jnp.int32) // block_t)[:, None]
  position_tk = expert_start_e[expert_ids_tk] + block_start_be[block_t1, expert_ids_tk] + rank_tk
  flat = jnp.arange(num_tokens * k, dtype=jnp.int32)
  sort_perm = jnp.zeros_like(flat).at[position_tk.reshape(-1)].set(flat, unique_indices=True)
  return Routing(expert_ids_tk, weights_tk, group_sizes, sort_perm)
