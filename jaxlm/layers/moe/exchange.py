"""The dropless exchanges of expert parallelism: rows to the devices holding their experts and back.

Inside the `shard_map` of `parallel.routed_experts`, each device holds E / ep experts. Its
routed rows travel to the devices of their experts and the outputs come back:

  ragged  rows sorted by expert are sent with `jax.lax.ragged_all_to_all` (TPU, GPU): exactly
          the routed rows cross the network. Sizes and offsets are exchanged first with small
          all-to-alls. On CPU, which has no ragged all-to-all, `_emulated_ragged_all_to_all`
          implements the same contract on top of a padded all-to-all.
  padded  rows grouped by destination device into chunks of N rows (N = this device's routed
          assignments: dropless must hold the case where all of them pick one device), one
          `jax.lax.all_to_all` each way: ep x the minimum bytes. The capacity path (forward.py)
          sends [E, sequences, C] slots instead: capacity factor x the minimum.

Rows may carry `n_gates` extra columns (per-row adapter gates, see `forward.routed_local`); they
travel with the row and are split off before the experts run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.config import MoEConfig
from jaxlm.layers.experts import ExpertWeights
from jaxlm.layers.moe import layout as lay
from jaxlm.layers.moe.gmm import block_rows_for, run_experts
from jaxlm.layers.moe.routing import Routing


@dataclasses.dataclass(frozen=True)
class ExpertAxis:
  """The mesh axes the experts are split over, as seen inside the shard_map."""

  name: str | tuple[str, ...] | None = None  # mesh axis name(s); None: no expert parallelism
  size: int = 1  # devices along it (experts per device = E / size)
  ragged: bool = False  # dropless exchange with ragged_all_to_all (else a padded all_to_all)


NO_EXPERT_AXIS = ExpertAxis()


# -- dropless exchanges --------------------------------------------------------------------------


def dropless_padded(x_td: jax.Array, routing: Routing, experts: ExpertWeights, ep: ExpertAxis, *, cfg: MoEConfig, backend: str, n_gates: int = 0) -> tuple[lay.Layout, jax.Array]:
  """(send layout, [N, D] expert outputs per assignment) with a padded all-to-all each way."""
  n = routing.expert_n.shape[0]
  e_loc = cfg.n_experts // ep.size
  valid = routing.expert_n < cfg.n_experts
  dest_n = jnp.where(valid, routing.expert_n // e_loc, ep.size)
  send = lay.capacity_layout(dest_n, jnp.zeros_like(dest_n), ep.size, 1, n)  # [ep, N] chunks: nothing dropped
  x_send = lay.dispatch(x_td, send, routing.token_n)
  ids_send = jnp.full((send.n_rows,), e_loc, jnp.int32).at[send.row_n].set(routing.expert_n % e_loc, mode="drop", unique_indices=True)
  x_recv = jax.lax.all_to_all(x_send, ep.name, 0, 0, tiled=True)
  ids_recv = jax.lax.all_to_all(ids_send, ep.name, 0, 0, tiled=True)
  y_recv = _local_experts(x_recv, ids_recv, experts, e_loc, cfg=cfg, backend=backend, n_gates=n_gates)
  y_send = jax.lax.all_to_all(y_recv, ep.name, 0, 0, tiled=True)
  return send, lay.gather_rows(y_send, send)


def dropless_ragged(x_td: jax.Array, routing: Routing, experts: ExpertWeights, ep: ExpertAxis, *, cfg: MoEConfig, backend: str, n_gates: int = 0) -> tuple[lay.Layout, jax.Array]:
  """(send layout, [N, D] expert outputs per assignment) with a ragged all-to-all each way."""
  n = routing.expert_n.shape[0]
  e_loc = cfg.n_experts // ep.size
  send = lay.dropless_layout(routing.expert_n, cfg.n_experts)  # rows sorted by expert: by destination too
  x_send = lay.dispatch(x_td, send, routing.token_n)  # [N, D]
  counts = send.group_sizes_e.reshape(ep.size, e_loc)  # [dest, local expert]
  send_sizes = jnp.sum(counts, axis=1)
  send_offsets = jnp.cumsum(send_sizes) - send_sizes
  recv_counts = jax.lax.all_to_all(counts, ep.name, 0, 0, tiled=True)  # [source, local expert]
  recv_sizes = jnp.sum(recv_counts, axis=1)
  recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes  # where each source's rows start here
  out_offsets = jax.lax.all_to_all(recv_offsets, ep.name, 0, 0, tiled=True)  # where my rows start at each dest
  m = ep.size * n  # worst case: every device sends all its rows here
  x_recv = ragged_all_to_all(x_send, jnp.zeros((m, x_send.shape[1]), x_send.dtype), send_offsets, send_sizes, out_offsets, recv_sizes, ep)
  # Local expert of every received row: row r of source s's block, at offset o, belongs to the
  # first expert whose cumulative count from s exceeds o.
  r = jnp.arange(m, dtype=jnp.int32)
  src = jnp.minimum(jnp.searchsorted(jnp.cumsum(recv_sizes), r, side="right"), ep.size - 1)
  o = r - recv_offsets[src]
  ids_recv = jnp.sum(o[:, None] >= jnp.cumsum(recv_counts, axis=1)[src], axis=1).astype(jnp.int32)  # e_loc: past the rows received
  y_recv = _local_experts(x_recv, ids_recv, experts, e_loc, cfg=cfg, backend=backend, n_gates=n_gates)
  back_offsets = jax.lax.all_to_all(send_offsets, ep.name, 0, 0, tiled=True)  # where my results go at each source
  y_send = ragged_all_to_all(y_recv, jnp.zeros((n, y_recv.shape[1]), y_recv.dtype), recv_offsets, recv_sizes, back_offsets, send_sizes, ep)
  return send, lay.gather_rows(y_send, send)


def _local_experts(x_rd: jax.Array, ids_r: jax.Array, experts: ExpertWeights, e_loc: int, *, cfg: MoEConfig, backend: str, n_gates: int) -> jax.Array:
  """Received rows (local expert ids_r; e_loc: padding) -> their experts' outputs, same order."""
  r = x_rd.shape[0]
  block = block_rows_for(backend, r, e_loc, cfg.block_rows)
  layout = lay.dropless_layout(ids_r, e_loc, block)
  x_md = lay.dispatch(x_rd, layout, jnp.arange(r, dtype=jnp.int32))
  y_md = run_experts(x_md, experts, layout.group_sizes_e, backend=backend, block_rows=block, n_gates=n_gates)
  return lay.gather_rows(y_md, layout)


