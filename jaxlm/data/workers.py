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
from typing import Any, Callable, Sequence

import cloudpickle
import grain
import numpy as np

_datasets: list[grain.MapDataset] = []  # in a worker: the sources' MapDatasets


def _init(payload: bytes) -> None:
  global _datasets
  _datasets = cloudpickle.loads(payload)


def _read(source: int, start: int, stop: int) -> tuple[Any, ...]:
  """Elements start..stop-1 of a source: 1-D arrays of one dtype (token arrays) as one array and
  their lengths (one buffer through the pipe, not one pickled object each), else as a list."""
  ds = _datasets[source]
  elems = [ds[i] for i in range(start, stop)]
  if elems and all(isinstance(e, np.ndarray) and e.ndim == 1 and e.dtype == elems[0].dtype for e in elems):
    return np.concatenate(elems), np.array([len(e) for e in elems], np.int64)
  return (elems,)


def _unpack(block: tuple[Any, ...]) -> list[Any]:
  if len(block) == 1:
    return block[0]
  flat, lengths = block
  ends = np.cumsum(lengths).tolist()
  return [flat[e - n : e] for e, n in zip(ends, lengths.tolist())]


class Pool:
  """`workers` processes reading blocks of documents of the given MapDatasets, started on first
  use and shared by the sources of one pipeline. A block holds about `block_tokens` tokens (2 MiB
  of int32; its number of documents follows the sizes seen so far, from `first_block` documents):
  a task costs the training process a fixed ~0.3-1.5 ms on the 2-core test machine, so a block
  should feed many batches (dense_100m, 2 workers: 0.56 ms of the training process's CPU per
  batch with 128K-token blocks, 0.45 ms with 512K, 0.37 ms with the documents in memory)."""

  def __init__(self, datasets: Sequence[grain.MapDataset], workers: int, *, block_tokens: int = 1 << 19, first_block: int = 8):
    if workers < 1:
      raise ValueError(f"Pool: workers must be >= 1, got {workers}")
    self.datasets, self.workers, self.block_tokens, self.first_block = list(datasets), workers, block_tokens, first_block
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
    try:
      self.close()
    except Exception:  # noqa: BLE001 (at interpreter exit the executor may be half torn down)
      pass

  def __getstate__(self):
    raise TypeError("a worker Pool is not sent to other processes")


class PooledDocuments(grain.IterDataset):
  """The elements of `pool.datasets[source]` in index order (Nones skipped, as grain's
  `to_iter_dataset` does), read by the pool `depth` blocks ahead, each passed through `then`
  (in this process) if given."""

  def __init__(self, pool: Pool, source: int, *, depth: int = 0, then: Callable[[Any], Any] | None = None):
    super().__init__()
    self.pool, self.source, self.then = pool, source, then
    self.depth = depth or 2 * pool.workers

  def __iter__(self) -> grain.DatasetIterator:
    return _PooledIterator(self.pool, self.source, self.depth, self.then)

  def __str__(self) -> str:
    return f"PooledDocuments(source={self.source}, workers={self.pool.workers})"


class _PooledIterator(grain.DatasetIterator):
  def __init__(self, pool: Pool, source: int, depth: int, then: Callable[[Any], Any] | None):
    super().__init__()
    self.pool, self.source, self.depth, self.then = pool, source, depth, then
    self.length = len(pool.datasets[source])
    self.next_index = 0  # of the next element returned
    self.tokens_seen = self.docs_seen = 0  # in the blocks received: for the block size
    self._set(0)

  def _set(self, index: int) -> None:
    for f in getattr(self, "pending", ()):
      f.cancel()
    self.next_index = self.submitted = index
    self.pending: collections.deque = collections.deque()  # futures of the blocks after `current`
    self.current: list[Any] = []  # the block being returned: elements next_index, ...
    self.block = self._block_size()  # documents per block

  def _fill(self) -> None:
    while len(self.pending) < self.depth and self.submitted < self.length:
      stop = min(self.submitted + self.block, self.length)
      self.pending.append(self.pool.submit(self.source, self.submitted, stop))
      self.submitted = stop

  def _block_size(self) -> int:
    """About `block_tokens` tokens at the mean document length seen so far."""
    if not self.docs_seen:
      return self.pool.first_block
    return int(np.clip(self.pool.block_tokens * self.docs_seen // max(1, self.tokens_seen), 1, 4096))

  def _resize(self, block: tuple[Any, ...]) -> None:
    if len(block) == 2:  # (tokens, lengths)
      self.tokens_seen, self.docs_seen = self.tokens_seen + block[0].size, self.docs_seen + len(block[1])
      self.block = self._block_size()

  def __next__(self) -> Any:
    while True:
      if not self.current:
        self._fill()
        if not self.pending:
          raise StopIteration
        block = self.pending.popleft().result()
        self._resize(block)
        self.current = _unpack(block)
        self.current.reverse()  # pop() from the end
        self._fill()
      elem = self.current.pop()
      self.next_index += 1
      if elem is not None:
        return elem if self.then is None else self.then(elem)

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
