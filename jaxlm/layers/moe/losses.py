"""Auxiliary losses and metrics of the router, from batch-global sums.

Every quantity is first reduced to a few sums over the (valid) tokens of a device; the sums are
added over the devices that split the batch; the losses and metrics are computed from the
totals. So a sharded layer reports exactly what one device would on the whole batch.

  load balance   Switch (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e, f_e the fraction of
                 routed assignments sent to expert e (top-k: counted over all k choices,
                 before capacity drops), P_e the mean router probability of expert e. 1 at
                 perfect balance; its gradient flows through P_e only.
  router z-loss  ST-MoE (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.
  gate score     ESFT (Wang et al. 2024, eq. 6): mean over tokens of each expert's gate value,
                 its router probability where the token's routing chose it and 0 elsewhere
                 (`moe_gate_score`; `moe_expert_load` is the selection ratio, eq. 7).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxlm.config import MoEConfig
from jaxlm.layers.moe.routing import Routing

Stats = dict[str, jax.Array]


def router_stats(logits_te: jax.Array, routing: Routing, mask_t: jax.Array, n_dropped: jax.Array) -> Stats:
  """Sums over this device's valid tokens (float32)."""
  e = logits_te.shape[-1]
  m = mask_t.astype(jnp.float32)
  logits_te = logits_te.astype(jnp.float32)
  lse_t = jax.nn.logsumexp(logits_te, axis=-1)
  probs_te = jax.nn.softmax(logits_te, axis=-1)
  entropy_t = -jnp.sum(probs_te * jax.nn.log_softmax(logits_te, axis=-1), axis=-1)
  counts_e = jax.ops.segment_sum(jnp.ones_like(routing.expert_n, jnp.float32), routing.expert_n, num_segments=e)
  # Each assignment's router probability (dropped assignments, expert E, fall out of the sum).
  gate_n = jax.lax.stop_gradient(routing.probs_te)[routing.token_n, jnp.minimum(routing.expert_n, e - 1)]
  return {
      "tokens": jnp.sum(m),
      "assignments": jnp.sum(counts_e),
      "counts_e": jax.lax.stop_gradient(counts_e),
      "prob_sum_e": jnp.sum(routing.probs_te * m[:, None], axis=0),
      "gate_sum_e": jax.ops.segment_sum(gate_n, routing.expert_n, num_segments=e),
      "z_sum": jnp.sum(lse_t * lse_t * m),
      "entropy_sum": jax.lax.stop_gradient(jnp.sum(entropy_t * m)),
      "dropped": jax.lax.stop_gradient(n_dropped.astype(jnp.float32)),
  }


def psum_stats(stats: Stats, axes: Sequence[str]) -> Stats:
  return jax.tree.map(lambda s: jax.lax.psum(s, tuple(axes)), stats) if axes else stats


def load_balance_loss(counts_e: jax.Array, prob_sum_e: jax.Array, n_tokens: jax.Array) -> jax.Array:
  """E * sum_e f_e * P_e (Switch Transformer, Fedus et al. 2021)."""
  e = counts_e.shape[0]
  f_e = jax.lax.stop_gradient(counts_e / jnp.maximum(jnp.sum(counts_e), 1.0))
  p_e = prob_sum_e / jnp.maximum(n_tokens, 1.0)
  return e * jnp.sum(f_e * p_e)


def router_z_loss(z_sum: jax.Array, n_tokens: jax.Array) -> jax.Array:
  """mean(logsumexp(logits)^2) (ST-MoE, Zoph et al. 2022)."""
  return z_sum / jnp.maximum(n_tokens, 1.0)


def expert_load(stats: Stats) -> jax.Array:
  """Fraction of the routed assignments that went to each expert, [E]."""
  return stats["counts_e"] / jnp.maximum(jnp.sum(stats["counts_e"]), 1.0)


def aux_from_stats(stats: Stats, cfg: MoEConfig) -> dict[str, dict[str, jax.Array]]:
  """The layer's aux: weighted losses (summed over layers by the model) and metrics."""
  n = stats["tokens"]
  return {
      "losses": {
          "moe_load_balance": cfg.load_balance_weight * load_balance_loss(stats["counts_e"], stats["prob_sum_e"], n),
          "moe_router_z": cfg.router_z_weight * router_z_loss(stats["z_sum"], n),
      },
      "metrics": {
          "moe_expert_load": expert_load(stats),
          "moe_gate_score": stats["gate_sum_e"] / jnp.maximum(n, 1.0),
          "moe_dropped_fraction": stats["dropped"] / jnp.maximum(stats["assignments"], 1.0),
          "moe_router_entropy": stats["entropy_sum"] / jnp.maximum(n, 1.0),
          **({"moe_gw_broadcast_fraction": stats["gw_tokens"] / jnp.maximum(n, 1.0)} if "gw_tokens" in stats else {}),  # GW-MoE (gw.py)
      },
  }
