"""Packing (jaxlm.data.packing): grain's ConcatThenSplit rows bitwise, exact resume alone, through
the pipeline and the staged mixture on a host shard; worker processes (jaxlm.data.workers): the
same batches, states that restore across worker counts, errors that reach the caller."""

import json

import grain
import numpy as np
import pytest
from grain import experimental as grain_experimental

from jaxlm.data import pipeline
from jaxlm.data.packing import ConcatThenSplit
from jaxlm.data.tokenizers import ByteTokenizer


def _docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for n in lengths:
    tokens = rng.integers(3, 259, size=int(n) + 1).astype(np.int32)
    out.append({"inputs": tokens[:-1], "targets": tokens[1:]})
  return out


def _grain_rows(docs, seq_len):
  ds = grain.MapDataset.source(docs).to_iter_dataset()
  return list(grain_experimental.ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len}))


def _assert_rows_equal(ours, ref):
  assert len(ours) == len(ref)
  for a, b in zip(ours, ref):
    assert set(a) == {"inputs", "targets", "segment_ids", "positions"}
    for k in ("inputs", "targets"):
      assert a[k].dtype == b[k].dtype
      np.testing.assert_array_equal(a[k], b[k])
    for k in ("segment_ids", "positions"):
      assert a[k].dtype == np.int32
      np.testing.assert_array_equal(a[k], b[f"inputs_{k}"])
      np.testing.assert_array_equal(a[k], b[f"targets_{k}"])


@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_rows_equal_grains_concat_then_split(seq_len):
  """The reference: grain's packer on the same documents, including documents longer than a row,
  exactly a row, one token longer or shorter, empty ones, and a padded last row."""
  rng = np.random.default_rng(seq_len)
  special = [0, 1, seq_len - 1, seq_len, seq_len + 1, 2 * seq_len, 3 * seq_len + 2]
  for trial in range(40):
    pool = special if trial % 2 else list(range(3 * seq_len + 3))
    docs = _docs(rng.choice(pool, size=int(rng.integers(1, 25))), seed=trial)
    ours = list(ConcatThenSplit(grain.MapDataset.source(docs).to_iter_dataset(), seq_len))
    _assert_rows_equal(ours, _grain_rows(docs, seq_len))


def test_split_document_positions_restart_and_segments_count_pieces():
  """A document split across rows continues in the next row as its segment 1 from position 0
  (grain's numbering, kept); a row's pieces are numbered from 1; only the last row is padded."""
  rows = list(ConcatThenSplit(grain.MapDataset.source(_docs([3, 6, 2])).to_iter_dataset(), 4))
  np.testing.assert_array_equal([r["segment_ids"] for r in rows], [[1, 1, 1, 2], [1, 1, 1, 1], [1, 2, 2, 0]])
  np.testing.assert_array_equal([r["positions"] for r in rows], [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 1, 0]])
  assert rows[-1]["inputs"][-1] == 0 and rows[-1]["targets"][-1] == 0


def test_bad_documents_are_refused():
  with pytest.raises(ValueError, match="seq_len"):
    ConcatThenSplit(grain.MapDataset.source(_docs([3])).to_iter_dataset(), 0)
  bad = [{"inputs": np.zeros(3, np.int32), "targets": np.zeros(4, np.int32)}]
  with pytest.raises(ValueError, match="one length"):
    next(iter(ConcatThenSplit(grain.MapDataset.source(bad).to_iter_dataset(), 4)))


IN_THREAD = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # no prefetch threads: faster here


def _source_rows(lengths, seq_len=16, read_options=None):
  ds = grain.MapDataset.source(_docs(lengths)).shuffle(seed=3).repeat().to_iter_dataset(read_options=read_options or IN_THREAD)
  return ConcatThenSplit(ds, seq_len)


RANDOM_LENGTHS = np.random.default_rng(1).integers(0, 40, size=50)
ROW_LENGTHS = [16, 8, 8, 16, 4, 12, 0, 16]  # rows end at document ends (grain's state breaks in JSON there)


def _restored(make, state):
  it = iter(make())
  it.set_state(json.loads(json.dumps(state)))  # the checkpoint holds it as JSON
  return it


@pytest.mark.parametrize("lengths, read_options", [(RANDOM_LENGTHS, pipeline.READ_OPTIONS), (ROW_LENGTHS, IN_THREAD)], ids=["random", "row_ends"])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 13])
def test_resume_is_exact(n, lengths, read_options):
  """Iterate n rows, save the state, take m more; a fresh pipeline restored to the state gives
  the same m rows bitwise (the state may sit inside a document split across rows, or at the
  end of one)."""
  it = iter(_source_rows(lengths, read_options=read_options))
  for _ in range(n):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(8)]
  got = _restored(lambda: _source_rows(lengths, read_options=read_options), state)
  for e in expected:
    g = next(got)
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])


