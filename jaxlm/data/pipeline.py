"""The grain pipeline: per source (documents -> host shard -> tokenize -> pack) -> mixture -> batch.

Each source is a random-access list of documents (jaxlm.data.sources); documents are shuffled
(reshuffled every epoch, or ordered by similarity chains with `data.similarity`), repeated
forever and tokenized as [BOS] text [EOS] (the tokenizer's special ids). Every JAX process
keeps every `process_count`-th document (a contiguous share of the similarity chain), so hosts
read disjoint data and no host reads another's. Packing (jaxlm.data.packing: grain's
ConcatThenSplit rows, in fewer copies) concatenates a source's documents and splits at
`seq_len`, recording for every token its document (`segment_ids`, from 1; 0 would be padding)
and its position in that document; nothing is padded in training. `mixture.StagedMix` then
interleaves the sources' packed rows by their weights, which may change at given steps
(`stages`): a row holds `seq_len` tokens of one source, so the weights are shares of tokens
whatever the documents' lengths.

A batch is a dict of int32 numpy arrays [local_batch, seq_len]: inputs, targets, segment_ids,
positions and loss_mask (1 where the target is a real next token), and `source` [local_batch],
each row's index in `mixture.source_names(...)`: a host-side field (HOST_FIELDS) that never goes
to the devices, from which the loop counts the tokens of each source. The whole pipeline is
deterministic for a seed, and the iterator state is a small JSON-able dict, checkpointed with
the model so that a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import grain
import numpy as np

from jaxlm.data import sources
from jaxlm.data.hosts import Hosts
from jaxlm.data.mixture import Stages, StagedMix, source_names, stage_weights
from jaxlm.data.packing import ConcatThenSplit
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.data.workers import Pool, PooledDocuments

Batch = dict[str, np.ndarray]
HOST_FIELDS = ("source",)  # batch fields for the host (metrics), not for the model
# Per source: a few threads read and tokenize ahead. grain's default (16 threads, 500 elements)
# spends more time polling its buffer than tokenizing bytes (measured: 1.6M -> 3.5M tokens/s).
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)


class Tokenize:
  """text -> {"inputs": tokens[:-1], "targets": tokens[1:]} with tokens = [BOS] text [EOS], the
  tokenizer's own special ids (no BOS when it has none). A tokenizer with `encode_array(text)`
  (an int array) skips the Python list. Worker processes send `tokens(text)` (each token once)
  and the training process `split`s it."""

  def __init__(self, tokenizer: Tokenizer, add_bos: bool = True):
    self.tokenizer, self.add_bos = tokenizer, add_bos and tokenizer.bos_id is not None
    self.encode = getattr(tokenizer, "encode_array", None) or tokenizer.encode

  def tokens(self, text: str) -> np.ndarray:
    tok, bos = self.tokenizer, int(self.add_bos)
    ids = self.encode(text)
    arr = np.empty(bos + len(ids) + 1, np.int32)
    if bos:
      arr[0] = tok.bos_id
    arr[bos:-1] = ids
    arr[-1] = tok.eos_id
    return arr

  @staticmethod
  def split(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": tokens[:-1], "targets": tokens[1:]}

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    return self.split(self.tokens(text))


_ROW_FIELDS = ("inputs", "targets", "segment_ids", "positions")  # a packed row's [seq_len] fields


class Batches(grain.IterDataset):
  """Packed rows -> batches of `batch_size` rows (a partial last batch is dropped): int32 arrays
  [batch_size, seq_len] filled row by row, "loss_mask" (segment_ids > 0) and "source"
  [batch_size]. (grain's batch then a map stacked and cast every field: ~2.5x the time.)"""

  def __init__(self, parent: grain.IterDataset, batch_size: int):
    super().__init__(parent)
    self.batch_size = batch_size

  def __iter__(self) -> grain.DatasetIterator:
    return _BatchesIterator(self._parent.__iter__(), self.batch_size)


class _BatchesIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self.batch_size = batch_size

  def __next__(self) -> Batch:
    first = next(self._parent)
    out = {k: np.empty((self.batch_size, *np.shape(first[k])), np.int32) for k in _ROW_FIELDS}
    source = np.empty(self.batch_size, np.int32)
    row = first
    for i in range(self.batch_size):
      if i:
        row = next(self._parent)
      for k in _ROW_FIELDS:
        out[k][i] = row[k]
      source[i] = row["source"]
    return {**out, "loss_mask": (out["segment_ids"] > 0).astype(np.int32), "source": source}

  def get_state(self) -> dict:
    return self._parent.get_state()  # between batches: the parent's state says it all

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


def lm_dataset(
    mixture: Mapping[str, float],
    split: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    add_bos: bool = True,
    cache_dir: str = "",
    process_index: int = 0,
    process_count: int = 1,
    similarity: str = "none",
    similarity_neighbors: int = 8,
    stages: Stages = (),
    hosts: Hosts | None = None,
    workers: int = 0,
) -> grain.IterDataset:
  """Packed LM batches of `batch_size` rows (this process's share) from a weighted mixture.

  `stages` ((step, {source: weight}), ...) replaces the weights from batch `step` on (the batch
  of the optimizer step after `step` steps; a source a stage leaves out gets 0). `similarity`
  ("exact", "lsh" or "auto"; see jaxlm.data.similarity) orders every source's documents by
  nearest-neighbour chains instead of shuffling them and packs each source on its own, so a row
  holds neighbouring documents of one source; `hosts` (jaxlm.data.hosts) shares the work of
  ordering between the JAX processes (default: this process orders every source alone).
  `workers` processes read and tokenize the documents (jaxlm.data.workers; 0: this process, a
  few threads per source); the batches are the same for every number of workers.
  """
  names = source_names(mixture, stages)
  kw = dict(process_index=process_index, process_count=process_count)
  texts = []  # per source: its documents in training order, this process's share
  for i, name in enumerate(names):
    docs = sources.load(name, split, cache_dir)
    if similarity != "none":
      order = dict(method=similarity, neighbors=similarity_neighbors, seed=seed, cache_dir=cache_dir, hosts=hosts)
      texts.append(_similarity_texts(docs, key=f"{name}/{split}", **order, **kw))
    else:
      texts.append(_shuffled_texts(docs, shuffle_seed=(seed * 1_000_003 + i) if shuffle else None, **kw))
  tokenize = Tokenize(tokenizer, add_bos)
  if workers:
    pool = Pool([t.map(tokenize.tokens) for t in texts], workers)
    readers = [PooledDocuments(pool, i, then=Tokenize.split) for i in range(len(texts))]
  else:
    readers = [t.map(tokenize).to_iter_dataset(read_options=READ_OPTIONS) for t in texts]
  rows = [_pack(r, seq_len) for r in readers]
  weights = [(step * batch_size, w) for step, w in stage_weights(mixture, stages, names)]
  return Batches(StagedMix(rows, weights), batch_size)


def _pack(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  return ConcatThenSplit(docs, seq_len)


def _shuffled_texts(docs: Sequence[str], *, shuffle_seed: int | None, process_index: int, process_count: int) -> grain.MapDataset:
  """One source's documents, shuffled anew every epoch, repeated, this process's share."""
  ds = grain.MapDataset.source(docs)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat()
  if process_count > 1:
    ds = ds[process_index::process_count]
  return ds


class _Reordered(Sequence[str]):
  def __init__(self, docs: Sequence[str], order: np.ndarray):
    self.docs, self.order = docs, order

  def __len__(self) -> int:
    return len(self.order)

  def __getitem__(self, i):  # type: ignore[override]
    return self.docs[int(self.order[i])]


def _similarity_texts(docs: Sequence[str], *, key: str, method: str, neighbors: int, seed: int, cache_dir: str, hosts: Hosts | None, process_index: int, process_count: int) -> grain.MapDataset:
  """One source's documents in In-Context-Pretraining order, this process's contiguous share of
  the chain, repeated (In-Context Pretraining, Shi et al. 2023)."""
  from jaxlm.data import similarity
  from jaxlm.data.stdlib_corpus import default_cache_dir

  fingerprint = f"{key}/{sources.fingerprint(docs)}"
  order = similarity.similarity_order(docs, k=neighbors, method=method, seed=seed, cache_dir=default_cache_dir(cache_dir), fingerprint=fingerprint, hosts=hosts)
  n = len(order)
  share = order[process_index * n // process_count : (process_index + 1) * n // process_count]
  return grain.MapDataset.source(_Reordered(docs, share)).repeat()


def take(ds: grain.IterDataset, n: int) -> Iterator[Batch]:
  it = iter(ds)
  for _ in range(n):
    yield next(it)


def sample_texts(mixture: Mapping[str, float], *, max_chars: int, cache_dir: str = "") -> Iterator[str]:
  """Training documents from every source in the mixture (for training a tokenizer)."""
  per_source = max_chars // max(1, sum(w > 0 for w in mixture.values()))
  for name, w in mixture.items():
    if w <= 0:
      continue
    docs, used = sources.load(name, "train", cache_dir), 0
    for i in range(len(docs)):
      text = docs[i]
      yield text
      used += len(text)
      if used >= per_source:
        break
