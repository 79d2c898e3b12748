"""Dispatch and combine: where each assignment's row sits in the expert-sorted buffer.

A `Layout` maps the N assignments of a `Routing` to rows of a buffer of `n_rows` rows in which
each expert's rows are contiguous and the experts come in order; `group_sizes_e` are the rows
each expert owns (padding included), None when every expert owns n_rows / E rows (the grouped
matmul's convention for the [E, C, D] capacity buffer). Row `n_rows` means "dropped": dispatch
reads a zero row for it and combine adds nothing. Two layouts:

  dropless_layout   sort by expert (stable: earlier assignments first); each expert's group is
                    padded to a multiple of `multiple` rows (1 for ragged_dot / pallas; a block
                    for capacity_einsum). Nothing is dropped.
  capacity_layout   fixed slots: C rows per (expert, sequence), rows ordered (expert, sequence,
                    slot). Within a sequence, slots go to assignments in (token, k) order, so
                    token t only competes with tokens <= t of its own sequence (routing stays
                    causal, and the result does not depend on the rest of the batch or the mesh).
                    The assignments past an expert's C-th are DROPPED: the token gets no
                    contribution from that expert (it keeps its other experts, the shared
                    experts and the residual), and the dropped fraction is logged.

Dispatch gathers x rows into the buffer; combine gathers buffer rows back per assignment and
sums them per token with the routing weights (einsum over k for token choice).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.layers.moe.routing import Routing


@dataclasses.dataclass(frozen=True)
class Layout:
  row_n: jax.Array  # int32 [N]: buffer row of each assignment; n_rows = dropped
  group_sizes_e: jax.Array | None  # int32 [E]: buffer rows owned by each expert (contiguous, in order); None: n_rows / E each
  n_rows: int  # static buffer size M


def _rank_in_key(key_n: jax.Array, n_keys: int) -> tuple[jax.Array, jax.Array]:
  """(rank of each n among the n with the same key, in order of n; count per key). key = n_keys: ignored."""
  n = key_n.shape[0]
  order = jnp.argsort(key_n, stable=True)
  pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)
  counts = jax.ops.segment_sum(jnp.ones((n,), jnp.int32), key_n, num_segments=n_keys)
  starts = jnp.cumsum(counts) - counts
  return pos - jnp.take(starts, key_n, mode="fill", fill_value=0), counts


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def dropless_layout(expert_n: jax.Array, n_experts: int, multiple: int = 1) -> Layout:
  """Rows sorted by expert; each expert's group padded to a multiple of `multiple` rows."""
  n = expert_n.shape[0]
  rank, counts = _rank_in_key(expert_n, n_experts)
  sizes = -(-counts // multiple) * multiple
  starts = jnp.cumsum(sizes) - sizes
  m = n if multiple == 1 else round_up(n + n_experts * (multiple - 1), multiple)
  valid = expert_n < n_experts
  row = jnp.where(valid, jnp.take(starts, expert_n, mode="fill", fill_value=0) + rank, m)
  return Layout(row.astype(jnp.int32), sizes.astype(jnp.int32), m)


def capacity_layout(expert_n: jax.Array, group_n: jax.Array, n_experts: int, n_groups: int, capacity: int) -> Layout:
  """C rows per (expert, group), ordered (expert, group, slot); overflow dropped."""
  valid = expert_n < n_experts
  key = jnp.where(valid, expert_n * n_groups + group_n, n_experts * n_groups)
  rank, _ = _rank_in_key(key, n_experts * n_groups)
  m = n_experts * n_groups * capacity
  keep = valid & (rank < capacity)
  row = jnp.where(keep, key * capacity + rank, m)
  return Layout(row.astype(jnp.int32), None, m)


def source_rows(layout: Layout, token_n: jax.Array, n_tokens: int) -> jax.Array:
  """int32 [M]: the token each buffer row reads (n_tokens: a padding row)."""
  return jnp.full((layout.n_rows,), n_tokens, jnp.int32).at[layout.row_n].set(token_n, mode="drop", unique_indices=True)


def dispatch(x_td: jax.Array, layout: Layout, token_n: jax.Array) -> jax.Array:
  """[M, D] buffer: row m holds the token routed there (zeros in padding rows)."""
  src = source_rows(layout, token_n, x_td.shape[0])
  return jnp.take(x_td, src, axis=0, mode="fill", fill_value=0)


def gather_rows(y_md: jax.Array, layout: Layout) -> jax.Array:
  """[N, D]: each assignment's output row (zeros for dropped assignments)."""
  return jnp.take(y_md, layout.row_n, axis=0, mode="fill", fill_value=0)


def combine(y_nd: jax.Array, routing: Routing, n_tokens: int) -> jax.Array:
  """[T, D] = sum over each token's assignments of weight * expert output (float32 weights)."""
  w_n = routing.weight_n.astype(y_nd.dtype)
  if routing.top_k is not None:
    k = routing.top_k
    return jnp.einsum("tkd,tk->td", y_nd.reshape(n_tokens, k, -1), w_n.reshape(n_tokens, k))
  return jax.ops.segment_sum(y_nd * w_n[:, None], routing.token_n, num_segments=n_tokens)


def dropped(layout: Layout, expert_n: jax.Array, n_experts: int) -> jax.Array:
  """Number of real assignments (not padding) that the layout drops."""
  return jnp.sum((expert_n < n_experts) & (layout.row_n >= layout.n_rows))
