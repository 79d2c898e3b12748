"""The routed experts of one device's tokens: route -> dispatch -> grouped matmul -> combine.

`routed_local` is the whole sparse part of the layer for the tokens a device holds. Without
expert parallelism (`ep.size == 1`) it needs no communication. With it, each device holds
E / ep experts and the dispatch exchanges rows with an all-to-all over the expert mesh axis
(`jaxlm.layers.moe.parallel`); the result is the same as on one device.

Paths, chosen by the config:
  capacity (mode="capacity" or router="expert_choice")   fixed [E, sequences, C] slots; with
      expert parallelism the slot buffer is split over devices as [ep, E/ep, ...] and sent
      with one all-to-all each way (bytes = capacity factor x the minimum).
  dropless, one device   sort by expert, grouped matmul, unsort, combine.
  dropless, ep > 1       rows grouped by destination device and exchanged with a ragged
      all-to-all (TPU/GPU), or a padded all-to-all on CPU whose chunks hold every row a device
      could send (dropless must allow all tokens to pick one device's experts).
      (exchange.py)

Adapter gates. When the experts carry a bank of adapters chosen per example (`jaxlm.peft`,
`use_adapter`), each token's gates [N] are appended to its row as N extra columns before the
dispatch, so they follow the row through sorting, capacity slots and all-to-alls, and the
grouped matmul splits them off (`gmm.run_experts`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.config import MoEConfig
from jaxlm.layers.experts import ExpertWeights
from jaxlm.layers.moe import exchange, gw
from jaxlm.layers.moe import layout as lay
from jaxlm.layers.moe.exchange import NO_EXPERT_AXIS, ExpertAxis
from jaxlm.layers.moe.gmm import block_rows_for, run_experts
from jaxlm.layers.moe.losses import Stats, router_stats
from jaxlm.layers.moe.routing import ROUTERS, Routing, capacity, router_logits


def routed_local(
    x_bld: jax.Array,
    mask_bl: jax.Array,
    router_de: jax.Array,
    experts: ExpertWeights,
    *,
    cfg: MoEConfig,
    backend: str,
    bias_e: jax.Array | None = None,
    jitter_bld: jax.Array | None = None,
    gates_bln: jax.Array | None = None,
    ep: ExpertAxis = NO_EXPERT_AXIS,
) -> tuple[jax.Array, Stats]:
  """(y [B, L, D] of the routed experts, this device's router stats; stats[SELECTED] [B, L, E]
  marks each token's chosen experts).

  `gates_bln`: per-token gates over a bank of expert adapters (or None).
  """
  b, l, d = x_bld.shape
  t = b * l
  logits_ble = router_logits(x_bld, router_de, jitter_bld)
  routing = ROUTERS.get(cfg.router)(logits_ble, cfg, mask_bl=mask_bl, bias_e=bias_e)
  selected, workspace = routing, None
  if cfg.gw_threshold > 0:  # GW-MoE (training): uncertain tokens leave their top-k for every expert (gw.py)
    routing, workspace = gw.split(routing, mask_bl, cfg)
  x_td = x_bld.reshape(t, d)
  n_gates = 0
  if gates_bln is not None:
    n_gates = gates_bln.shape[-1]
    x_td = jnp.concatenate([x_td, gates_bln.reshape(t, n_gates).astype(x_td.dtype)], axis=1)
  run = lambda x_md, sizes, block=1: run_experts(x_md, experts, sizes, backend=backend, block_rows=block, n_gates=n_gates)
  if cfg.mode == "capacity" or cfg.router == "expert_choice":
    layout = lay.capacity_layout(routing.expert_n, routing.token_n // l, cfg.n_experts, b, capacity(l, cfg))
    y_nd = _capacity(x_td, routing, layout, run, ep, experts.n_experts)
  elif ep.size == 1:
    block = block_rows_for(backend, routing.expert_n.shape[0], cfg.n_experts, cfg.block_rows)
    layout = lay.dropless_layout(routing.expert_n, cfg.n_experts, block)
    x_md = lay.dispatch(x_td, layout, routing.token_n)
    y_nd = lay.gather_rows(run(x_md, layout.group_sizes_e, block), layout)
  else:
    exchange_fn = exchange.dropless_ragged if ep.ragged else exchange.dropless_padded
    layout, y_nd = exchange_fn(x_td, routing, experts, ep, cfg=cfg, backend=backend, n_gates=n_gates)
  y_td = lay.combine(y_nd, routing, t)
  stats = router_stats(logits_ble.reshape(t, -1), selected, mask_bl.reshape(t), lay.dropped(layout, routing.expert_n, cfg.n_experts))
  if workspace is not None:
    y_td = y_td + gw.all_experts(x_td, workspace, run, experts.n_experts, ep)
    stats["gw_tokens"] = workspace.count(t)
  stats[SELECTED] = selected_experts(selected, t, cfg.n_experts).reshape(b, l, -1)
  return y_td.reshape(b, l, d), stats


def _capacity(x_td: jax.Array, routing: Routing, layout: lay.Layout, run, ep: ExpertAxis, e_loc: int) -> jax.Array:
  """Fixed-slot dispatch; the [E, G*C] slot buffer is split over devices as [ep, E_loc, G*C]."""
  x_md = lay.dispatch(x_td, layout, routing.token_n)
  if ep.size > 1:
    x_md = _swap_device_expert(jax.lax.all_to_all(x_md, ep.name, 0, 0, tiled=True), ep.size, e_loc)
    y_md = run(x_md, None)
    y_md = jax.lax.all_to_all(_swap_device_expert(y_md, e_loc, ep.size), ep.name, 0, 0, tiled=True)
  else:
    y_md = run(x_md, None)
  return lay.gather_rows(y_md, layout)


def _swap_device_expert(x_md: jax.Array, n_outer: int, n_inner: int) -> jax.Array:
  """Rows [outer, inner, S] -> [inner, outer, S]: after the exchange, received slots are
  [source device, local expert, S]; the expert matmul wants each local expert's slots together."""
  d = x_md.shape[-1]
  return x_md.reshape(n_outer, n_inner, -1, d).swapaxes(0, 1).reshape(-1, d)


SELECTED = "selected_ble"  # the stats entry that is per token, not a sum: never added over devices


def selected_experts(routing: Routing, n_tokens: int, n_experts: int) -> jax.Array:
  """float32 [T, E]: 1 where the router chose expert e for token t (its top-k, before capacity
  drops; padding tokens choose none), for layers built on the routing (HyperMoE, `moe.hyper`)."""
  chosen_te = jnp.zeros((n_tokens, n_experts + 1), jnp.float32).at[routing.token_n, routing.expert_n].max(1.0)
  return jax.lax.stop_gradient(chosen_te[:, :n_experts])
