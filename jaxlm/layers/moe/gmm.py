"""The grouped matmul of the experts, one function with registered backends.

    grouped_matmul(x_mk, w_ekn, group_sizes_e, *, backend, block_rows) -> y_mn

Rows of x are grouped by expert, groups contiguous and in expert order; group e has
group_sizes_e[e] rows and is multiplied by w_ekn[e]. `group_sizes_e=None` means E equal groups
of M / E rows (the [E, C, K] capacity buffer). Rows past sum(group_sizes_e) are zero.

Backends:
  ragged_dot       jax.lax.ragged_dot: native grouped matmul on TPU and GPU. On CPU XLA expands
                   it to a dense masked matmul (E times the useful FLOPs).
  capacity_einsum  fixed-capacity batched einsum. With equal groups: einsum over [E, C, K]. With
                   ragged groups: rows sit in blocks of `block_rows` rows, each block holding one
                   expert's rows (group sizes are multiples of block_rows; the dropless layout
                   pads them), each block's weight is gathered and one batched einsum
                   [G, b, K] x [G, K, N] runs over the blocks. The fastest on CPU.
  pallas           pallas_kernels.gmm.grouped_matmul with its automatic implementation, chosen
                   when lowering: the Mosaic kernel on TPU, XLA ragged_dot elsewhere (GPU
                   included: its Triton kernel is not in pallas_kernels.dispatch.
                   AUTO_KERNEL_PLATFORMS yet).

"auto" picks capacity_einsum on CPU and pallas on TPU and GPU, for the platform the step is
built for (`target_platform`): the devices of the mesh it is traced under, so a step compiled
ahead of time for a TPU slice on a CPU host gets the TPU choice.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxlm.errors import ConfigError
from jaxlm.layers.experts import ExpertWeights
from jaxlm.layers.linear import Rows
from jaxlm.registry import Registry

GMM: Registry = Registry("grouped matmul backend")


@GMM.register("ragged_dot")
def ragged_dot(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array | None, *, block_rows: int = 1) -> jax.Array:
  del block_rows
  e = w_ekn.shape[0]
  if group_sizes_e is None:
    group_sizes_e = jnp.full((e,), x_mk.shape[0] // e, jnp.int32)
  return jax.lax.ragged_dot(x_mk, w_ekn.astype(x_mk.dtype), group_sizes_e.astype(jnp.int32))


@GMM.register("capacity_einsum")
def capacity_einsum(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array | None, *, block_rows: int = 1) -> jax.Array:
  m, k = x_mk.shape
  e, _, n = w_ekn.shape
  w_ekn = w_ekn.astype(x_mk.dtype)
  if group_sizes_e is None:
    return jnp.einsum("eck,ekn->ecn", x_mk.reshape(e, m // e, k), w_ekn).reshape(m, n)
  if m % block_rows:
    raise ValueError(f"capacity_einsum: {m} rows are not a whole number of {block_rows}-row blocks")
  g = m // block_rows
  # Block j belongs to the expert whose group contains row j * block_rows; blocks past the
  # groups get expert E, whose gathered weight is zero (their output rows are zero).
  ends = jnp.cumsum(group_sizes_e)
  block_expert = jnp.searchsorted(ends, jnp.arange(g, dtype=ends.dtype) * block_rows, side="right")
  w_gkn = jnp.take(w_ekn, block_expert, axis=0, mode="fill", fill_value=0)
  return jnp.einsum("gbk,gkn->gbn", x_mk.reshape(g, block_rows, k), w_gkn).reshape(m, n)


@GMM.register("pallas")
def pallas(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array | None, *, block_rows: int = 1) -> jax.Array:
  """pallas_kernels.gmm.grouped_matmul: the Mosaic kernel on TPU, XLA ragged_dot elsewhere."""
  del block_rows
  from pallas_kernels.gmm import grouped_matmul as pallas_gmm

  e = w_ekn.shape[0]
  if group_sizes_e is None:
    group_sizes_e = jnp.full((e,), x_mk.shape[0] // e, jnp.int32)
  return pallas_gmm(x_mk, w_ekn.astype(x_mk.dtype), group_sizes_e.astype(jnp.int32))


def target_platform() -> str:
  """The platform the computation being traced is built for ("cpu", "tpu", "gpu").

  That of the devices of the mesh set with `jax.set_mesh` (which may be a TPU slice that is not
  here, when compiling ahead of time from a CPU host); `jax.default_backend()` without a mesh.
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  return jax.default_backend() if device is None else device.platform


def resolve_backend(name: str, platform: str | None = None) -> str:
  """'auto' -> capacity_einsum on CPU, else pallas; `platform` defaults to `target_platform()`."""
  if name != "auto":
    if name not in GMM:
      raise ConfigError(f"model.moe.gmm_backend: {name!r} is not available here; known: {', '.join(GMM.keys())}")
    return name
  return "capacity_einsum" if (platform or target_platform()) == "cpu" else "pallas"


def block_rows_for(backend: str, n_rows: int, n_experts: int, block_rows: int = 0) -> int:
  """Row multiple the dropless layout must pad each expert's group to for `backend`.

  capacity_einsum computes at most E * (b - 1) padding rows; the automatic b = N / 8E (a
  multiple of 8) bounds that by 1/8 of the rows while keeping the blocks few (about 9 E, each
  with its expert's weights gathered) and large enough for efficient matmuls. On a 2-core CPU
  (N = 8192, E = 8, D = 256, F = 384) b = 128 was fastest with the FLOPs bound kept; b = 64
  cost 20% more time, b = 256 twice the padding.
  """
  if backend != "capacity_einsum":
    return 1
  if block_rows:
    return block_rows
  return max(8, 8 * math.ceil(n_rows / (8 * n_experts) / 8))


def grouped_matmul(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array | None = None, *, backend: str = "auto", block_rows: int = 1) -> jax.Array:
  """y[rows of group e] = x[rows of group e] @ w[e]; see the module docstring."""
  fn: Callable[..., jax.Array] = GMM.get(resolve_backend(backend))
  return fn(x_mk, w_ekn, group_sizes_e, block_rows=block_rows)


def run_experts(
    x_md: jax.Array,
    experts: ExpertWeights,
    group_sizes_e: jax.Array | None,
    *,
    backend: str,
    block_rows: int = 1,
    n_gates: int = 0,
) -> jax.Array:
  """SwiGLU of each row with its expert's weights: (silu(x W_gate[e]) * (x W_up[e])) W_down[e].

  With `n_gates` > 0 the last n_gates columns of x are not features but the row's gates over a
  bank of adapters (dispatched with the row, see `forward.routed_local`); they are split off here.
  """
  gates = None
  if n_gates:
    x_md, gates = x_md[:, :-n_gates], x_md[:, -n_gates:].astype(jnp.float32)
  mm = lambda a, w: grouped_matmul(a, w, group_sizes_e, backend=backend, block_rows=block_rows)
  return experts.swiglu_grouped(x_md, mm, Rows(group_sizes_e, experts.n_experts, gates))
