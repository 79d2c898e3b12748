"""Documents read in worker processes: the pipeline's per-document work on more than one core.

Reading a document (index shuffle, record read and decode) and tokenizing it cost the training
process tens to hundreds of microseconds per document, all under one GIL; packing and mixing the
rows cost much less. So `data.workers` processes read and tokenize the documents, in blocks of
consecutive indices of each source's grain MapDataset (shuffled, repeated, host-sharded,
tokenized), and the training process keeps packing and mixing. The documents come back in index
order, exactly those grain's `to_iter_dataset` would give, so the rows do not depend on the
number of workers (0 reads in process), and the state is the same `{"next_index": i}`: a
checkpoint written with one worker count restores with another.

Why not grain's `mp_prefetch`: it splits the dataset into one slice per worker (documents
w, w+W, ...), so packing in the workers makes the rows depend on W, and over the whole pipeline
each worker's mixture counts only its own rows, so `data.stages` switch W times too late.
Worker processes start from a fork server (one interpreter that imported the pipeline, forked
per pool): never forked from the training process, whose JAX threads a fork would copy mid-state.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
from typing import Any, Sequence

import cloudpickle
import grain

_datasets: list[grain.MapDataset] = []  # in a worker: the sources' MapDatasets


def _init(payload: bytes) -> None:
  global _datasets
  _datasets = cloudpickle.loads(payload)


def _read(source: int, start: int, stop: int) -> list[Any]:
  ds = _datasets[source]
  return [ds[i] for i in range(start, stop)]


class Pool:
  """`workers` processes reading blocks of documents of the given MapDatasets, started on first
  use and shared by the sources of one pipeline."""

  def __init__(self, datasets: Sequence[grain.MapDataset], workers: int, *, block: int = 16):
    if workers < 1:
      raise ValueError(f"Pool: workers must be >= 1, got {workers}")
    self.datasets, self.workers, self.block = list(datasets), workers, block
    self._executor: concurrent.futures.ProcessPoolExecutor | None = None

  def submit(self, source: int, start: int, stop: int) -> concurrent.futures.Future:
    if self._executor is None:
      ctx = multiprocessing.get_context("forkserver")
      ctx.set_forkserver_preload(["jaxlm.data.workers", "jaxlm.data.pipeline"])
      self._executor = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init, initargs=(cloudpickle.dumps(self.datasets),))
    return self._executor.submit(_read, source, start, stop)

  def pids(self) -> list[int]:
    """The worker processes' ids (none before the first read), e.g. to measure their CPU time."""
    return list(self._executor._processes) if self._executor is not None else []  # noqa: SLF001 (the executor does not list them otherwise)

  def close(self) -> None:
    if self._executor is not None:
      self._executor.shutdown(wait=False, cancel_futures=True)
      self._executor = None

  def __del__(self):
    self.close()

  def __getstate__(self):
    raise TypeError("a worker Pool is not sent to other processes")


class PooledDocuments(grain.IterDataset):
  """The elements of `pool.datasets[source]` in index order (Nones skipped, as grain's
  `to_iter_dataset` does), read by the pool `depth` blocks ahead."""

  def __init__(self, pool: Pool, source: int, *, depth: int = 0):
    super().__init__()
    self.pool, self.source = pool, source
    self.depth = depth or 2 * pool.workers

  def __iter__(self) -> grain.DatasetIterator:
    return _PooledIterator(self.pool, self.source, self.depth)

  def __str__(self) -> str:
    return f"PooledDocuments(source={self.source}, workers={self.pool.workers})"


class _PooledIterator(grain.DatasetIterator):
  def __init__(self, pool: Pool, source: int, depth: int):
    super().__init__()
    self.pool, self.source, self.depth = pool, source, depth
    self.length = len(pool.datasets[source])
    self.next_index = 0  # of the next element returned
    self._set(0)

  def _set(self, index: int) -> None:
    for f in getattr(self, "pending", ()):
      f.cancel()
    self.next_index = self.submitted = index
    self.pending: collections.deque = collections.deque()  # futures of the blocks after `current`
    self.current: list[Any] = []  # the block being returned: elements next_index, ...

  def _fill(self) -> None:
    while len(self.pending) < self.depth and self.submitted < self.length:
      stop = min(self.submitted + self.pool.block, self.length)
      self.pending.append(self.pool.submit(self.source, self.submitted, stop))
      self.submitted = stop

  def __next__(self) -> Any:
    while True:
      if not self.current:
        self._fill()
        if not self.pending:
          raise StopIteration
        self.current = self.pending.popleft().result()
        self.current.reverse()  # pop() from the end
        self._fill()
      elem = self.current.pop()
      self.next_index += 1
      if elem is not None:
        return elem

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self.next_index}

  def set_state(self, state: dict[str, Any]) -> None:
    self._set(int(state["next_index"]))

  def close(self) -> None:
    for f in self.pending:
      f.cancel()
    self.pending.clear()

  def __str__(self) -> str:
    return f"PooledIterator(source={self.source}, next_index={self.next_index})"
