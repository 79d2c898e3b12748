"""Tokenizers, chosen by `data.tokenizer` from the TOKENIZERS registry.

  byte            UTF-8 bytes, nothing to train (the default): 0 pad, 1 BOS, 2 EOS, 3..258 the bytes
  sentencepiece   a sentencepiece model: `data.sp_model`, or one trained on the data into the run dir
  hf              a Hugging Face tokenizer.json (`data.tokenizer_path`), read with the `tokenizers`
                  library (`pip install 'jaxlm[hf]'`), special tokens as transformers finds them

Every tokenizer has `encode(text) -> list[int]` (the text's ids only, no special ids),
`decode(ids) -> str` (special ids dropped), `vocab_size` (every id is below it) and its special
ids, which the pipeline and generation read from it, never assume:

  bos_id    prepended to documents and prompts when `data.add_bos` (None: the tokenizer has no
            BOS token, and nothing is prepended)
  eos_id    appended to every document: it separates the documents of a packed row
  pad_id    fills positions that are masked anyway (right-padded prompts, rows that finished
            generating); a tokenizer without a pad token uses its eos_id, as transformers does
  stop_ids  the ids that end a generated continuation, eos_id first

A registered kind is a class with three class methods:

  validate(data)                                config-time checks of the DataConfig fields it reads
  planned_vocab_size(data) -> int | None        the vocabulary the config fixes (None: in a file)
  from_config(data, run_dir, *, train) -> Tokenizer | None
                                                the tokenizer; None only when it is to be made in a
                                                run directory and `run_dir` is None
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.registry import Registry

if TYPE_CHECKING:
  from jaxlm.config import DataConfig


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_id: int
  pad_id: int
  stop_ids: tuple[int, ...]

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


TOKENIZERS: Registry = Registry("data.tokenizer")


def load(data: DataConfig, run_dir: Path | None = None, *, train: bool = False) -> Tokenizer | None:
  """The tokenizer `data` names; None when it is a sentencepiece model still to be trained and
  there is no `run_dir` to find or train it in (`train`: train it there when missing)."""
  return TOKENIZERS.get(data.tokenizer).from_config(data, run_dir, train=train)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Every id of the tokenizer needs an embedding row (more rows are fine: padding)."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {model_vocab_size}")


def _read_by_hf_only(data: DataConfig) -> None:
  if data.tokenizer_path:
    raise ConfigError(f"data.tokenizer_path is read only by data.tokenizer='hf' (data.tokenizer is {data.tokenizer!r})")


@TOKENIZERS.register("byte")
class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: 0 pad, 1 BOS, 2 EOS, 3..258 the bytes."""

  VOCAB_SIZE = 259
  OFFSET = 3
  vocab_size = VOCAB_SIZE
  pad_id, bos_id, eos_id = 0, 1, 2
  stop_ids = (eos_id,)

  def encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def encode_array(self, text: str) -> np.ndarray:
    """encode() as an int32 array, without a Python list (the pipeline's fast path)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET).decode("utf-8", errors="replace")

  @staticmethod
  def validate(data: DataConfig) -> None:
    _read_by_hf_only(data)

  @classmethod
  def planned_vocab_size(cls, data: DataConfig) -> int | None:
    return cls.VOCAB_SIZE

  @classmethod
  def from_config(cls, data: DataConfig, run_dir: Path | None, *, train: bool = False) -> ByteTokenizer:
    return cls()


@TOKENIZERS.register("sentencepiece")
class SentencePieceTokenizer:
  """A sentencepiece model. The special ids are the model's own (those trained here: pad 0,
  BOS 1, EOS 2); a model without a pad piece pads with EOS, one without BOS gets none."""

  RUN_FILE = "tokenizer.model"  # the model trained for a run, in its run directory
  MIN_TRAINED_VOCAB = 320  # 256 byte-fallback pieces + specials + characters

  def __init__(self, model_file: str | Path):
    import sentencepiece as spm

    path = Path(model_file)
    if not path.is_file():
      raise ConfigError(f"sentencepiece model not found: {path}")
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=str(path))
    self.vocab_size = self.sp.get_piece_size()
    if self.sp.eos_id() < 0:
      raise ConfigError(f"{path}: the sentencepiece model has no EOS piece (jaxlm ends every document with one)")
    self.eos_id = self.sp.eos_id()
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None  # sentencepiece: -1 = none
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
    self.stop_ids = (self.eos_id,)
    self._special = {self.pad_id, self.bos_id, self.eos_id} - {None}

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids if int(i) not in self._special])

  @classmethod
  def validate(cls, data: DataConfig) -> None:
    _read_by_hf_only(data)
    if data.sp_vocab_size < cls.MIN_TRAINED_VOCAB:
      raise ConfigError(f"data.sp_vocab_size must be >= {cls.MIN_TRAINED_VOCAB} (256 byte-fallback pieces + specials + characters), got {data.sp_vocab_size}")

  @staticmethod
  def planned_vocab_size(data: DataConfig) -> int | None:
    return None if data.sp_model else data.sp_vocab_size

  @classmethod
  def from_config(cls, data: DataConfig, run_dir: Path | None, *, train: bool = False) -> SentencePieceTokenizer | None:
    """`data.sp_model`, else the run directory's model, else (`train`) one trained into it."""
    if data.sp_model:
      return cls(data.sp_model)
    if run_dir is None:
      return None
    path = Path(run_dir) / cls.RUN_FILE
    if path.is_file():
      return cls(path)
    if not train:
      raise ConfigError(f"no sentencepiece model: set data.sp_model (no {cls.RUN_FILE} in {run_dir})")
    import jax

    if jax.process_count() > 1:
      raise ConfigError("multi-host runs need a pre-trained tokenizer: set data.sp_model")
    from jaxlm.data.pipeline import sample_texts

    print(f"training a sentencepiece tokenizer ({data.sp_vocab_size} pieces) on the training data ...", flush=True)
    return cls.train(sample_texts(data.mixture, max_chars=4_000_000, cache_dir=data.cache_dir), path, data.sp_vocab_size)

  @staticmethod
  def train(texts: Iterable[str], model_file: str | Path, vocab_size: int) -> SentencePieceTokenizer:
    """Train a unigram model on `texts` and write it to `model_file` (byte fallback on)."""
    import sentencepiece as spm

    model_file = Path(model_file)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=_lines(texts),
          model_writer=buf,
          vocab_size=vocab_size,
          model_type="unigram",
          byte_fallback=True,  # 256 byte pieces: any text encodes, nothing is <unk>
          character_coverage=0.995,  # rarer characters fall back to bytes
          pad_id=0,
          bos_id=1,
          eos_id=2,
          unk_id=3,
          input_sentence_size=200_000,
          shuffle_input_sentence=True,
          max_sentence_length=16384,
          remove_extra_whitespaces=False,
          normalization_rule_name="identity",
          split_digits=True,
          allow_whitespace_only_pieces=True,
          num_threads=2,
          minloglevel=2,
      )
    except RuntimeError as e:  # sentencepiece reports bad settings (e.g. too small a vocabulary) this way
      raise ConfigError(f"training the sentencepiece tokenizer failed: {str(e).splitlines()[0]}") from None
    tmp = model_file.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(model_file)
    return SentencePieceTokenizer(model_file)