# -- ragged all-to-all ---------------------------------------------------------------------------


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, ep: ExpertAxis) -> jax.Array:
  """`jax.lax.ragged_all_to_all` on TPU/GPU; the same contract emulated on CPU (lowering-time choice)."""
  args = (operand, output, input_offsets.astype(jnp.int32), send_sizes.astype(jnp.int32), output_offsets.astype(jnp.int32), recv_sizes.astype(jnp.int32))
  native = lambda *a: _as_varying_as(jax.lax.ragged_all_to_all(*a, axis_name=ep.name), operand)
  emulated = lambda *a: _as_varying_as(_emulated_ragged_all_to_all(*a, axis_name=ep.name, size=ep.size), operand)
  return jax.lax.platform_dependent(*args, cpu=emulated, default=native)


def _as_varying_as(x: jax.Array, like: jax.Array) -> jax.Array:
  """Mark x as varying over the manual axes `like` varies over (both branches must agree)."""
  missing = tuple(sorted(_varying_axes(like) - _varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying_axes(x: jax.Array) -> frozenset:
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)  # jax 0.10; older releases call it `vma`
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name, size: int) -> jax.Array:
  """`ragged_all_to_all`'s contract from a padded all-to-all: chunks of operand-many rows."""
  n, d = operand.shape
  r = jnp.arange(n, dtype=jnp.int32)
  rows = jnp.where(r[None, :] < send_sizes[:, None], input_offsets[:, None] + r[None, :], n)  # [dest, n]
  chunks = jnp.take(operand, rows.reshape(-1), axis=0, mode="fill", fill_value=0)
  recv = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True).reshape(size, n, d)  # [source, n, D]
  at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where each source writes here
  dst = jnp.where(r[None, :] < recv_sizes[:, None], at[:, None] + r[None, :], output.shape[0])
  return output.at[dst.reshape(-1)].set(recv.reshape(-1, d), mode="drop")
