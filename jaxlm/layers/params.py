"""Parameter creation shared by every layer: initializer, dtype and logical axes in one call."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    param_dtype: str | jnp.dtype = "float32",
    kind: type[nnx.Variable] = nnx.Param,
    *,
    fan_in: Sequence[int] | None = None,
    elementwise: bool = False,
) -> nnx.Variable:
  """A variable with its logical axes recorded as `out_sharding` metadata.

  `fan_in`: for a linear weight, the axes that contract with the input (recorded as negative
  indices in the `fan_in` metadata, see `jaxlm.layers.linear`); None for tables and vectors.
  `elementwise`: a bias or a norm scale, added to or multiplied into the activations elementwise
  (recorded as `elementwise` metadata: no weight decay, and what BitFit trains; `is_elementwise`).

  Eager sharding is off: jaxlm shards parameters by building them inside a jit whose output
  shardings come from the logical axes (`jaxlm.models.build`), so layers can also be created
  with no mesh at all, e.g. by other projects that import them.
  """
  if len(axes) != len(shape):
    raise ValueError(f"param: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
  value = init(rngs.params(), tuple(shape), jnp.dtype(param_dtype))
  meta = {}
  if fan_in is not None:
    meta["fan_in"] = tuple(sorted(a - len(shape) if a >= 0 else a for a in fan_in))
  if elementwise:
    meta["elementwise"] = True
  return kind(value, out_sharding=tuple(axes), eager_sharding=False, **meta)


def is_elementwise(variable: nnx.Variable) -> bool:
  """A bias or a norm scale (created with `param(..., elementwise=True)`), whatever its rank."""
  return bool(variable.get_metadata().get("elementwise", False))


def normal(std: float) -> Initializer:
  return jax.nn.initializers.normal(stddev=std)


def ones() -> Initializer:
  return jax.nn.initializers.ones


def zeros() -> Initializer:
  return jax.nn.initializers.zeros
