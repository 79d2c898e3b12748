"""The one seam through which every weight meets the activations: `project`, `grouped`, `mix`.

Layers never multiply a weight themselves. A weight reaching a pure layer function is either an
array or an *adapted weight* (built by `jaxlm.peft`: LoRA, DoRA, (IA)^3, banks of adapters), a
pytree that knows how to apply itself. So the layers carry no PEFT flags, and every projection,
dense or expert, gains adapters through these three functions:

  project(eq, x, w)          y = einsum(eq, x, w): attention, MLP, router, head
  grouped(x_mk, w, mm, rows) y = mm(x, w): the experts' grouped matmul (`mm` is the backend,
                             `rows` tells an adapter each row's expert and adapter gates)
  mix(w_ge, w, merge)        sum_e w[g, e] * w[e]: the soft MoE's merge in parameter space

The train step's MIGU taps (`jaxlm.train.migu.Tapped`) are such pytrees too: they wrap a weight
(array or adapted) and report the magnitudes of its outputs, so MIGU needs nothing from the layers.

Banks of adapters chosen per example take the example's adapter id from `use_adapter(ids)`, a
context like `sharding.use_rules`: the train step and generation set it from the batch, and
every projection traced inside reads it (`current_adapter_ids`).

Weight layout. `param(..., fan_in=...)` records which axes of a weight contract with the input
(as negative indices, so the leading axis that scanned layers add does not shift them). Axes
before the fan-in axes are *stack* axes (experts, scanned layers), axes after them fan-out:
w_q [D, H, K]: fan-in (-3,); w_o [H, K, D]: (-3, -2); experts [E, D, F]: (-2,), stack E.
Adapters factor any such weight generically from this record (`fan_in_of`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

GroupedMatmul = Callable[[jax.Array, jax.Array], jax.Array]


_ids_stack: list[jax.Array | None] = [None]


@contextlib.contextmanager
def use_adapter(ids_b: Any) -> Iterator[None]:
  """Inside the block, banks of adapters use adapter ids_b[b] for example b ([B] int32)."""
  _ids_stack.append(None if ids_b is None else jnp.asarray(ids_b, jnp.int32))
  try:
    yield
  finally:
    _ids_stack.pop()


def current_adapter_ids() -> jax.Array | None:
  return _ids_stack[-1]


def bank_size(w: Any) -> int:
  """Adapters in a bank chosen per example (0: none, or gates that do not come from ids)."""
  return getattr(w, "bank_size", 0) if is_adapted(w) else 0


def is_adapted(w: Any) -> bool:
  """An adapted weight (a pytree with `project`), not a plain array."""
  return hasattr(w, "project")


def project(eq: str, x: jax.Array, w: Any, **einsum_kw: Any) -> jax.Array:
  """einsum(eq, x, w) in x's dtype, for an array or an adapted weight `w` ("X,W->Y" with the
  weight second; its contracted letters are its fan-in axes)."""
  if is_adapted(w):
    return w.project(eq, x, **einsum_kw)
  return jnp.einsum(eq, x, w.astype(x.dtype), **einsum_kw)


@dataclasses.dataclass(frozen=True)
class Rows:
  """What an adapter may need to know about the rows of a grouped matmul.

  group_sizes_e: rows per expert (contiguous, in expert order; None: M / E each), from which
  each row's expert is derived. gates_mn: per-row gates over a bank of N adapters (per-example
  adapter choice, dispatched with the rows), or None.
  """

  group_sizes_e: jax.Array | None
  n_experts: int
  gates_mn: jax.Array | None = None

  def expert_m(self, m: int) -> jax.Array:
    """int32 [M]: the expert of every row (E for rows past the last group)."""
    e = self.n_experts
    if self.group_sizes_e is None:
      return jnp.arange(m, dtype=jnp.int32) // max(m // e, 1)
    ends = jnp.cumsum(self.group_sizes_e)
    return jnp.searchsorted(ends, jnp.arange(m, dtype=ends.dtype), side="right").astype(jnp.int32)


def grouped(x_mk: jax.Array, w: Any, mm: GroupedMatmul, rows: Rows) -> jax.Array:
  """mm(x, w) for stacked weights w [E, K, N] (row groups by expert), array or adapted."""
  if is_adapted(w):
    return w.grouped(x_mk, mm, rows)
  return mm(x_mk, w)


def mix(w_ge: jax.Array, w: Any, merge: Callable[..., jax.Array], *, mlp_axis: int, dense: bool = False) -> Any:
  """sum_e w_ge[g, e] * w[e] for stacked experts w [E, X, Y] (the soft MoE's merge).

  An adapted weight returns an adapted weight over the merged base (its adapters stay factored,
  merged with the same routing weights), or, with `dense`, the merged array.
  """
  if is_adapted(w):
    return w.mix(w_ge, merge, mlp_axis=mlp_axis, dense=dense)
  return merge(w_ge, w, mlp_axis=mlp_axis)


def logical_axes(w: Any, base_axes: tuple[str | None, ...]) -> Any:
  """Logical axes of every array in `w` (an array: `base_axes`; an adapted weight: a pytree of
  axis tuples shaped like it), e.g. for the specs of a `shard_map`."""
  if is_adapted(w):
    return w.logical_axes(base_axes)
  return base_axes


def fan_in_of(variable: nnx.Variable) -> tuple[int, ...] | None:
  """The negative axis indices a weight contracts with its input (None: not a linear weight)."""
  fan_in = variable.get_metadata().get("fan_in")
  return None if fan_in is None else tuple(fan_in)
