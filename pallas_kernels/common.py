"""Helpers every kernel shares: block arithmetic, output structs, input checks.

Nothing here launches a kernel. Block-size rules differ per backend and are written down once:

* Mosaic TPU: a block's last dim is a multiple of 128 or the whole array dim; its second-last
  dim is a multiple of 8 (16 for 16-bit types) or the whole array dim. Partial edge blocks are
  allowed: reads past the array end return garbage, writes past it are dropped.
* Triton: every loaded or stored tile has a power-of-two number of elements, and nothing masks
  edges for you: loads and stores past the array end must carry an explicit mask.
* Interpret mode (CPU): edge blocks are padded with NaN (integers with a sentinel), so a kernel
  that forgets to mask a reduction fails loudly in the tests.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def cdiv(a: int, b: int) -> int:
  """Ceiling division for Python ints."""
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  """The smallest multiple of b that is >= a."""
  return cdiv(a, b) * b


def next_pow2(a: int) -> int:
  """The smallest power of two >= a (and >= 1)."""
  return 1 << max(0, (int(a) - 1).bit_length())


def sublane_multiple(dtype: Any) -> int:
  """Mosaic's second-minor tile for a dtype: 8 rows for 32-bit, 16 for 16-bit, 32 for 8-bit."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def tpu_block(dim: int, preferred: int, multiple: int) -> int:
  """A Mosaic block size along one dim: the whole dim if it fits, else `preferred`.

  Args:
    dim: the array dim.
    preferred: the block size to use for large dims; a multiple of `multiple`.
    multiple: the alignment Mosaic needs when the block is not the whole dim.
  """
  if preferred % multiple:
    raise ValueError(f"block {preferred} is not a multiple of {multiple}")
  return dim if dim <= preferred else preferred


def triton_block(dim: int, preferred: int, minimum: int = 16) -> int:
  """A Triton block size along one dim: a power of two in [minimum, preferred] covering dim."""
  return max(minimum, min(next_pow2(dim), next_pow2(preferred)))


def out_struct(shape: tuple[int, ...], dtype: Any, *operands: Any) -> jax.ShapeDtypeStruct:
  """`pallas_call` output struct that varies over the same mesh axes as its operands.

  Inside `shard_map(check_vma=True)` Pallas needs to know which manual mesh axes an output
  varies over; it varies over every axis any operand varies over. Outside `shard_map` this is
  the empty set and the struct is an ordinary one.
  """
  varying = frozenset().union(*(varying_axes(op) for op in operands))
  return jax.ShapeDtypeStruct(
      shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying)
  )


def varying_axes(x: Any) -> frozenset:
  """The manual mesh axes x varies over (empty outside `shard_map`)."""
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset() if mat is None else mat.varying


def cotangent_like(ct: jax.Array, primal: Any) -> jax.Array:
  """A custom VJP's cotangent for `primal`, summed over the mesh axes primal does not vary on.

  Inside `shard_map`, an operand replicated over an axis (e.g. experts sharded only along F,
  weights replicated) gets a per-device partial cotangent; its true cotangent is the sum over
  that axis, which is also the type `custom_vjp` requires. Outside `shard_map`: a no-op.
  """
  extra = varying_axes(ct) - varying_axes(primal)
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def concrete_value(x: Any) -> np.ndarray | None:
  """x as a NumPy array when it is known at trace time, else None (a tracer)."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def check_rank(name: str, x: Any, rank: int, letters: str) -> None:
  """Raise ValueError unless x has `rank` dims (named by `letters`, e.g. "MK")."""
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have shape [{','.join(letters)}]; got shape {jnp.shape(x)}")


def check_float(name: str, x: Any) -> None:
  """Raise ValueError unless x has a floating dtype."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must be a floating array; got dtype {jnp.result_type(x)}")


def check_group_sizes(group_sizes_e: Any, num_groups: int, num_rows: int) -> jax.Array:
  """Validate group sizes and return them as int32.

  Shape and dtype are checked always. Values are checked when they are concrete (not traced):
  no negative size, and the sizes sum to at most `num_rows`. Traced group sizes cannot be
  checked before launch; the kernels then clip them (see `clip_group_sizes`).

  Args:
    group_sizes_e: [E] integer array, rows per group in order.
    num_groups: E, the number of groups the weights hold.
    num_rows: M, the rows of the grouped operand.
  """
  if jnp.ndim(group_sizes_e) != 1 or jnp.shape(group_sizes_e)[0] != num_groups:
    raise ValueError(
        f"group_sizes must have shape [E]=[{num_groups}]; got {jnp.shape(group_sizes_e)}"
    )
  if not jnp.issubdtype(jnp.result_type(group_sizes_e), jnp.integer):
    raise ValueError(f"group_sizes must be integers; got {jnp.result_type(group_sizes_e)}")
  value = concrete_value(group_sizes_e)
  if value is not None:
    if (value < 0).any():
      raise ValueError(f"group_sizes must be non-negative; got {value.tolist()}")
    if int(value.sum()) > num_rows:
      raise ValueError(
          f"group_sizes sum to {int(value.sum())}, more than the {num_rows} rows (M) available"
      )
  return jnp.asarray(group_sizes_e, jnp.int32)


def clip_group_sizes(group_sizes_e: jax.Array, num_rows: int) -> jax.Array:
  """Group sizes with negatives set to 0 and the running total cut at `num_rows`.

  What every implementation does with traced group sizes that `check_group_sizes` could not
  check: the groups are truncated where the rows run out. Costs a few ops on [E] ints.
  """
  ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes_e, 0)), num_rows)
  return jnp.diff(ends, prepend=0).astype(jnp.int32)