@pytest.mark.parametrize("lengths", [RANDOM_LENGTHS, ROW_LENGTHS], ids=["random", "row_ends"])
def test_a_state_of_grains_packer_restores_to_its_rows(lengths):
  """Checkpoints written before this packer hold grain's packer state: restored (through JSON)
  into this packer, the rows are the ones grain's straight run gives next."""

  def grain_rows():
    ds = grain.MapDataset.source(_docs(lengths)).shuffle(seed=3).repeat().to_iter_dataset(read_options=IN_THREAD)
    return grain_experimental.ConcatThenSplitIterDataset(ds, length_struct={"inputs": 16, "targets": 16})

  for n in (0, 1, 2, 5, 13):
    it = iter(grain_rows())
    for _ in range(n):
      next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    got = _restored(lambda: _source_rows(lengths), state)
    for e in expected:
      g = next(got)
      for k in ("inputs", "targets", "segment_ids", "positions"):
        np.testing.assert_array_equal(e[k if k in ("inputs", "targets") else f"inputs_{k}"], g[k])


MIX = {"stdlib_prose": 0.8, "stdlib_code": 0.2}
STAGES = ((2, {"stdlib_prose": 0.25, "stdlib_code": 0.75}),)


def _pipeline(**kw):
  return pipeline.lm_dataset(MIX, "train", ByteTokenizer(), seq_len=64, batch_size=3, seed=5, stages=STAGES, process_index=1, process_count=2, **kw)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_resume_is_exact_across_the_staged_mixture_on_a_host_shard(n):
  """Unequal weights, a stage change at batch 2, host 1 of 2: restored after n batches, a fresh
  pipeline gives the next batches bitwise, every field (the source of each row too)."""
  it = iter(_pipeline())
  for _ in range(n):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  got = _restored(_pipeline, state)
  for e in expected:
    g = next(got)
    assert set(g) == set(e)
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])


def test_training_data_unchanged_from_grains_packer(monkeypatch):
  """The pipeline's batches with this packer equal those with grain's ConcatThenSplit."""
  ours = list(pipeline.take(_pipeline(), 4))

  def grain_pack(ds, seq_len):
    packed = grain_experimental.ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})
    return packed.map(lambda r: {"inputs": r["inputs"], "targets": r["targets"], "segment_ids": r["targets_segment_ids"], "positions": r["inputs_positions"]})

  monkeypatch.setattr(pipeline, "_pack", grain_pack)
  ref = list(pipeline.take(_pipeline(), 4))
  for a, b in zip(ours, ref):
    assert set(a) == set(b)
    for k in a:
      assert a[k].dtype == b[k].dtype
      np.testing.assert_array_equal(a[k], b[k])


# Worker processes (jaxlm.data.workers): one pool for the module (the fork server starts once).


@pytest.fixture(scope="module")
def straight():
  return list(pipeline.take(_pipeline(), 9))  # read in this process


@pytest.fixture(scope="module")
def pooled():
  it = iter(_pipeline(workers=2))
  yield it
  it.close()


def _assert_batches_equal(expected, got):
  for e, g in zip(expected, got, strict=True):
    assert set(g) == set(e)
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])


def test_workers_give_the_same_batches(straight, pooled):
  pooled.set_state(iter(_pipeline()).get_state())  # the start (other tests move it)
  _assert_batches_equal(straight, [next(pooled) for _ in range(9)])


@pytest.mark.parametrize("n", [1, 4])
def test_resume_is_exact_across_worker_counts(straight, pooled, n):
  """A state saved with 0 workers restores into 2, and one saved with 2 restores into 0 (JSON in
  between): the next batches are those of the straight run."""
  it = iter(_pipeline())
  for _ in range(n):
    next(it)
  pooled.set_state(json.loads(json.dumps(it.get_state())))
  _assert_batches_equal(straight[n : n + 3], [next(pooled) for _ in range(3)])
  restored = _restored(_pipeline, pooled.get_state())  # after n + 3 batches
  _assert_batches_equal(straight[n + 3 : n + 5], [next(restored) for _ in range(2)])


def test_a_worker_error_reaches_the_training_process(tmp_path):
  from jaxlm.data import sources, workers
  from jaxlm.errors import ConfigError

  (tmp_path / "a.jsonl").write_text("\n".join(['{"text": "fine"}'] * 80 + ['{"no_text": 1}']))
  docs = grain.MapDataset.source(sources.load(f"jsonl:{tmp_path}/a.jsonl", "train"))
  it = iter(workers.PooledDocuments(workers.Pool([docs], 1, first_block=4), 0))
  with pytest.raises(ConfigError, match="'text' field"):
    for _ in range(len(docs)):
      next(it)


@pytest.mark.parametrize("value, message", [("-1", "data.workers must be an integer from 0 to 256, got -1"), ("1000", "got 1000"), ("two", "data.workers")])
def test_bad_worker_counts_are_one_line_errors(value, message, tmp_path, capsys):
  from jaxlm.cli import main

  run_dir = tmp_path / "run"
  assert main(["train", "quickstart:smoke", "--set", f"data.workers={value}", "--run-dir", str(run_dir)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and message in err and "\n" not in err, err
  assert not run_dir.exists()
