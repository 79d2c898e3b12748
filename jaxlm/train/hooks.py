"""Scheduled changes of the train state that layers ask for (`FFNKind.scheduled_edits`).

A layer kind declares {step: {path suffix inside the layer: fn(array) -> array}}; the trainer
finds every layer of that kind in the model, and after that step applies fn to the variable at
layer path + suffix wherever it sits in the train state: the trainable parameters, the frozen
ones, the non-trainable state, and the optimizer's moments of a parameter (whose key paths end
like the parameter's). Each step's edit is one jitted function, compiled on first use; the
train step itself never changes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
from flax import nnx

from jaxlm.layers import FFN

KeyPath = tuple[Any, ...]


def plain_path(path: Iterable[Any]) -> KeyPath:
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


def map_suffixes(tree: Any, edits: dict[KeyPath, Callable[[jax.Array], jax.Array]]) -> Any:
  """Apply edits[s] to every leaf whose key path ends with the suffix s."""

  def visit(path, leaf):
    keys = plain_path(path)
    for s, fn in edits.items():
      if len(keys) >= len(s) and keys[-len(s) :] == s:
        return fn(leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(visit, tree)


def edit_state_fn(model: nnx.Module, kind: type, edits: dict[KeyPath, Callable[[jax.Array], jax.Array]]) -> Callable[[Any], Any]:
  """fn(TrainState) -> TrainState applying `edits` (suffixes inside each layer of `kind`)."""
  layers = [tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, kind)]
  full = {p + s: fn for p in layers for s, fn in edits.items()}

  def apply(state):
    return state.replace(**{f: map_suffixes(getattr(state, f), full) for f in ("params", "frozen", "rest", "opt_state")})

  return apply


def state_hooks(exp: Any, graphdef: Any, state: Any) -> dict[int, Callable[[Any], Any]]:
  """{step: fn(TrainState) -> TrainState} from every FFN kind of the model (not yet jitted)."""
  model = nnx.merge(graphdef, state.params, state.frozen, state.rest)
  hooks: dict[int, list[Callable[[Any], Any]]] = {}
  for name in sorted(set(exp.model.ffn_kinds)):
    kind = FFN.get(name)
    for step, edits in kind.scheduled_edits(exp).items():
      hooks.setdefault(step, []).append(edit_state_fn(model, kind, edits))

  def chain(fns):
    def run(state):
      for fn in fns:
        state = fn(state)
      return state

    return run

  return {step: chain(fns) for step, fns in hooks.items()}
