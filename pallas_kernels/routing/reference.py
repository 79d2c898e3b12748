"""Top-k routing in plain jnp: the specification the kernels are tested against.

Letters: T tokens, E experts, k experts per token.

A router turns logits [T,E] into, per token, k distinct expert ids and k weights, and into
what dispatch needs to sort the T*k (token, slot) assignments by expert: the per-expert
counts (`group_sizes`) and the stable sorting permutation (`sort_perm`). All arithmetic is
float32 whatever the logits' dtype.

Modes (`weights` are what the expert outputs are multiplied by):

* "topk_softmax" (Mixtral): pick the k largest logits; weights = softmax over those k.
  Already normalised, so `renormalize` changes nothing.
* "softmax_topk" (Switch, Qwen-MoE, OLMoE): p = softmax over all E; pick the k largest;
  weights = their p, divided by their sum if `renormalize`.
* "sigmoid" (DeepSeek-V3): s = sigmoid(logits); pick the k largest s + bias_e (the bias
  steers selection only); weights = the unbiased s of the picked experts, divided by their
  sum if `renormalize`.

Selection picks by value, lowest expert id first among equal values (as `jax.lax.top_k`).
In "softmax_topk" the order is taken on the logits, which softmax preserves exactly; picking
on the rounded probabilities could break ties differently between implementations.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

RoutingMode = Literal["softmax_topk", "topk_softmax", "sigmoid"]
MODES: tuple[str, ...] = ("softmax_topk", "topk_softmax", "sigmoid")


class Routing(NamedTuple):
  """What a router hands to dispatch and combine.

  Attributes:
    expert_ids: [T,k] int32, the chosen experts of each token, best first.
    weights: [T,k] float32, the combine weight of each chosen expert.
    group_sizes: [E] int32, how many of the T*k assignments go to each expert.
    sort_perm: [T*k] int32, the stable order that sorts the flattened assignments
      (index t*k + j) by expert id: `expert_ids.reshape(-1)[sort_perm]` is non-decreasing,
      and `x_td[sort_perm // k]` is the token matrix sorted for a grouped matmul.
  """

  expert_ids: jax.Array
  weights: jax.Array
  group_sizes: jax.Array
  sort_perm: jax.Array


def selection_scores(
    logits_te: jax.Array, mode: str, bias_e: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
  """(select_te, score_te) in float32: experts are picked by `select`, weighted by `score`."""
  x = logits_te.astype(jnp.float32)
  if mode == "topk_softmax":
    return x, x
  if mode == "softmax_topk":
    return x, jax.nn.softmax(x, axis=-1)
  scores = jax.nn.sigmoid(x)
  select = scores if bias_e is None else scores + bias_e.astype(jnp.float32)
  return select, scores


def weights_from_ids(
    logits_te: jax.Array,
    expert_ids_tk: jax.Array,
    mode: str,
    renormalize: bool,
) -> jax.Array:
  """The [T,k] float32 weights as a differentiable function of the logits, ids held fixed.

  This is also the backward pass of every routing implementation: the ids are piecewise
  constant, so the only gradient flows through the weights.
  """
  _, score = selection_scores(logits_te, mode, None)
  picked = jnp.take_along_axis(score, expert_ids_tk, axis=-1)
  if mode == "topk_softmax":
    return jax.nn.softmax(picked, axis=-1)
  if renormalize:
    picked = picked / jnp.sum(picked, axis=-1, keepdims=True)
  return picked


def sort_order(expert_ids_tk: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """(group_sizes [E] int32, sort_perm [T*k] int32) of the flattened assignments."""
  flat = expert_ids_tk.reshape(-1)
  group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  # Sort (id, index) pairs rather than jnp.argsort: argsort's index operand is a constant iota,
  # so inside shard_map(check_vma=True) its result would not vary over the mesh axes the ids do,
  # unlike the Pallas kernel's. Deriving the indices from `flat` keeps them varying alike.
  index = flat * 0 + jnp.arange(flat.size, dtype=flat.dtype)
  _, sort_perm = jax.lax.sort_key_val(flat, index, is_stable=True)
  sort_perm = sort_perm.astype(jnp.int32)
  return group_sizes, sort_perm


def topk_route_reference(
    logits_te: jax.Array,
    k: int,
    *,
    mode: RoutingMode = "softmax_topk",
    renormalize: bool = True,
    bias_e: jax.Array | None = None,
) -> Routing:
  """Top-k routing, the specification.

  Args:
    logits_te: [T,E] router logits, any float dtype.
    k: experts per token, 1 <= k <= E.
    mode: "softmax_topk", "topk_softmax" or "sigmoid" (see the module docstring).
    renormalize: divide the k weights by their sum ("softmax_topk", "sigmoid").
    bias_e: [E] selection bias, "sigmoid" mode only; steers selection, not weights.

  Returns:
    `Routing(expert_ids [T,k] int32, weights [T,k] f32, group_sizes [E] int32,
    sort_perm [T*k] int32)`.
  """
  select, _ = selection_scores(logits_te, mode, bias_e)
  _, expert_ids = jax.lax.top_k(select, k)
  expert_ids = expert_ids.astype(jnp.int32)
  weights = weights_from_ids(logits_te, expert_ids, mode, renormalize)
  group_sizes, sort_perm = sort_order(expert_ids, logits_te.shape[-1])
  return Routing(expert_ids, weights, group_sizes, sort_perm)
