"""Routing: router logits -> (token, expert, weight) assignments. All math in float32.

A router is a registered function with one signature,

    route(logits_ble, cfg, *, mask_bl, bias_e) -> Routing

over the router logits of B sequences of L tokens (float32). It returns flat assignments:
assignment n sends token `token_n[n]` (an index into the B*L tokens) to expert `expert_n[n]`
with combine weight `weight_n[n]`. Token-choice routers produce N = T*K assignments in (t, k)
order; expert-choice produces N = B*E*C in (b, e, c) order. Assignments of padding tokens
(mask false) get the sentinel expert E and are dropped by every dispatch.

Kinds:
  softmax_topk   p = softmax(logits); the top-k experts of p, weights p_k (renormalised over
                 the k chosen when cfg.renormalize: Mixtral, Qwen-MoE; Switch/GShard without).
  sigmoid_bias   DeepSeek-V3 (2024, Sec. 2.1.2): s = sigmoid(logits); experts chosen by the
                 top-k of s + b with a per-expert bias b that only steers selection; weights
                 s_k / sum_k s_k (renormalize) times cfg.route_scale. b is non-trainable state
                 updated by `update_bias` after each training step.
  expert_choice  Zhou et al. 2022: each expert takes its top-C tokens of each sequence by
                 softmax score. A token's routing depends on later tokens, so it is refused in
                 a causal decoder unless cfg.allow_noncausal_routing.
  hard_topk      EMoE (Qiu et al. 2023, arXiv 2310.10908, "avg-k gating"): the top-k experts
                 by logit, each with combine weight 1 (times cfg.route_scale): the chosen
                 experts' outputs are summed, unweighted, so the router only selects and gets
                 no gradient from the loss (cfg.renormalize does not apply). probs_te is
                 softmax(logits), for the balance loss and the metrics.

`avg_keys(w_gate)` is EMoE's router: each expert's mean key (its mean w_gate column), used in
place of a trained router when cfg.router_from_keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxlm.config import MoEConfig
from jaxlm.layers.linear import project
from jaxlm.registry import Registry


@dataclasses.dataclass(frozen=True)
class Routing:
  """Flat assignments plus what the losses and metrics need."""

  expert_n: jax.Array  # int32 [N]: expert of each assignment (E: dropped, e.g. padding)
  token_n: jax.Array  # int32 [N]: token of each assignment, an index into the B*L tokens
  weight_n: jax.Array  # float32 [N]: combine weight
  probs_te: jax.Array  # float32 [T, E]: router probabilities used by the load-balancing loss
  top_k: int | None  # K when assignments are in (token, k) order (token choice); None otherwise


Router = Callable[..., Routing]
ROUTERS: Registry = Registry("router")


def capacity(seq_len: int, cfg: MoEConfig) -> int:
  """Slots per expert and sequence: ceil(cf * L * K / E), between 1 and L (GShard, Switch)."""
  return max(1, min(seq_len, math.ceil(cfg.capacity_factor * seq_len * cfg.top_k / cfg.n_experts)))


def _token_choice(expert_tk: jax.Array, weight_tk: jax.Array, mask_t: jax.Array, probs_te: jax.Array, n_experts: int) -> Routing:
  t, k = expert_tk.shape
  expert_tk = jnp.where(mask_t[:, None], expert_tk, n_experts).astype(jnp.int32)
  token_tk = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k))
  return Routing(expert_tk.reshape(-1), token_tk.reshape(-1), weight_tk.reshape(-1), probs_te, k)


@ROUTERS.register("softmax_topk")
def softmax_topk(logits_ble: jax.Array, cfg: MoEConfig, *, mask_bl: jax.Array, bias_e: jax.Array | None = None) -> Routing:
  """Top-k of softmax(logits); weights renormalised over the k chosen if cfg.renormalize."""
  del bias_e
  logits_te = logits_ble.reshape(-1, logits_ble.shape[-1]).astype(jnp.float32)
  probs_te = jax.nn.softmax(logits_te, axis=-1)
  weight_tk, expert_tk = jax.lax.top_k(probs_te, cfg.top_k)
  if cfg.renormalize:
    weight_tk = weight_tk / jnp.sum(weight_tk, axis=-1, keepdims=True)
  return _token_choice(expert_tk, weight_tk * cfg.route_scale, mask_bl.reshape(-1), probs_te, cfg.n_experts)


@ROUTERS.register("sigmoid_bias")
def sigmoid_bias(logits_ble: jax.Array, cfg: MoEConfig, *, mask_bl: jax.Array, bias_e: jax.Array | None = None) -> Routing:
  """DeepSeek-V3: select by top-k of sigmoid(logits) + bias, weight by the unbiased scores."""
  logits_te = logits_ble.reshape(-1, logits_ble.shape[-1]).astype(jnp.float32)
  scores_te = jax.nn.sigmoid(logits_te)
  select_te = scores_te if bias_e is None else scores_te + jax.lax.stop_gradient(bias_e.astype(jnp.float32))
  _, expert_tk = jax.lax.top_k(select_te, cfg.top_k)
  weight_tk = jnp.take_along_axis(scores_te, expert_tk, axis=-1)
  if cfg.renormalize:
    weight_tk = weight_tk / jnp.sum(weight_tk, axis=-1, keepdims=True)
  probs_te = scores_te / jnp.sum(scores_te, axis=-1, keepdims=True)  # normalised affinities for the balance loss
  return _token_choice(expert_tk, weight_tk * cfg.route_scale, mask_bl.reshape(-1), probs_te, cfg.n_experts)


@ROUTERS.register("expert_choice")
def expert_choice(logits_ble: jax.Array, cfg: MoEConfig, *, mask_bl: jax.Array, bias_e: jax.Array | None = None) -> Routing:
  """Each expert picks the top-C tokens of each sequence by softmax score (Zhou et al. 2022)."""
  del bias_e
  b, l, e = logits_ble.shape
  probs_ble = jax.nn.softmax(logits_ble.astype(jnp.float32), axis=-1)
  c = capacity(l, cfg)
  # Padding tokens score -1 < any probability: an expert takes them only when nothing else is left.
  scores_bel = jnp.where(mask_bl[:, None, :], probs_ble.transpose(0, 2, 1), -1.0)
  weight_bec, pos_bec = jax.lax.top_k(scores_bel, c)
  picked_real = weight_bec >= 0
  expert_bec = jnp.where(picked_real, jnp.arange(e, dtype=jnp.int32)[None, :, None], e)
  token_bec = pos_bec.astype(jnp.int32) + (jnp.arange(b, dtype=jnp.int32) * l)[:, None, None]
  weight_bec = jnp.where(picked_real, weight_bec, 0.0) * cfg.route_scale
  return Routing(expert_bec.reshape(-1), token_bec.reshape(-1), weight_bec.reshape(-1), probs_ble.reshape(b * l, e), None)


@ROUTERS.register("hard_topk")
def hard_topk(logits_ble: jax.Array, cfg: MoEConfig, *, mask_bl: jax.Array, bias_e: jax.Array | None = None) -> Routing:
  """EMoE: the top-k experts by logit, combine weight 1 each (their outputs are summed)."""
  del bias_e
  logits_te = logits_ble.reshape(-1, logits_ble.shape[-1]).astype(jnp.float32)
  _, expert_tk = jax.lax.top_k(logits_te, cfg.top_k)
  weight_tk = jnp.full(expert_tk.shape, cfg.route_scale, jnp.float32)
  return _token_choice(expert_tk, weight_tk, mask_bl.reshape(-1), jax.nn.softmax(logits_te, axis=-1), cfg.n_experts)


def avg_keys(w_gate_edf) -> jax.Array:
  """EMoE's router [D, E] (float32, no gradient): column e is the mean of expert e's keys
  w_gate[e, :, f] over its F hidden units, so x . router[:, e] is the mean gate pre-activation
  of the expert (Qiu et al. 2023, avg-k gating; their LLaMA code takes the same mean of the
  gate projection's outputs). An adapted weight (PEFT) routes by its base keys."""
  w = getattr(w_gate_edf, "base", w_gate_edf)
  return jax.lax.stop_gradient(jnp.mean(w.astype(jnp.float32), axis=-1).T)


def router_logits(x_bld: jax.Array, router_de: jax.Array, jitter_bld: jax.Array | None = None) -> jax.Array:
  """Router logits in float32 whatever the activation dtype: top-k is decided in float32.

  `jitter_bld` multiplies the router input (Switch, Fedus et al. 2021: x * U(1 - eps, 1 + eps)).
  """
  x32 = x_bld.astype(jnp.float32)
  if jitter_bld is not None:
    x32 = x32 * jitter_bld.astype(jnp.float32)
  return project("bld,de->ble", x32, router_de, precision=jax.lax.Precision.HIGHEST)


def jitter_noise(key: jax.Array, shape: tuple[int, ...], eps: float) -> jax.Array:
  """Multiplicative jitter U(1 - eps, 1 + eps) (Switch Transformer, Fedus et al. 2021)."""
  return jax.random.uniform(key, shape, jnp.float32, 1.0 - eps, 1.0 + eps)


def update_bias(bias_e: jax.Array, load_e: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 aux-loss-free balancing (2024, Sec. 2.1.2): b_e += rate * sign(mean(load) - load_e).

  Overloaded experts become less likely to be selected, underloaded ones more; the update is
  applied outside the optimizer, once per training step, and never changes the combine weights.
  """
  load_e = jax.lax.stop_gradient(load_e.astype(jnp.float32))
  return bias_e + rate * jnp.sign(jnp.mean(load_e) - load_e).astype(bias_e.dtype)
