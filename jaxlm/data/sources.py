"""Data sources: named, random-access collections of text documents with train/validation splits.

A mixture key is either a registered name or `kind:argument`:

  stdlib_prose, stdlib_code           the embedded corpus (jaxlm.data.stdlib_corpus), built on first use
  text:<glob>                         each matching file is one document
  jsonl:<glob>                        one JSON object per line of the matching files; its "text" is a document
  arrayrecord:<glob>                  each record of the matching ArrayRecord files is a document (UTF-8)
  tfds:<name>[/<config>][:<version>]  a TFDS dataset prepared in array_record format, read with
                                      tfds.data_source: its "text" feature (or its only Text feature)

Every source is random access and read lazily, so a JAX process reads only the documents of its
own shard. Files are matched in sorted order (`**` recurses); JSONL files are scanned once for
line offsets (no JSON parsed); ArrayRecord is the format for large corpora (`write_arrayrecord`).

Splits: file sources have none of their own, so every 50th document is validation. A TFDS
dataset uses its `validation` split, else its `test` split, else every 50th document of `train`.
TFDS datasets are read from $TFDS_DATA_DIR, else <data.cache_dir>/tfds; nothing is downloaded:
prepare one with `tfds build NAME --data_dir DIR --file_format array_record`.

A registered kind is a class with two class methods:

  check(arg, cache_dir)          checks before a run writes anything (files match and hold two or
                                 more documents, dataset prepared); raises ConfigError naming it
  load(arg, split, cache_dir)    the documents: a random-access Sequence[str]
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.registry import Registry

SPLITS = ("train", "validation")
FILE_VALIDATION_EVERY = 50

SOURCES: Registry = Registry("data source")


def _checked(i: Any, n: int) -> int:
  """int(i) if 0 <= i < n; else IndexError (what Sequence iteration stops on; record sources
  raise other errors)."""
  i = int(i)
  if not 0 <= i < n:
    raise IndexError(f"document {i} of {n}")
  return i


class TextView(Sequence[str]):
  """Random access to the `field` of a record source, decoded to str."""

  def __init__(self, records: Any, field: str = "text", fingerprint: str = ""):
    self.records, self.field, self.fingerprint = records, field, fingerprint

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i):  # type: ignore[override]
    value = self.records[_checked(i, len(self))][self.field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class SplitView(Sequence[str]):
  """Every `every`-th document of `docs` (from the first) for validation, the others for train."""

  def __init__(self, docs: Sequence[str], split: str, every: int = FILE_VALIDATION_EVERY):
    self.docs, self.every, self.validation = docs, every, split == "validation"
    n = len(docs)
    n_val = -(-n // every)
    self.n = n_val if self.validation else n - n_val
    self.fingerprint = f"{getattr(docs, 'fingerprint', '')}/{split}/{every}"

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i):  # type: ignore[override]
    i = _checked(i, self.n)
    return self.docs[i * self.every if self.validation else i + i // (self.every - 1) + 1]


def _files(kind: str, pattern: str) -> list[str]:
  files = sorted(f for f in glob.glob(str(Path(pattern).expanduser()), recursive=True) if os.path.isfile(f))
  if not files:
    raise ConfigError(f"data source {kind}:{pattern}: no files match")
  return files


def _files_fingerprint(files: Sequence[str]) -> str:
  """Names, sizes and modification times: a change of any file changes it (nothing is read)."""
  h = hashlib.sha256()
  for f in files:
    st = os.stat(f)
    h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


class FileDocs(Sequence[str]):
  """Each file is one document, read when asked for."""

  def __init__(self, files: Sequence[str]):
    self.files, self.fingerprint = list(files), _files_fingerprint(files)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i):  # type: ignore[override]
    return Path(self.files[_checked(i, len(self))]).read_text(encoding="utf-8", errors="replace")


class JsonlDocs(Sequence[str]):
  """The "text" of every non-blank line of some JSONL files, parsed when asked for."""

  def __init__(self, files: Sequence[str]):
    self.files, self.fingerprint = list(files), _files_fingerprint(files)
    starts, ends, which = [], [], []
    for k, f in enumerate(self.files):
      s, e = _line_spans(f)
      starts.append(s), ends.append(e), which.append(np.full(len(s), k, np.int32))
    self.starts, self.ends, self.file_of = np.concatenate(starts), np.concatenate(ends), np.concatenate(which)

  def __len__(self) -> int:
    return len(self.starts)

  def line(self, i: int) -> tuple[str, bytes]:
    """(file, raw bytes) of document i."""
    path = self.files[self.file_of[i]]
    with open(path, "rb") as f:
      f.seek(int(self.starts[i]))
      return path, f.read(int(self.ends[i] - self.starts[i]))

  def __getitem__(self, i):  # type: ignore[override]
    path, raw = self.line(_checked(i, len(self)))
    try:
      text = json.loads(raw)["text"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
      raise ConfigError(f"data source jsonl: {path} byte {self.starts[int(i)]}: not a JSON object with a 'text' field: {raw[:60]!r}") from None
    if not isinstance(text, str):
      raise ConfigError(f"data source jsonl: {path} byte {self.starts[int(i)]}: 'text' is a {type(text).__name__}, not a string")
    return text


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray]:
  """[start, end) byte offsets of the non-blank lines of a file (newline and '\\r' excluded)."""
  size = os.path.getsize(path)
  if size == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    data = np.frombuffer(m, np.uint8)
    newlines = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [size]])
    ends = ends - ((ends > starts) & (data[np.maximum(ends - 1, 0)] == ord("\r")))
    del data  # (the buffer must be released before the mmap closes)
  keep = ends > starts
  return starts[keep].astype(np.int64), ends[keep].astype(np.int64)


class RecordDocs(Sequence[str]):
  """The records of ArrayRecord files as UTF-8 text (grain's ArrayRecordDataSource)."""

  def __init__(self, files: Sequence[str]):
    import grain

    self.files, self.fingerprint = list(files), _files_fingerprint(files)
    self.records = grain.sources.ArrayRecordDataSource(self.files)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i):  # type: ignore[override]
    return self.records[_checked(i, len(self))].decode("utf-8", errors="replace")


