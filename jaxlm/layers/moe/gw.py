"""GW-MoE: in fine-tuning, tokens with an uncertain routing go to every expert.

Haoze Wu, Zihan Qiu, Zili Wang, Hang Zhao, Jie Fu, "GW-MoE: Resolving Uncertainty in MoE Router
with Global Workspace Theory", arXiv 2406.12375 (2024); code: github.com/WaitHZ/GW-MoE.

A token whose router distribution p over the E experts is nearly flat is *uncertain*: its top-k
choice is close to arbitrary, and at inference it may land on experts that never learned what it
needs. GW-MoE measures the uncertainty by the entropy H(p) = -sum_e p_e log p_e and, while
fine-tuning only, "broadcasts" each uncertain token to all experts (as the global workspace of
Baars' theory broadcasts its content to every module), combined by its router probabilities:

    training   y(x) = sum_{e=1..E} p_e(x) SwiGLU_e(x)         if H(p(x)) / log E >= threshold
               y(x) = sum_{e in topk(x)} w_e(x) SwiGLU_e(x)    otherwise (the plain MoE)
    inference  the plain MoE for every token: as sparse and as cheap as before

so every expert learns to serve the tokens the router is unsure about, and whichever expert it
picks at inference has what they need. `model.eval()` (`MoE.deterministic`) turns GW off; the
pure `moe(params, x, cfg)` broadcasts whenever `cfg.moe.gw_threshold > 0`: evaluate it with
`without(cfg)`.

Choices, where the paper leaves them open or where this departs from its code:
  threshold  a fixed hyperparameter in the paper; the released scripts use 1.6 nats (GLUE) and
             1.8 nats (summarisation) on Switch-base-8 (E = 8: 0.77 and 0.87 of the largest
             entropy log 8 = 2.08). Here `moe.gw_threshold` is that fraction of log E, in (0, 1),
             so that one value means the same for any E; H / log E >= threshold is uncertain
             (>=, as the code). Entropy exactly (the code adds 1e-5 inside the log), of the
             probabilities the router routed with (after jitter; for the sigmoid_bias router its
             affinities normalised to sum 1).
  slots      the released code caps the broadcast tokens of each sequence (`max_num_slots`, 1 to
             32 in its scripts: the workspace has a limited capacity), taking the first uncertain
             ones in sequence order. `moe.gw_slots` is that cap (0: none). First-in-order keeps
             the layer causal: whether token t is broadcast depends on tokens <= t of its row.
  weights    p_e times `route_scale` (the router's own weights with k = E when it renormalises);
             the gradient reaches the router through them, as in the code. (The released Switch
             code's loop writes p_e * x for each expert in turn, neither calling the expert nor
             summing: we take that for a slip and follow the stated sum_e p_e E_e(x).)
  losses     the load-balancing loss, z-loss and router metrics are those of the router's top-k
             choice, not of the broadcast (the code's balance loss also reads the top-1 choice);
             the metric `moe_gw_broadcast_fraction` is the fraction of tokens broadcast.
  capacity   a broadcast token leaves its top-k assignments (freeing their capacity slots: the
             code leaves them occupied and zeroes their output) and reaches every expert
             whatever the capacity, as in the code.

Cost and layout. Shapes are static, so the broadcast runs over S = gw_slots (or L) slots per
sequence whether or not they fill: a dense pass of E x B x S rows (the [E, C, D] layout of the
grouped matmul with C = B S) next to the plain sparse pass, whose broadcast tokens' assignments
become the dropped sentinel. With expert parallelism each device holds E / ep experts: the slots
are all-gathered over the expert axis (every device's experts see every broadcast token), each
device combines its experts' outputs with their weights, and a reduce-scatter sums the partial
combinations back to the slots' devices: ep x S x D rows each way per sequence, with no padding.
Appending the E x S assignments to the flat routing instead (one sparse pass, measured and
dropped) was slower: the sort and the block padding grow, and the padded all-to-all sends ep x
every row. Layer forward + backward, 16 x 128 tokens, D 128, top-2 of 8 experts of width 192,
8 slots, 2-core CPU, GW / plain: 1.07 dense pass vs 1.11 flat on one device; 1.00 vs 1.29 with
the experts over 8 devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.layers.moe.exchange import ExpertAxis
from jaxlm.layers.moe.routing import Routing


@dataclasses.dataclass(frozen=True)
class Broadcast:
  """The workspace: S slots per sequence, each holding one uncertain token or nothing."""

  token_s: jax.Array  # int32 [B*S]: the token in each slot, an index into the B*L tokens (B*L: empty)
  weight_se: jax.Array  # float32 [B*S, E]: its combine weight for every expert (0 in empty slots)

  def count(self, n_tokens: int) -> jax.Array:
    """Number of tokens broadcast (filled slots), float32."""
    return jnp.sum(self.token_s < n_tokens).astype(jnp.float32)


def without(cfg: ModelConfig) -> ModelConfig:
  """The same config with GW-MoE off: the layer as evaluated and served."""
  if not cfg.moe.gw_threshold:
    return cfg
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, gw_threshold=0.0))


def normalized_entropy(probs_te: jax.Array) -> jax.Array:
  """H(p) / log E per token, float32 [T] in [0, 1] (0 log 0 = 0; E = 1: 0)."""
  e = probs_te.shape[-1]
  p = jax.lax.stop_gradient(probs_te.astype(jnp.float32))
  h_t = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return h_t / math.log(e) if e > 1 else jnp.zeros_like(h_t)


def workspace(uncertain_bl: jax.Array, slots: int) -> jax.Array:
  """int32 [B*S]: the first S uncertain tokens of each sequence (S = slots, or L when 0), as
  indices into the B*L tokens, in sequence order; B*L marks an empty slot."""
  b, l = uncertain_bl.shape
  s = min(slots, l) if slots else l
  rank_bl = jnp.cumsum(uncertain_bl.astype(jnp.int32), axis=1) - 1
  chosen_bl = uncertain_bl & (rank_bl < s)
  slot_bl = jnp.where(chosen_bl, jnp.arange(b, dtype=jnp.int32)[:, None] * s + rank_bl, b * s)
  token_bl = jnp.arange(b * l, dtype=jnp.int32).reshape(b, l)
  return jnp.full((b * s,), b * l, jnp.int32).at[slot_bl.reshape(-1)].set(token_bl.reshape(-1), mode="drop")


def split(routing: Routing, mask_bl: jax.Array, cfg: MoEConfig) -> tuple[Routing, Broadcast]:
  """(the sparse routing without the broadcast tokens, the broadcast tokens and their weights).

  Token choice only (assignments in (token, k) order); a broadcast token's k assignments get the
  dropped sentinel expert E and weight 0.
  """
  b, l = mask_bl.shape
  t, e, k = b * l, cfg.n_experts, routing.top_k
  if k is None:
    raise ValueError("GW-MoE needs token-choice routing (assignments in (token, k) order)")
  uncertain_bl = (normalized_entropy(routing.probs_te).reshape(b, l) >= cfg.gw_threshold) & mask_bl
  token_s = workspace(uncertain_bl, cfg.gw_slots)
  broadcast_t = jnp.zeros((t,), bool).at[token_s].set(True, mode="drop")
  broadcast_n = jnp.repeat(broadcast_t, k)
  sparse = dataclasses.replace(
      routing,
      expert_n=jnp.where(broadcast_n, e, routing.expert_n).astype(jnp.int32),
      weight_n=jnp.where(broadcast_n, 0.0, routing.weight_n),
  )
  weight_se = jnp.take(routing.probs_te.astype(jnp.float32), token_s, axis=0, mode="fill", fill_value=0) * cfg.route_scale
  return sparse, Broadcast(token_s, weight_se)


def all_experts(x_td: jax.Array, ws: Broadcast, run: Callable[[jax.Array, None], jax.Array], e_loc: int, ep: ExpertAxis) -> jax.Array:
  """[T, D]: sum_e weight_e SwiGLU_e(x) for the broadcast tokens, zeros elsewhere.

  `run(x_md, None)` applies this device's e_loc experts to equal groups of rows (the capacity
  layout); with ep > 1 it runs inside the shard_map of `parallel.routed_experts`.
  """
  t = x_td.shape[0]
  x_sd = jnp.take(x_td, ws.token_s, axis=0, mode="fill", fill_value=0)  # [S, D] (S: all slots of this device)
  w_se = ws.weight_se
  if ep.size > 1:  # every device's slots, and their weights for this device's experts
    x_sd = jax.lax.all_gather(x_sd, ep.name, axis=0, tiled=True)  # [ep*S, D], in device order
    w_se = jax.lax.all_to_all(w_se, ep.name, 1, 0, tiled=True)  # [ep*S, E_loc]
  r, d = x_sd.shape
  y_md = run(jnp.broadcast_to(x_sd[None], (e_loc, r, d)).reshape(e_loc * r, d), None)
  y_sd = jnp.einsum("erd,re->rd", y_md.reshape(e_loc, r, -1), w_se.astype(y_md.dtype))
  if ep.size > 1:  # sum the partial combinations over the devices' experts, back to each slot's device
    y_sd = jax.lax.psum_scatter(y_sd, ep.name, scatter_dimension=0, tiled=True)
  return jnp.zeros((t, y_sd.shape[-1]), y_sd.dtype).at[ws.token_s].add(y_sd, mode="drop")
