"""How the JAX processes (hosts) share the data pipeline's work.

Every process runs its own pipeline over its own documents (the pipeline's `process_index` /
`process_count` shard). The one piece of work done together is the similarity order
(jaxlm.data.similarity): each process embeds its share of a source, the processes exchange the
results, and process 0 alone chains them and sends the order to the others. A `Hosts` object
carries that exchange:

  index, count      this process and how many there are
  allgather(x)      [x of process 0, x of process 1, ...] on every process (same dtype
                    everywhere; lengths along axis 0 may differ)
  broadcast(x)      process 0's x on every process (x of the same shape and dtype everywhere)

`Local()` is a single process; `JaxHosts()` goes through `jax.distributed` (the processes of a
multi-host run, `jax.experimental.multihost_utils`); `current()` picks the one that applies.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Hosts(Protocol):
  index: int
  count: int

  def allgather(self, x: np.ndarray) -> list[np.ndarray]: ...

  def broadcast(self, x: np.ndarray) -> np.ndarray: ...


class Local:
  """One process: nothing to exchange."""

  index, count = 0, 1

  def allgather(self, x: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(x)]

  def broadcast(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(x)


def share(n: int, index: int, count: int) -> tuple[int, int]:
  """[lo, hi) of process `index`'s contiguous share of n items (sizes differ by at most one)."""
  return index * n // count, (index + 1) * n // count


def _to_device_dtype(x: np.ndarray) -> np.ndarray:
  """jax without x64 holds 32-bit values: 64-bit integers travel as int32 (range checked)."""
  x = np.asarray(x)
  if x.dtype in (np.int64, np.uint64):
    if x.size and (x.max() > np.iinfo(np.int32).max or x.min() < np.iinfo(np.int32).min):
      raise ValueError("hosts: a 64-bit integer array does not fit in int32")
    return x.astype(np.int32)
  if x.dtype == np.float64:
    raise ValueError("hosts: float64 arrays do not travel without jax_enable_x64; send float32")
  if x.dtype == bool:
    return x.astype(np.int32)
  return x


class JaxHosts:
  """The processes of `jax.distributed` (every process must make the same calls in order)."""

  def __init__(self):
    import jax

    self.index, self.count = jax.process_index(), jax.process_count()

  def allgather(self, x: np.ndarray) -> list[np.ndarray]:
    from jax.experimental import multihost_utils

    x = np.asarray(x)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(x)))).reshape(-1)
    padded = np.zeros((int(lengths.max()), *x.shape[1:]), x.dtype)
    padded[: len(x)] = x
    stacked = np.asarray(multihost_utils.process_allgather(_to_device_dtype(padded)))
    return [stacked[p, : lengths[p]].astype(x.dtype) for p in range(self.count)]

  def broadcast(self, x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    x = np.asarray(x)
    return np.asarray(multihost_utils.broadcast_one_to_all(_to_device_dtype(x))).astype(x.dtype)


def current() -> Hosts:
  """JaxHosts when this is one of several JAX processes, else Local."""
  import jax

  return JaxHosts() if jax.process_count() > 1 else Local()
