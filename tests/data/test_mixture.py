"""Mixtures by tokens: the realised token shares match the weights where example-level mixing is
far off; staged weights switch at their step; the iterator state resumes across a stage."""

import json

import grain
import numpy as np
import pytest

from jaxlm.config import DataConfig
from jaxlm.data import mixture, pipeline
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import ConfigError


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
  """Short documents (~40 bytes) and long ones (~400 bytes): 10x apart in tokens per document."""
  d = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(0)
  for name, words in (("short", 8), ("long", 80)):
    lines = [json.dumps({"text": " ".join(f"{name}{w}" for w in rng.integers(0, 99, words + rng.integers(-3, 4)))}) for _ in range(300)]
    (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
  return f"jsonl:{d}/short.jsonl", f"jsonl:{d}/long.jsonl"


def _ds(mix, stages=(), batch_size=8, seq_len=128):
  return pipeline.lm_dataset(mix, "train", ByteTokenizer(), seq_len=seq_len, batch_size=batch_size, seed=0, stages=stages)


def test_token_shares_match_the_weights_where_example_level_mixing_does_not(two_sources):
  short, long = two_sources
  batches = list(pipeline.take(_ds({short: 0.7, long: 0.3}), 25))
  tokens = sum(mixture.tokens_by_source(b, 2) for b in batches)
  share = tokens[0] / tokens.sum()
  assert abs(share - 0.7) <= 1 / 200, share  # 200 rows: within one row of 70%
  for b in batches:  # each row holds the source its `source` field names
    for row, src in zip(b["inputs"], b["source"]):
      text = ByteTokenizer().decode(row)
      assert ("short" in text, "long" in text) == (src == 0, src == 1)

  # grain's example-level mixing of the same documents: 70% of the documents, not of the tokens.
  tok = pipeline.Tokenize(ByteTokenizer())
  from jaxlm.data import sources

  def lengths(i, key):
    return grain.MapDataset.source(sources.load(key, "train")).repeat().map(lambda t: (i, len(tok(t)["inputs"]))).to_iter_dataset()

  mixed = iter(grain.IterDataset.mix([lengths(0, short), lengths(1, long)], [0.7, 0.3]))
  src, n = np.array([next(mixed) for _ in range(1000)]).T
  assert abs((src == 0).mean() - 0.7) < 0.01  # 70% of the documents
  example_share = n[src == 0].sum() / n.sum()
  assert example_share < 0.3, example_share  # ~0.19 of the tokens: far from 0.7


def test_every_source_stays_within_about_a_row_of_its_share():
  rng = np.random.default_rng(1)
  for _ in range(20):
    k = int(rng.integers(2, 6))
    w = rng.random(k) ** 2
    w /= w.sum()
    inline = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    parents = [grain.MapDataset.range(10**6).map(lambda x: {"x": np.int32(x)}).to_iter_dataset(inline) for _ in range(k)]
    it = iter(mixture.StagedMix(parents, [(0, w)]))
    counts = np.zeros(k)
    for n in range(1, 301):
      counts[next(it)["source"]] += 1
      assert np.abs(counts - w * n).max() < 1.2


def test_staged_weights_switch_at_the_step_and_resume_across_it(two_sources):
  short, long = two_sources
  stages = ((3, {long: 1.0}), (5, {short: 0.5, long: 0.5}))
  first = list(pipeline.take(_ds({short: 0.75, long: 0.25}, stages, batch_size=4), 7))
  assert [list(b["source"]) for b in first] == [[0, 0, 1, 0]] * 3 + [[1] * 4] * 2 + [[0, 1, 0, 1]] * 2

  it = iter(_ds({short: 0.75, long: 0.25}, stages, batch_size=4))
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # checkpoints hold it as JSON
  expected = [next(it) for _ in range(5)]  # batches 2..6: both boundaries
  again = iter(_ds({short: 0.75, long: 0.25}, stages, batch_size=4))
  again.set_state(state)
  for a, b in zip(expected, [next(again) for _ in range(5)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_a_source_that_starts_in_a_later_stage(two_sources):
  short, long = two_sources
  assert mixture.source_names({short: 1.0, long: 0.0}, ((2, {long: 1.0}),)) == [short, long]
  assert mixture.source_names({short: 1.0, long: 0.0}) == [short]
  batches = list(pipeline.take(_ds({short: 1.0, long: 0.0}, ((2, {long: 1.0}),), batch_size=2), 4))
  assert [list(b["source"]) for b in batches] == [[0, 0], [0, 0], [1, 1], [1, 1]]


def test_token_counter_counts_target_tokens_of_all_hosts():
  counter = mixture.TokenCounter(["a", "b"], process_count=2)
  batch = {"source": np.array([0, 1, 1]), "loss_mask": np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]])}
  counter.add(batch)
  counter.add(batch)
  assert counter.take() == {"tokens/a": 12, "tokens/b": 12}
  assert counter.take() == {"tokens/a": 0, "tokens/b": 0}


@pytest.mark.parametrize(
    "stages, message",
    [
        (((0, {"a": 1.0}),), r"data.stages\[0\]: the step must be an integer > 0"),
        (((5, {"a": 1.0}), (5, {"b": 1.0})), r"data.stages\[1\]: the step must be an integer > 5"),
        (((5, {"c": 1.0}),), r"data.stages\[0\]: source 'c' is not in data.mixture \(a, b\)"),
        (((5, {"a": 0.0}),), r"data.stages\[0\]: the weights must not all be 0"),
        (((5, {"a": -1.0}),), r"data.stages\[0\]\['a'\] must be a weight >= 0"),
        (((5, {}),), r"data.stages\[0\]: the weights must be a non-empty"),
        ((5,), r"data.stages\[0\] must be a \(step, \{source: weight\}\) pair"),
    ],
)
def test_stages_are_validated(stages, message):
  with pytest.raises(ConfigError, match=message):
    DataConfig(mixture={"a": 1.0, "b": 0.0}, stages=stages)


def test_stages_from_an_override_or_json_are_normalised():
  from jaxlm import experiments
  from jaxlm.config import Experiment, from_dict, to_dict

  exp = experiments.load("quickstart", ["data.stages=((100, {'stdlib_code': 1.0}), [200, {'stdlib_prose': 1}])"])
  assert exp.data.stages == ((100, {"stdlib_code": 1.0}), (200, {"stdlib_prose": 1}))
  assert from_dict(Experiment, json.loads(json.dumps(to_dict(exp)))).data.stages == exp.data.stages


@pytest.mark.slow
def test_train_logs_tokens_per_source_and_switches_stage(tmp_path):
  """~30 s: `jaxlm train` with a stage after step 3 logs each source's tokens per metrics line."""
  from jaxlm import experiments
  from jaxlm.train import loop

  exp = experiments.load("quickstart:smoke", ["data.stages=((3, {'stdlib_code': 1.0}),)", "train.log_every=1", "train.sample_tokens=0", "checkpoint.enabled=false"])
  loop.train(exp, tmp_path / "run")
  lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  tokens = {r["step"]: (r["tokens/stdlib_prose"], r["tokens/stdlib_code"]) for r in lines if "tokens/stdlib_code" in r}
  per_step = exp.data.batch_size * exp.data.seq_len
  assert sorted(tokens) == list(range(1, 7)) and all(sum(t) == per_step for t in tokens.values())
  assert all(tokens[s] == (per_step // 2, per_step // 2) for s in (1, 2, 3))  # 50/50 rows: 4 + 4
  assert all(tokens[s] == (0, per_step) for s in (4, 5, 6))  # the batches after step 3
