"""Mixtures by tokens: rows of several sources interleaved so that each source's weight is its
share of the training tokens, with weights that may change at given steps (`data.stages`).

The pipeline packs every source on its own into rows of `seq_len` tokens, so a row holds
`seq_len` tokens of one source and a share of rows is a share of tokens, whatever the sources'
document lengths. Mixing documents before packing (grain's example-level mixing) would give each
source its share of documents instead: with longer documents in one source, a 70/30 mixture of
documents is another split of tokens (`tests/data/test_mixture.py` measures both).

Row n of a stage that starts at row r comes from the source i with the largest deficit
w_i * (n - r + 1) - c_i, where c_i counts the rows source i gave in this stage so far (ties: the
first source): a deterministic weighted round-robin that keeps every source within one row of
its share at every row. The choice depends on n and the weights only, so every host picks the
same sources in the same order, and a global batch holds each source `process_count` times
what one host's rows hold.

The iterator state is the parents' states, the row and the stage's counts: a small JSON-able
dict, so a run resumed anywhere (across a stage boundary too) sees the rows it would have seen.
"""

from __future__ import annotations

import bisect
from typing import Any, Mapping, Sequence

import grain
import numpy as np

Stages = Sequence[tuple[int, Mapping[str, float]]]


def source_names(mixture: Mapping[str, float], stages: Stages = ()) -> list[str]:
  """The sources read at some point: a positive weight in the mixture or in a stage, mixture order."""
  return [k for k in mixture if mixture[k] > 0 or any(w.get(k, 0) > 0 for _, w in stages)]


def stage_weights(mixture: Mapping[str, float], stages: Stages, names: Sequence[str]) -> list[tuple[int, np.ndarray]]:
  """[(first step, normalised weights over `names`)]: the mixture from step 0, then each stage
  (a stage's weights replace the mixture's; a source it leaves out gets 0)."""
  out = []
  for step, weights in [(0, mixture), *stages]:
    w = np.array([float(weights.get(n, 0.0)) for n in names], np.float64)
    out.append((int(step), w / w.sum()))
  return out


class StagedMix(grain.IterDataset):
  """Rows of `parents` mixed by weights that change at given rows.

  `stages` is [(first row, weights per parent)], the first at row 0, rows increasing, each
  weight vector summing to 1. Every row gets a "source" field: the index of its parent.
  """

  def __init__(self, parents: Sequence[grain.IterDataset], stages: Sequence[tuple[int, np.ndarray]]):
    super().__init__(list(parents))
    starts = [s for s, _ in stages]
    if not starts or starts[0] != 0 or starts != sorted(set(starts)):
      raise ValueError(f"StagedMix: stage rows must start at 0 and increase, got {starts}")
    if any(len(w) != len(parents) for _, w in stages):
      raise ValueError("StagedMix: every stage needs one weight per parent")
    self.stages = [(int(s), np.asarray(w, np.float64)) for s, w in stages]

  def __iter__(self) -> grain.DatasetIterator:
    return _StagedMixIterator([p.__iter__() for p in self._parents], self.stages)

  def __str__(self) -> str:
    return f"StagedMix({len(self._parents)} parents, {len(self.stages)} stages)"


class _StagedMixIterator(grain.DatasetIterator):
  def __init__(self, parents: list[grain.DatasetIterator], stages: list[tuple[int, np.ndarray]]):
    super().__init__(parents)
    self.stages = stages
    self.starts = [s for s, _ in stages]
    self.row, self.stage = 0, 0
    self.counts = np.zeros(len(parents), np.int64)

  def __next__(self) -> dict[str, Any]:
    stage = bisect.bisect_right(self.starts, self.row) - 1
    if stage != self.stage:
      self.stage, self.counts = stage, np.zeros_like(self.counts)
    start, w = self.stages[stage]
    i = int(np.argmax(w * (self.row - start + 1) - self.counts))
    elem = next(self._parents[i])
    self.counts[i] += 1
    self.row += 1
    return {**elem, "source": np.int32(i)}

  def get_state(self) -> dict[str, Any]:
    return {"parents": [p.get_state() for p in self._parents], "row": self.row, "stage": self.stage, "counts": self.counts.tolist()}

  def set_state(self, state: dict[str, Any]) -> None:
    for parent, s in zip(self._parents, state["parents"]):
      parent.set_state(s)
    self.row, self.stage = int(state["row"]), int(state["stage"])
    self.counts = np.asarray(state["counts"], np.int64)

  def __str__(self) -> str:
    return f"StagedMixIterator(row={self.row}, stage={self.stage})"


def tokens_by_source(batch: Mapping[str, np.ndarray], n_sources: int) -> np.ndarray:
  """[n_sources] target tokens of each source in a batch (its "source" and "loss_mask" fields)."""
  return np.bincount(batch["source"], weights=batch["loss_mask"].sum(axis=1), minlength=n_sources).astype(np.int64)


class TokenCounter:
  """Target tokens of each source in the batches `add`ed since the last `take`, for the metrics.

  Counts one host's batches times `process_count`: every host picks the same sources for its
  rows (StagedMix), so that is the global count.
  """

  def __init__(self, names: Sequence[str], process_count: int = 1):
    self.names, self.process_count = list(names), process_count
    self.counts = np.zeros(len(self.names), np.int64)

  def add(self, batch: Mapping[str, np.ndarray]) -> None:
    self.counts += tokens_by_source(batch, len(self.names))

  def take(self) -> dict[str, int]:
    """{"tokens/<source>": tokens since the last take}, and start counting anew."""
    out = {f"tokens/{n}": int(c) * self.process_count for n, c in zip(self.names, self.counts)}
    self.counts[:] = 0
    return out
