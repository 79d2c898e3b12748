"""The grain pipeline: per source (documents -> host shard -> tokenize -> pack) -> mixture -> batch.

Each source is a random-access list of documents; documents are shuffled (reshuffled every
epoch, or ordered by similarity chains with `data.similarity`), repeated forever and tokenized
as [BOS] text [EOS] (the tokenizer's special ids). Every JAX process keeps every
`process_count`-th document, so hosts read disjoint data. Packing concatenates a source's
documents and splits at `seq_len` (grain's ConcatThenSplit), recording for every token its
document (`segment_ids`, from 1; 0 would be padding) and its position in that document; nothing
is padded in training. `IterDataset.mix` then interleaves the sources' packed rows by their
weights: the weights are shares of tokens (rows hold the same number of tokens), whatever the
documents' lengths, and every row holds one source.

A batch is a dict of int32 numpy arrays [local_batch, seq_len]: inputs, targets, segment_ids,
positions and loss_mask (1 where the target is a real next token). The whole pipeline is
deterministic for a seed, and the iterator state is a small JSON-able dict, checkpointed with
the model so that a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import grain
import numpy as np
from grain import experimental as grain_experimental

from jaxlm.data import sources
from jaxlm.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]


class Tokenize:
  """text -> {"inputs": tokens[:-1], "targets": tokens[1:]} with tokens = [BOS] text [EOS], the
  tokenizer's own special ids (no BOS when it has none)."""

  def __init__(self, tokenizer: Tokenizer, add_bos: bool = True):
    self.tokenizer, self.add_bos = tokenizer, add_bos and tokenizer.bos_id is not None

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    tok = self.tokenizer
    ids = ([tok.bos_id] if self.add_bos else []) + tok.encode(text) + [tok.eos_id]
    arr = np.asarray(ids, np.int32)
    return {"inputs": arr[:-1], "targets": arr[1:]}


def _finalize(packed: Mapping[str, np.ndarray]) -> Batch:
  seg = packed["targets_segment_ids"].astype(np.int32)
  return {
      "inputs": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      "segment_ids": seg,
      "positions": packed["inputs_positions"].astype(np.int32),
      "loss_mask": (seg > 0).astype(np.int32),
  }


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
) -> grain.IterDataset:
  """Packed LM batches of `batch_size` rows (this process's share) from a weighted mixture.

  `similarity` ("exact", "lsh" or "auto"; see jaxlm.data.similarity) orders every source's
  documents by nearest-neighbour chains instead of shuffling them and packs each source on its
  own, so a row holds neighbouring documents of one source; the mixture then weighs rows.
  """
  names = [k for k, w in mixture.items() if w > 0]
  kw = dict(seq_len=seq_len, add_bos=add_bos, process_index=process_index, process_count=process_count)
  rows = []
  for i, name in enumerate(names):
    docs = sources.load(name, split, cache_dir)
    if similarity != "none":
      rows.append(_similarity_rows(docs, tokenizer, method=similarity, neighbors=similarity_neighbors, seed=seed, cache_dir=cache_dir, **kw))
    else:
      rows.append(_shuffled_rows(docs, tokenizer, shuffle_seed=(seed * 1_000_003 + i) if shuffle else None, **kw))
  it = rows[0] if len(rows) == 1 else grain.IterDataset.mix(rows, [float(mixture[n]) for n in names])
  return it.batch(batch_size, drop_remainder=True).map(_finalize)


def _pack(ds: grain.MapDataset, seq_len: int) -> grain.IterDataset:
  return grain_experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"inputs": seq_len, "targets": seq_len})


def _shuffled_rows(docs: Sequence[str], tokenizer: Tokenizer, *, shuffle_seed: int | None, seq_len: int, add_bos: bool, process_index: int, process_count: int) -> grain.IterDataset:
  """One source's documents, shuffled anew every epoch, this process's share, packed into rows."""
  ds = grain.MapDataset.source(docs)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat()
  if process_count > 1:
    ds = ds[process_index::process_count]
  return _pack(ds.map(Tokenize(tokenizer, add_bos)), seq_len)


class _Reordered(Sequence[str]):
  def __init__(self, docs: Sequence[str], order: np.ndarray):
    self.docs, self.order = docs, order

  def __len__(self) -> int:
    return len(self.order)

  def __getitem__(self, i):  # type: ignore[override]
    return self.docs[int(self.order[i])]


def _similarity_rows(docs: Sequence[str], tokenizer: Tokenizer, *, method: str, neighbors: int, seed: int, cache_dir: str, seq_len: int, add_bos: bool, process_index: int, process_count: int) -> grain.IterDataset:
  """One source's documents in In-Context-Pretraining order, this process's contiguous share of
  the chain, repeated and packed into rows (In-Context Pretraining, Shi et al. 2023)."""
  from jaxlm.data import similarity
  from jaxlm.data.stdlib_corpus import default_cache_dir

  order = similarity.similarity_order(docs, k=neighbors, method=method, seed=seed, cache_dir=default_cache_dir(cache_dir))
  n = len(order)
  share = order[process_index * n // process_count : (process_index + 1) * n // process_count]
  return _pack(grain.MapDataset.source(_Reordered(docs, share)).repeat().map(Tokenize(tokenizer, add_bos)), seq_len)


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
