"""Sources on tiny local data: text and JSONL globs, ArrayRecord files, a TFDS dataset prepared
in a temporary data_dir; splits, lazy reads, and the errors for missing or malformed data."""

import json
import os

import numpy as np
import pytest

from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import ConfigError


def docs(n, tag="doc"):
  return [f"{tag} {i}: " + "word " * (i % 7) for i in range(n)]


def test_text_files_by_glob_one_document_each(tmp_path):
  for i, text in enumerate(docs(120)):
    d = tmp_path / f"part{i % 3}"
    d.mkdir(exist_ok=True)
    (d / f"{i:03d}.txt").write_text(text)
  train, val = sources.load(f"text:{tmp_path}/**/*.txt", "train"), sources.load(f"text:{tmp_path}/**/*.txt", "validation")
  assert len(train) + len(val) == 120 and len(val) == 3  # every 50th document
  assert sorted([*train, *val]) == sorted(docs(120))
  with pytest.raises(ConfigError, match="no files match"):
    sources.check(f"text:{tmp_path}/*.md")
  with pytest.raises(ConfigError, match="holds 1 document"):  # nothing left for train after validation
    sources.check(f"text:{tmp_path}/part0/000.txt")


def test_jsonl_by_glob_skips_blank_lines_and_reads_lazily(tmp_path):
  lines = [json.dumps({"text": t}) for t in docs(60)]
  (tmp_path / "a.jsonl").write_text("\n".join(lines[:30]) + "\n\n")
  (tmp_path / "b.jsonl").write_bytes(("\r\n".join(lines[30:]) + "\r\n").encode())  # Windows line ends
  (tmp_path / "c.jsonl").write_text("")
  key = f"jsonl:{tmp_path}/*.jsonl"
  train, val = sources.load(key, "train"), sources.load(key, "validation")
  assert [*val, *train] == [docs(60)[i] for i in (0, 50)] + [d for i, d in enumerate(docs(60)) if i % 50]
  # A malformed line further on is found when it is read (the load parsed only the first).
  (tmp_path / "d.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + '{"txt": "no text field"}\n')
  train = sources.load(key, "train")
  with pytest.raises(ConfigError, match=r"d\.jsonl byte \d+: not a JSON object with a 'text' field"):
    train[len(train) - 1]
  (tmp_path / "e.jsonl").write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
  with pytest.raises(ConfigError, match=r"e\.jsonl byte 15"):
    sources.check(f"jsonl:{tmp_path}/e.jsonl")  # the last line is read by the check


def test_arrayrecord_files(tmp_path):
  sources.write_arrayrecord(tmp_path / "x-00000.array_record", docs(70, "first"))
  sources.write_arrayrecord(tmp_path / "x-00001.array_record", docs(30, "second") + ["ünïcödé ✓"])
  key = f"arrayrecord:{tmp_path}/x-*.array_record"
  train, val = sources.load(key, "train"), sources.load(key, "validation")
  assert sorted([*train, *val]) == sorted(docs(70, "first") + docs(30, "second") + ["ünïcödé ✓"])
  assert len(val) == 3
  b = next(iter(pipeline.lm_dataset({key: 1.0}, "train", ByteTokenizer(), seq_len=32, batch_size=2, seed=0)))
  assert b["inputs"].shape == (2, 32)


def _tiny_tfds(data_dir, *, splits=("train", "test"), feature="text", n=60):
  import tensorflow_datasets as tfds

  ds_name = f"jaxlm_tiny_text_{feature}_{len(splits)}"

  class JaxlmTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # read back from its files, as a real dataset
    name = ds_name
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="short")]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({feature: tfds.features.Text(), "id": np.int64}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in splits}

    def _generate_examples(self, split):
      for i in range(n if split == "train" else 7):
        yield i, {feature: f"{split} {i}", "id": i}

  tfds.disable_progress_bar()
  JaxlmTinyText(config="short", data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return ds_name


def test_tfds_by_name_config_and_version(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  name = _tiny_tfds(tmp_path)
  key = f"tfds:{name}/short:1.0.0"
  sources.check(key)
  train, val = sources.load(key, "train"), sources.load(key, "validation")
  assert sorted(train) == sorted(f"train {i}" for i in range(60))
  assert sorted(val) == sorted(f"test {i}" for i in range(7))  # no validation split: its test split
  b = next(iter(pipeline.lm_dataset({key: 1.0}, "train", ByteTokenizer(), seq_len=16, batch_size=2, seed=0)))
  assert ByteTokenizer().decode(b["inputs"][0]).startswith("train ")
  # A dataset with train only: every 50th document is validation; another Text feature name is found.
  only = _tiny_tfds(tmp_path, splits=("train",), feature="content")
  train, val = sources.load(f"tfds:{only}/short", "train"), sources.load(f"tfds:{only}/short", "validation")
  assert len(val) == 2 and len(train) == 58 and not set(train) & set(val)


def test_tfds_errors_name_the_problem(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(ConfigError, match=r"tfds:no_such_dataset: not found in .*tfds build no_such_dataset --data_dir .* --file_format array_record"):
    sources.check("tfds:no_such_dataset")
  name = _tiny_tfds(tmp_path)
  with pytest.raises(ConfigError, match="not found"):
    sources.check(f"tfds:{name}/short:2.0.0")  # a version that is not prepared
  with pytest.raises(ConfigError, match="unknown data source 'nosuchkind'"):
    sources.check("nosuchkind:x")


def test_each_host_reads_only_its_shard(tmp_path, monkeypatch):
  """Two simulated hosts: the documents each one reads are disjoint (shuffled order)."""
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(400)))
  real_load, reads = sources.load, []

  class Recorded(list):
    def __getitem__(self, i):
      reads[-1].add(int(i))
      return super().__getitem__(i)

  def load(key, split, cache_dir=""):
    reads.append(set())
    d = real_load(key, split, cache_dir)
    return Recorded(d[i] for i in range(len(d)))

  monkeypatch.setattr(sources, "load", load)
  for host in range(2):
    ds = pipeline.lm_dataset({f"jsonl:{path}": 1.0}, "train", ByteTokenizer(), seq_len=64, batch_size=2, seed=0, process_index=host, process_count=2)
    list(pipeline.take(ds, 20))
  assert len(reads[0]) > 30 and len(reads[1]) > 30 and not reads[0] & reads[1]


def test_file_fingerprint_changes_with_the_files(tmp_path):
  (tmp_path / "a.txt").write_text("one")
  before = sources.fingerprint(sources.load(f"text:{tmp_path}/*.txt", "validation"))
  (tmp_path / "a.txt").write_text("one more")
  os.utime(tmp_path / "a.txt", ns=(1, 1))
  assert sources.fingerprint(sources.load(f"text:{tmp_path}/*.txt", "validation")) != before