def _lines(texts: Iterable[str]) -> Iterator[str]:
  for t in texts:
    for line in t.splitlines():
      if line.strip():
        yield line


@TOKENIZERS.register("hf")
class HFTokenizer:
  """A Hugging Face `tokenizer.json`, read with the `tokenizers` library.

  `path` is a tokenizer.json or a directory holding one (a Hugging Face model directory). The
  special tokens are the ones transformers' AutoTokenizer finds in the files beside it:
  `bos_token`, `eos_token` and `pad_token` of tokenizer_config.json, replaced by those of
  special_tokens_map.json when tokenizer_config.json has no `added_tokens_decoder` (transformers
  reads that file only then); each a string or an AddedToken dict, turned into its id by the
  tokenizer. Generation also stops at the `eos_token_id`s (an id or a list) of
  generation_config.json, or of config.json when there is none, as transformers' generate does;
  the first of them is the EOS when the tokenizer files name none. Without a pad token, pad = EOS.
  `encode` adds no special tokens (the pipeline adds BOS and EOS itself).
  """

  FILE = "tokenizer.json"

  def __init__(self, path: str | Path):
    lib = _tokenizers_library()
    path = Path(path)
    file = path / self.FILE if path.is_dir() else path
    if not file.is_file():
      raise ConfigError(f"no {self.FILE} at {path}")
    try:
      self.tok = lib.Tokenizer.from_file(str(file))
    except Exception as e:  # the library raises a bare Exception for a file it cannot parse
      raise ConfigError(f"{file}: the tokenizers library cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    self.path = file
    here = file.parent
    named = _special_tokens(here)
    gen_file = here / "generation_config.json"
    gen_file = gen_file if gen_file.is_file() else here / "config.json"
    end_ids = _id_list(_read_json(gen_file).get("eos_token_id"), gen_file)
    self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
    eos = self._token_id(named.get("eos_token"), "eos_token")
    if eos is None:
      if not end_ids:
        raise ConfigError(
            f"{here}: no EOS token (no eos_token in tokenizer_config.json or special_tokens_map.json, no eos_token_id in generation_config.json or config.json)"
        )
      eos = end_ids[0]
    self.eos_id: int = eos
    self.bos_id = self._token_id(named.get("bos_token"), "bos_token")
    pad = self._token_id(named.get("pad_token"), "pad_token")
    self.pad_id: int = eos if pad is None else pad
    self.stop_ids = tuple(dict.fromkeys([eos, *end_ids]))

  def _token_id(self, token: Any, key: str) -> int | None:
    if token is None:
      return None
    content = token["content"] if isinstance(token, dict) else str(token)
    i = self.tok.token_to_id(content)
    if i is None:
      raise ConfigError(f"{self.path.parent}: {key} {content!r} is not a token of {self.path.name}")
    return i

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  @staticmethod
  def validate(data: DataConfig) -> None:
    pass  # an empty tokenizer_path is filled from an HF `init_from` (jaxlm.interop.hf.resolve_experiment)

  @staticmethod
  def planned_vocab_size(data: DataConfig) -> int | None:
    return None

  @classmethod
  def from_config(cls, data: DataConfig, run_dir: Path | None, *, train: bool = False) -> HFTokenizer:
    if not data.tokenizer_path:
      raise ConfigError("data.tokenizer='hf' needs data.tokenizer_path (a tokenizer.json or a Hugging Face model directory) or an init_from naming an HF model directory")
    return cls(data.tokenizer_path)


def _tokenizers_library() -> Any:
  try:
    import tokenizers
  except ImportError:
    raise ConfigError("data.tokenizer='hf' needs the tokenizers library: pip install 'jaxlm[hf]'") from None
  return tokenizers


def _read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ConfigError(f"{path}: expected a JSON object")
  return value


def _special_tokens(directory: Path) -> dict[str, Any]:
  """bos/eos/pad token (string, AddedToken dict or None) as transformers' from_pretrained reads them."""
  keys = ("bos_token", "eos_token", "pad_token")
  config = _read_json(directory / "tokenizer_config.json")
  tokens = {k: config.get(k) for k in keys}
  if "added_tokens_decoder" not in config:  # the legacy layout: special_tokens_map.json wins
    legacy = _read_json(directory / "special_tokens_map.json")
    tokens.update({k: legacy[k] for k in keys if k in legacy})
  return tokens


def _id_list(value: Any, source: Path) -> list[int]:
  if value is None:
    return []
  values = value if isinstance(value, list) else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
    raise ConfigError(f"{source}: eos_token_id must be a token id or a list of them, got {value!r}")
  return list(values)
