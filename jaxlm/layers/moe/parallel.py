"""Expert parallelism: the routed experts as a `shard_map` over the mesh, all-to-all over `expert`.

`routed_experts` runs `forward.routed_local` on every device's own tokens (manual over every
mesh axis, so routing, sorting and capacity are local to a device, as in GShard's groups):

  tokens x [B, L, D]          batch split over the batch axes (data, fsdp, expert by default)
  experts w [E, D, F]         E split over `expert`; F over `tensor` (partial outputs are summed
                              over `tensor` after the combine); D gathered (FSDP all-gathers the
                              weights before the map and reduce-scatters their gradients)
  router [D, E], bias [E]     replicated
  router stats                summed over the batch axes: losses and metrics are batch-global
  selected experts [B, L, E]  per token (stats[SELECTED]): split over the batch axes like x

Several experts per device when E > expert-axis size. Tokens that are not split over the
expert axis (a batch smaller than the axis, e.g. decoding one sequence) are replicated on it,
so every device has them all: then the experts are gathered and no all-to-all runs.

The experts' in_specs come from the logical axes of every array of the `ExpertWeights` pytree
(expert adapters included: LoRA A [E, D, R] splits like its weight over `expert`, B [E, R, F]
over `expert` and `tensor`): `expert` -> the expert mesh axes, `mlp` -> the tensor axes, every
other axis whole. The dropless exchanges themselves live in exchange.py.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from jaxlm import sharding
from jaxlm.config import MoEConfig
from jaxlm.layers.experts import ExpertWeights
from jaxlm.layers.moe.exchange import ExpertAxis
from jaxlm.layers.moe.forward import SELECTED, routed_local
from jaxlm.layers.moe.losses import Stats, psum_stats


def _axes(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(spec: PartitionSpec, i: int) -> tuple[str, ...]:
  return _axes(spec[i]) if i < len(spec) else ()


def _name(axes: tuple[str, ...]) -> str | tuple[str, ...]:
  return axes[0] if len(axes) == 1 else axes


def routed_experts(
    x_bld: jax.Array,
    mask_bl: jax.Array,
    router_de: jax.Array,
    experts: ExpertWeights,
    *,
    cfg: MoEConfig,
    backend: str,
    all_to_all: str,
    bias_e: jax.Array | None = None,
    jitter_bld: jax.Array | None = None,
    gates_bln: jax.Array | None = None,
) -> tuple[jax.Array, Stats]:
  """The routed experts on the current mesh (or on one device when no mesh is set)."""
  mesh = jax.sharding.get_abstract_mesh()
  local = dict(cfg=cfg, backend=backend)
  if mesh.empty or any(t == AxisType.Manual for t in mesh.axis_types):
    return routed_local(x_bld, mask_bl, router_de, experts, bias_e=bias_e, jitter_bld=jitter_bld, gates_bln=gates_bln, **local)
  mesh_shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
  x_spec = sharding.spec(("batch", None, None), x_bld.shape, mesh_shape)
  batch_axes = _entry(x_spec, 0)
  w_spec = sharding.spec(("expert", None, "mlp"), experts.w_gate.shape, mesh_shape)
  ep_axes, mlp_axes = _entry(w_spec, 0), _entry(w_spec, 2)
  if not set(ep_axes) <= set(batch_axes):  # tokens replicated over the expert axis: no exchange
    ep_axes = ()
  if set(mlp_axes) & set(batch_axes):  # an axis cannot split tokens and hidden units at once
    mlp_axes = ()
  ep = ExpertAxis(_name(ep_axes) if ep_axes else None, math.prod(mesh_shape[a] for a in ep_axes), all_to_all == "ragged")
  entry = {"expert": _name(ep_axes) if ep_axes else None, "mlp": _name(mlp_axes) if mlp_axes else None}
  to_spec = lambda axes: PartitionSpec(*(entry.get(a) for a in axes))
  args = {"x": x_bld, "mask": mask_bl, "router": router_de, "experts": experts}
  specs = {
      "x": x_spec,
      "mask": PartitionSpec(*x_spec[:1]),
      "router": PartitionSpec(),
      "experts": jax.tree.map(to_spec, experts.leaf_axes("expert"), is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(n, (str, type(None))) for n in a)),
  }
  if bias_e is not None:
    args["bias"], specs["bias"] = bias_e, PartitionSpec()
  if jitter_bld is not None:
    args["jitter"], specs["jitter"] = jitter_bld, x_spec
  if gates_bln is not None:
    args["gates"], specs["gates"] = gates_bln, x_spec

  def body(a: dict[str, Any]) -> tuple[jax.Array, Stats, jax.Array]:
    y, stats = routed_local(a["x"], a["mask"], a["router"], a["experts"], bias_e=a.get("bias"), jitter_bld=a.get("jitter"), gates_bln=a.get("gates"), ep=ep, **local)
    if mlp_axes:
      y = jax.lax.psum(y, _name(mlp_axes))  # partial sums over the hidden units of the experts
    selected = stats.pop(SELECTED)  # per token: split over the batch like x, never summed
    return y, psum_stats(stats, batch_axes), selected

  stats_specs = PartitionSpec()
  y, stats, selected = jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=(x_spec, stats_specs, x_spec))(args)
  return y, {**stats, SELECTED: selected}