def write_arrayrecord(path: str | Path, docs: Sequence[str]) -> Path:
  """Write documents as one ArrayRecord file (one record each) for the `arrayrecord:` source."""
  from array_record.python.array_record_module import ArrayRecordWriter

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for i in range(len(docs)):
    writer.write(docs[i].encode("utf-8"))
  writer.close()
  return path


@SOURCES.register("stdlib_prose")
class StdlibProse:
  config = "prose"

  @classmethod
  def check(cls, arg: str, cache_dir: str) -> None:
    pass

  @classmethod
  def load(cls, arg: str, split: str, cache_dir: str) -> Sequence[str]:
    from jaxlm.data.stdlib_corpus import data_source

    return TextView(data_source(cls.config, split, cache_dir), fingerprint=f"stdlib_corpus/{cls.config}/{split}")


@SOURCES.register("stdlib_code")
class StdlibCode(StdlibProse):
  config = "code"


@SOURCES.register("text")
class TextFiles:
  kind, docs = "text", FileDocs

  @classmethod
  def check(cls, arg: str, cache_dir: str) -> None:
    docs = cls.docs(_files(cls.kind, arg))  # (JSONL: one scan for line offsets)
    if len(docs) < 2:
      raise ConfigError(f"data source {cls.kind}:{arg} holds {len(docs)} document(s); it needs 2 or more (every 50th is validation)")
    docs[0], docs[len(docs) - 1]  # a malformed first or last document fails here; others when read

  @classmethod
  def load(cls, arg: str, split: str, cache_dir: str) -> Sequence[str]:
    docs = cls.docs(_files(cls.kind, arg))
    if len(docs):
      docs[0]  # a malformed file fails here, before training starts, not inside the pipeline
    return SplitView(docs, split)


