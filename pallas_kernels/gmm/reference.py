"""Grouped matmul in plain jnp: the specification the kernels are tested against.

Letters: M rows (token-expert assignments sorted by expert), K contraction, N output
features, E groups (experts).

The rows of `x_mk` are split into E consecutive groups: group e holds rows
[sum(group_sizes[:e]), sum(group_sizes[:e+1])). Rows past sum(group_sizes) belong to no group.

* grouped_matmul:  y[m] = x[m] @ w[e(m)]          -> [M,N]; rows in no group are 0.
* transposed_grouped_matmul (tgmm, the weight gradient):
                   g[e] = x[rows of e].T @ dy[rows of e]  -> [E,K,N]; empty groups are 0.

Products accumulate in float32; the result is cast to `preferred_element_type` (default: the
dtype of x). Group sizes are assumed non-negative with sum <= M (`ops` checks this when the
sizes are concrete, and clips traced sizes the same way as `common.clip_group_sizes`).

These are dense formulations (a one-hot [M,E] mask), E times the useful FLOPs: a spec, not a
fast path. The fast XLA path is `jax.lax.ragged_dot` (`ops`, implementation="xla").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def group_one_hot(group_sizes_e: jax.Array, num_rows: int, dtype: Any) -> jax.Array:
  """[M,E] one-hot group membership of each row (all-zero rows past the last group)."""
  ends = jnp.cumsum(group_sizes_e)
  row = jnp.arange(num_rows)[:, None]
  return ((row >= ends - group_sizes_e) & (row < ends)).astype(dtype)


def grouped_matmul_reference(
    x_mk: jax.Array,
    w_ekn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    preferred_element_type: Any = None,
) -> jax.Array:
  """y[m] = x[m] @ w[group of m]; [M,K] x [E,K,N] -> [M,N], zero rows past the groups."""
  member_me = group_one_hot(group_sizes_e, x_mk.shape[0], jnp.float32)
  y_men = jnp.einsum(
      "mk,ekn->men", x_mk, w_ekn, preferred_element_type=jnp.float32
  )
  y = jnp.einsum("men,me->mn", y_men, member_me)
  return y.astype(preferred_element_type or x_mk.dtype)


def transposed_grouped_matmul_reference(
    x_mk: jax.Array,
    dy_mn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    preferred_element_type: Any = None,
) -> jax.Array:
  """g[e] = x[rows of e].T @ dy[rows of e]; [M,K] x [M,N] -> [E,K,N]."""
  member_me = group_one_hot(group_sizes_e, x_mk.shape[0], jnp.float32)
  x_mek = member_me[:, :, None] * x_mk.astype(jnp.float32)[:, None, :]
  g = jnp.einsum(
      "mek,mn->ekn", x_mek, dy_mn.astype(jnp.float32), preferred_element_type=jnp.float32
  )
  return g.astype(preferred_element_type or x_mk.dtype)
