"""Data: packing bookkeeping, determinism, host sharding, the stdlib corpus (tokenizers: test_tokenizers.py)."""

import numpy as np
import pytest

from jaxlm.data import pipeline, sources
from jaxlm.data.stdlib_corpus import split_of
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import ConfigError

MIX = {"stdlib_prose": 0.5, "stdlib_code": 0.5}


def test_corpus_has_two_sources_with_disjoint_splits():
  for name in MIX:
    train, val = sources.load(name, "train"), sources.load(name, "validation")
    assert len(train) > 10 and len(val) > 3
  assert split_of("some/name") == split_of("some/name")
  code = sources.load("stdlib_code", "train")
  assert any("def " in code[i] for i in range(5))


def _ds(process_index=0, process_count=1, seed=0, batch_size=4):
  return pipeline.lm_dataset(MIX, "train", ByteTokenizer(), seq_len=64, batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count)


def test_packing_bookkeeping():
  b = next(iter(_ds()))
  assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask", *pipeline.HOST_FIELDS}
  assert all(b[k].shape == (4, 64) and b[k].dtype == np.int32 for k in b if k not in pipeline.HOST_FIELDS)
  assert b["source"].shape == (4,) and set(b["source"]) <= {0, 1}  # each row's source, kept on the host
  for row in range(4):
    seg, pos, inp, tgt = b["segment_ids"][row], b["positions"][row], b["inputs"][row], b["targets"][row]
    for j in range(1, 64):
      if seg[j] == seg[j - 1]:
        assert pos[j] == pos[j - 1] + 1
        assert inp[j] == tgt[j - 1]  # within a document, targets are the next inputs
      else:
        assert pos[j] == 0
    starts = [j for j in range(64) if pos[j] == 0 and (j == 0 or seg[j] != seg[j - 1])]
    assert all(inp[j] == ByteTokenizer.bos_id for j in starts[1:])  # every new document starts with BOS
  assert b["loss_mask"].all()  # training batches are fully packed


def test_deterministic_for_a_seed_and_different_across_seeds():
  a = [next(iter(_ds(seed=3)))["inputs"] for _ in range(2)]
  np.testing.assert_array_equal(a[0], a[1])
  assert not np.array_equal(a[0], next(iter(_ds(seed=4)))["inputs"])


def test_hosts_read_disjoint_shards():
  def docs(ds, n=3):
    it = iter(ds)
    rows = np.concatenate([next(it)["inputs"] for _ in range(n)])
    return {tuple(r[:32]) for r in rows}

  h0, h1 = docs(_ds(0, 2, batch_size=2)), docs(_ds(1, 2, batch_size=2))
  assert not h0 & h1


def test_iterator_state_resumes_exactly():
  it = iter(_ds())
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(2)]
  it2 = iter(_ds())
  it2.set_state(state)
  np.testing.assert_array_equal(expected, [next(it2)["inputs"] for _ in range(2)])


@pytest.mark.parametrize("similarity", ["none", "exact"])
def test_mixture_weights_are_token_shares(similarity):
  """Every row holds one source (its `source` field says which, and its text agrees), and a
  source's weight is its share of the rows, so of the tokens."""
  tok = ByteTokenizer()
  prose = sources.load("stdlib_prose", "train")
  prose_text = "\n".join(prose[i] for i in range(len(prose)))
  ds = pipeline.lm_dataset({"stdlib_prose": 0.7, "stdlib_code": 0.3}, "train", tok, seq_len=256, batch_size=50, seed=0, similarity=similarity)
  batches = list(pipeline.take(ds, 4))

  def is_prose(inputs, segment_ids):
    longest = np.bincount(segment_ids).argmax()  # the row's longest document piece
    text = tok.decode(inputs[segment_ids == longest])
    return text[8:48] in prose_text

  said = np.concatenate([b["source"] == 0 for b in batches])
  seen = np.array([is_prose(b["inputs"][r], b["segment_ids"][r]) for b in batches for r in range(50)])
  assert (said == seen).mean() > 0.95
  assert abs(said.mean() - 0.7) <= 1 / 200, said.mean()  # within a row of 70% of 200 rows


def test_file_sources(tmp_path):
  (tmp_path / "a.jsonl").write_text("\n".join('{"text": "doc %d"}' % i for i in range(120)))
  train, val = sources.load(f"jsonl:{tmp_path}/a.jsonl", "train"), sources.load(f"jsonl:{tmp_path}/a.jsonl", "validation")
  assert len(train) + len(val) == 120 and not set(train) & set(val)
  with pytest.raises(ConfigError, match="no files match"):
    sources.load(f"text:{tmp_path}/*.txt", "train")
  with pytest.raises(ConfigError, match="unknown data source"):
    sources.check("nosuchsource")
