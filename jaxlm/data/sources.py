"""Data sources: named, random-access collections of text documents with train/validation splits.

A mixture key is either a registered name or `kind:argument`:

  stdlib_prose, stdlib_code     the embedded corpus (jaxlm.data.stdlib_corpus), built on first use
  text:<glob>                   each matching file is one document
  jsonl:<path>                  one JSON object per line, its "text" field is the document
  tfds:<name>[/<config>]        any TFDS dataset with a "text" feature, read with tfds.data_source

File sources (text, jsonl) have no split of their own: every 50th document is validation.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxlm.errors import ConfigError
from jaxlm.registry import Registry

SPLITS = ("train", "validation")
FILE_VALIDATION_EVERY = 50

# A source factory: (argument, split, cache_dir) -> random-access sequence of str.
SourceFactory = Callable[[str, str, str], Sequence[str]]
SOURCES: Registry = Registry("data source")


class TextView(Sequence[str]):
  """Random access to the `field` of a record source, decoded to str."""

  def __init__(self, records: Any, field: str = "text"):
    self.records, self.field = records, field

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i):  # type: ignore[override]
    value = self.records[i][self.field]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _split_list(docs: list[str], split: str) -> list[str]:
  val = split == "validation"
  return [d for i, d in enumerate(docs) if (i % FILE_VALIDATION_EVERY == 0) == val]


@SOURCES.register("stdlib_prose")
def _stdlib_prose(arg: str, split: str, cache_dir: str) -> Sequence[str]:
  from jaxlm.data.stdlib_corpus import data_source

  return TextView(data_source("prose", split, cache_dir))


@SOURCES.register("stdlib_code")
def _stdlib_code(arg: str, split: str, cache_dir: str) -> Sequence[str]:
  from jaxlm.data.stdlib_corpus import data_source

  return TextView(data_source("code", split, cache_dir))


@SOURCES.register("text")
def _text_files(pattern: str, split: str, cache_dir: str) -> Sequence[str]:
  files = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
  if not files:
    raise ConfigError(f"data source text:{pattern}: no files match")
  return _split_list([Path(f).read_text(encoding="utf-8", errors="replace") for f in files], split)


@SOURCES.register("jsonl")
def _jsonl(path: str, split: str, cache_dir: str) -> Sequence[str]:
  p = Path(path).expanduser()
  if not p.is_file():
    raise ConfigError(f"data source jsonl:{path}: file not found")
  docs = []
  with p.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          docs.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
          raise ConfigError(f"data source jsonl:{path}: line {n} is not a JSON object with a 'text' field") from None
  return _split_list(docs, split)


@SOURCES.register("tfds")
def _tfds(name: str, split: str, cache_dir: str) -> Sequence[str]:
  import tensorflow_datasets as tfds

  from jaxlm.data.stdlib_corpus import default_cache_dir

  try:
    return TextView(tfds.data_source(name, split=split, data_dir=str(default_cache_dir(cache_dir) / "tfds"), download=False))
  except Exception as e:  # tfds raises many types for a missing or unprepared dataset
    raise ConfigError(f"data source tfds:{name} ({split}): {type(e).__name__}: {str(e).splitlines()[0]}") from None


def parse(key: str) -> tuple[str, str]:
  """(registry name, argument) of a mixture key."""
  kind, sep, arg = key.partition(":")
  return (kind, arg) if sep else (key, "")


def check(key: str) -> None:
  """Raise ConfigError if `key` names no known source kind (without reading any data)."""
  SOURCES.get(parse(key)[0])


def load(key: str, split: str, cache_dir: str = "") -> Sequence[str]:
  """The documents of source `key` in `split` ("train" or "validation")."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  kind, arg = parse(key)
  docs = SOURCES.get(kind)(arg, split, cache_dir)
  if len(docs) == 0:
    raise ConfigError(f"data source {key!r} has no {split} documents")
  return docs