@SOURCES.register("jsonl")
class JsonlFiles(TextFiles):
  kind, docs = "jsonl", JsonlDocs


@SOURCES.register("arrayrecord")
class ArrayRecordFiles(TextFiles):
  kind, docs = "arrayrecord", RecordDocs


def tfds_data_dir(cache_dir: str = "") -> Path:
  from jaxlm.data.stdlib_corpus import default_cache_dir

  return Path(os.environ.get("TFDS_DATA_DIR") or default_cache_dir(cache_dir) / "tfds").expanduser()


@SOURCES.register("tfds")
class Tfds:
  @classmethod
  def builder(cls, name: str, cache_dir: str):
    import tensorflow_datasets as tfds

    data_dir = tfds_data_dir(cache_dir)
    hint = f"prepare it with `tfds build {name.split(':')[0]} --data_dir {data_dir} --file_format array_record`"
    try:
      builder = tfds.builder(name, data_dir=str(data_dir))
    except Exception as e:  # tfds raises many types for a missing or unknown dataset
      raise ConfigError(f"data source tfds:{name}: not found in {data_dir} ({type(e).__name__}: {str(e).splitlines()[0]}); {hint}") from None
    if not builder.is_prepared():
      raise ConfigError(f"data source tfds:{name}: not prepared in {data_dir}; {hint}")
    fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if fmt != "array_record":
      raise ConfigError(f"data source tfds:{name}: prepared as {fmt}, but random access needs array_record; {hint}")
    return builder

  @classmethod
  def field(cls, name: str, builder) -> str:
    import tensorflow_datasets as tfds

    features = builder.info.features
    texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    if "text" in features:
      return "text"
    if len(texts) == 1:
      return texts[0]
    raise ConfigError(f"data source tfds:{name}: no 'text' feature and {len(texts)} Text features ({', '.join(texts) or 'none'}): which one is the document?")

  @classmethod
  def check(cls, arg: str, cache_dir: str) -> None:
    cls.field(arg, cls.builder(arg, cache_dir))

  @classmethod
  def load(cls, arg: str, split: str, cache_dir: str) -> Sequence[str]:
    builder = cls.builder(arg, cache_dir)
    field = cls.field(arg, builder)
    splits = builder.info.splits
    name = f"tfds:{builder.info.full_name}"

    def view(own: str) -> TextView:
      return TextView(builder.as_data_source(split=own), field, fingerprint=f"{name}/{own}/{splits[own].num_examples}")

    if "train" not in splits:
      raise ConfigError(f"data source tfds:{arg}: no train split (splits: {', '.join(splits)})")
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    if held_out is None:  # carve validation out of train: every 50th document
      return SplitView(view("train"), split)
    return view("train" if split == "train" else held_out)


def parse(key: str) -> tuple[str, str]:
  """(registry name, argument) of a mixture key."""
  kind, sep, arg = key.partition(":")
  return (kind, arg) if sep else (key, "")


def check(key: str, cache_dir: str = "") -> None:
  """Raise ConfigError if `key` names no known source kind, or files or a dataset it needs are
  missing (without reading any document)."""
  kind, arg = parse(key)
  SOURCES.get(kind).check(arg, cache_dir)


def load(key: str, split: str, cache_dir: str = "") -> Sequence[str]:
  """The documents of source `key` in `split` ("train" or "validation"), read lazily."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  kind, arg = parse(key)
  docs = SOURCES.get(kind).load(arg, split, cache_dir)
  if len(docs) == 0:
    raise ConfigError(f"data source {key!r} has no {split} documents")
  return docs


def fingerprint(docs: Sequence[str]) -> str:
  """What identifies a source's documents without reading them ('' when the source cannot say)."""
  return str(getattr(docs, "fingerprint", ""))
