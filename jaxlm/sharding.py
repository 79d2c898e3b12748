"""Mesh construction, the logical-axis glossary, and the one logical->mesh rule table.

Mesh axes, one per kind of parallelism (outermost first, so `tensor` gets the fastest links):

  data    plain data parallelism: parameters replicated
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 / FSDP)
  expert  expert parallelism: MoE experts sharded; dense layers use it as more data parallelism
  tensor  tensor parallelism: heads, MLP hidden units and the vocabulary split across devices

Layers name only logical axes from this glossary:

  batch seq embed heads kv_heads head_dim mlp vocab expert lora_rank

Parameters carry their logical axes as `out_sharding` metadata; activations are constrained
with `shard(x, *logical_axes)`, which does nothing when no mesh is set. `spec()` turns logical
axes into a `PartitionSpec` with two rules that make one table serve both weights and
activations: a mesh axis is used at most once per array (first dimension wins, so the `embed`
of an activation whose `batch` already took `fsdp` is left unsharded), and a mesh axis that
does not divide the dimension is dropped (e.g. 2 kv heads on a tensor axis of 4 replicate).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.config import MESH_AXES, MeshConfig
from jaxlm.errors import ConfigError

LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "expert", "lora_rank")

MeshAxes = tuple[str, ...]

DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "lora_rank": (),
}

_rules_stack: list[dict[str, MeshAxes]] = [DEFAULT_RULES]


def make_rules(overrides: Sequence[tuple[str, Any]] | Mapping[str, Any] = ()) -> dict[str, MeshAxes]:
  """The default rule table with `(logical, mesh axes)` overrides applied and checked."""
  rules = dict(DEFAULT_RULES)
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  for logical, axes in items:
    if logical not in LOGICAL_AXES:
      raise ConfigError(f"mesh.rules: unknown logical axis {logical!r}; known: {', '.join(LOGICAL_AXES)}")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ConfigError(f"mesh.rules[{logical!r}]: unknown mesh axes {bad}; known: {', '.join(MESH_AXES)}")
    rules[logical] = axes
  return rules


@contextlib.contextmanager
def use_rules(rules: Mapping[str, MeshAxes]) -> Iterator[None]:
  """Use `rules` for `shard()` and `spec()` inside the block (e.g. an experiment's overrides)."""
  _rules_stack.append(dict(rules))
  try:
    yield
  finally:
    _rules_stack.pop()


def current_rules() -> dict[str, MeshAxes]:
  return _rules_stack[-1]


def spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    rules: Mapping[str, MeshAxes] | None = None,
) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions have these logical names (None: unsharded)."""
  rules = current_rules() if rules is None else rules
  used: set[str] = set()
  out: list[Any] = []
  for i, name in enumerate(logical_axes):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ValueError(f"unknown logical axis {name!r}; glossary: {', '.join(LOGICAL_AXES)}")
    axes = []
    size = 1
    for a in rules[name]:
      if a in used:
        continue
      n = mesh_shape.get(a, 1) if mesh_shape is not None else 1
      if mesh_shape is not None and n == 1:
        continue  # a size-1 axis shards nothing; leaving it out keeps specs readable
      if shape is not None and mesh_shape is not None and shape[i] % (size * n) != 0:
        continue
      axes.append(a)
      size *= n
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def _mesh_shape(mesh: Any) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes)) if hasattr(mesh, "axis_sizes") else dict(mesh.shape)


def shard(x: jax.Array, *logical_axes: str | None) -> jax.Array:
  """Constrain an activation's sharding by logical axis names; a no-op when no mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(f"shard: {len(logical_axes)} axis names for an array of rank {x.ndim}")
  manual = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual}
  shape = {a: s for a, s in _mesh_shape(mesh).items() if a not in manual}
  return jax.lax.with_sharding_constraint(x, spec(logical_axes, x.shape, shape))


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, expert, tensor); dcn_* sizes build a multi-slice hybrid mesh."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.shape(len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(cfg.dcn_shape) > 1:
    from jax.experimental import mesh_utils

    ici = tuple(s // d for s, d in zip(shape, cfg.dcn_shape))
    arr = mesh_utils.create_hybrid_device_mesh(ici, cfg.dcn_shape, devices, allow_split_physical_axes=True)
    return Mesh(arr, MESH_AXES, axis_types=auto)
  from jax.experimental import mesh_utils

  # Physical-topology-aware order on TPUs (inner axes on the fastest links); a plain reshape
  # elsewhere.
  arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(arr, MESH_AXES, axis_types=auto)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
  """A variable's logical axis names (its `out_sharding` metadata), or all-None."""
  names = variable.get_metadata().get("out_sharding")
  ndim = len(variable.shape) if hasattr(variable, "shape") else np.ndim(variable.get_value())
  return tuple(names) if names else (None,) * ndim


def state_specs(state: Any, mesh_shape: Mapping[str, int], rules: Mapping[str, MeshAxes] | None = None) -> Any:
  """PartitionSpecs for every Variable in an (abstract) nnx.State, from its logical axes."""

  def one(v):
    if isinstance(v, nnx.Variable):
      return v.replace(spec(logical_axes_of(v), v.shape, mesh_shape, rules))
    return PartitionSpec()

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> Any:
  """NamedShardings for every Variable in an (abstract) nnx.State on `mesh`."""
  specs = state_specs(state, _mesh_shape(mesh), rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, seq, ...] input array: batch over the data-like axes."""
  return NamedSharding(mesh, spec(("batch",) + (None,) * (ndim - 1), None, _mesh_shape(mesh)))
