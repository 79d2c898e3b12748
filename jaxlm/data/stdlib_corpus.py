"""The embedded default corpus: English prose and Python code from this machine's standard library.

A TFDS `GeneratorBasedBuilder` (array_record files, no TensorFlow) with two configs:

  stdlib_corpus/prose  the reference-manual topics of `pydoc_data.topics` (~465K characters),
                       split at paragraph boundaries into documents of up to ~2,000 characters
  stdlib_corpus/code   the standard library's .py files (tests excluded, ~12 MB), one per document

Each has `train` and `validation` splits; a document's split is decided by a hash of its name
(~8% validation), so it is stable across machines with the same Python. The dataset is built
once into the cache directory; concurrent builders (several hosts or test workers sharing a
directory) wait on a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds

VALIDATION_PERCENT = 8
PROSE_DOC_CHARS = 2000


def default_cache_dir(configured: str = "") -> Path:
  return Path(configured or os.environ.get("JAXLM_CACHE") or Path.home() / ".cache" / "jaxlm").expanduser()


def split_of(name: str) -> str:
  h = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
  return "validation" if h < VALIDATION_PERCENT else "train"


def prose_documents() -> Iterator[tuple[str, str]]:
  """(name, text) for paragraph groups of the pydoc topics, in a fixed order."""
  from pydoc_data.topics import topics

  for topic in sorted(topics):
    chunk: list[str] = []
    size, part = 0, 0
    for para in topics[topic].split("\n\n"):
      if size + len(para) > PROSE_DOC_CHARS and chunk:
        yield f"{topic}/{part}", "\n\n".join(chunk)
        chunk, size, part = [], 0, part + 1
      chunk.append(para)
      size += len(para) + 2
    if chunk:
      yield f"{topic}/{part}", "\n\n".join(chunk)


def code_documents() -> Iterator[tuple[str, str]]:
  """(relative path, source) for the standard library's .py files, tests and site-packages excluded."""
  root = Path(sysconfig.get_paths()["stdlib"])
  skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if skip & set(rel.parts):
      continue
    try:
      text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    if text.strip():
      yield str(rel), text


class StdlibCorpus(tfds.core.GeneratorBasedBuilder):
  """Prose and code from the Python standard library on this machine."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "pydoc topics (prose) and stdlib sources (code)."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="prose", description="Python reference-manual topics (English prose)."),
      tfds.core.BuilderConfig(name="code", description="Python standard-library source files."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"name": tfds.features.Text(), "text": tfds.features.Text()}),
        supervised_keys=None,
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is on this machine
    return {"train": self._generate_examples("train"), "validation": self._generate_examples("validation")}

  def _generate_examples(self, split: str):
    docs = prose_documents() if self.builder_config.name == "prose" else code_documents()
    for name, text in docs:
      if split_of(name) == split:
        yield name, {"name": name, "text": text}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def data_source(config: str, split: str, cache_dir: str = ""):
  """Random-access source of {"name", "text"} for `config` in (prose, code), building it if needed."""
  data_dir = default_cache_dir(cache_dir) / "tfds"
  builder = StdlibCorpus(config=config, data_dir=str(data_dir), file_format="array_record")
  with _file_lock(data_dir / f".stdlib_corpus_{config}.lock"):
    if not builder.is_prepared():
      print(f"building the stdlib corpus ({config}) into {data_dir} (once) ...", flush=True)
      tfds.disable_progress_bar()
      builder.download_and_prepare()
  return builder.as_data_source(split=split)
