"""The dense warm-up: train the FFN dense for the first steps, then copy it into every expert.

While the warm-up flag (a non-trainable `SoftMoEState` of every soft-MoE layer) is set, every
segment is routed to expert 0 alone, so the layer is exactly a dense SwiGLU with expert 0's
weights; the router and the other experts get no gradient. After step
`round(dense_warmup x train.steps)` the trainer applies `end_dense_warmup` once: expert 0's
weights and its AdamW moments are copied into every expert and the flag is cleared. The train
step never changes (the flag is data), so nothing recompiles; the copy is one more small jit.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
from flax import nnx

from jaxlm.config import Experiment

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")

KeyPath = tuple[Any, ...]


def warmup_steps(exp: Experiment) -> int:
  """Optimizer steps trained dense (0: no warm-up)."""
  return round(exp.model.soft_moe.dense_warmup * exp.train.steps)


def _plain(path: Iterable[Any]) -> KeyPath:
  """A jax key path as plain keys, without the Variable's `.value` attribute."""
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey):
      if k.name == "value":
        continue
      out.append(k.name)
    elif isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    else:
      out.append(str(k))
  return tuple(out)


def soft_moe_paths(model: nnx.Module) -> list[KeyPath]:
  """Graph paths of every soft-MoE layer in `model` (scanned layers: one path, stacked weights)."""
  from jaxlm.layers.soft_moe.layer import SoftMergedMoE

  return [tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, SoftMergedMoE)]


def _map_suffix(tree: Any, suffixes: list[KeyPath], fn: Callable[[jax.Array], jax.Array]) -> Any:
  """Apply fn to every leaf whose key path ends with one of `suffixes` (params, or the
  optimizer's param-shaped moments, whose paths end like the params')."""

  def visit(path, leaf):
    keys = _plain(path)
    if any(len(keys) >= len(s) and keys[-len(s) :] == s for s in suffixes):
      return fn(leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(visit, tree)


def copy_expert0(w: jax.Array) -> jax.Array:
  """[..., E, X, Y] -> expert 0 broadcast over E (the expert axis is third from last)."""
  axis = w.ndim - 3
  return jax.numpy.broadcast_to(jax.lax.index_in_dim(w, 0, axis, keepdims=True), w.shape)


def end_dense_warmup_fn(model: nnx.Module) -> Callable[[Any], Any]:
  """fn(TrainState) -> TrainState: experts <- expert 0 (weights and optimizer moments), flag off."""
  layers = soft_moe_paths(model)
  weights = [p + (name,) for p in layers for name in EXPERT_WEIGHTS]
  flags = [p + ("dense",) for p in layers]

  def end(state):
    return state.replace(
        params=_map_suffix(state.params, weights, copy_expert0),
        opt_state=_map_suffix(state.opt_state, weights, copy_expert0),
        rest=_map_suffix(state.rest, flags, lambda f: jax.numpy.zeros_like(f)),
    )

  return end


def train_hooks(exp: Experiment, graphdef: Any, state: Any) -> dict[int, Callable[[Any], Any]]:
  """{step: fn(TrainState) -> TrainState} for the trainer: the end of the dense warm-up."""
  n = warmup_steps(exp)
  if not 0 < n < exp.train.steps:  # dense_warmup = 0 (n = 0); SoftMergedMoE.validate refuses the rest
    return {}
  model = nnx.merge(graphdef, state.params, state.rest)
  return {n: end_dense_warmup_fn(model)}
