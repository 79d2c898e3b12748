"""Tokenizers: bytes (the default, nothing to train) and sentencepiece (trained here or loaded).

Both share the interface: `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
and the special ids `pad_id` (0, never a real token), `bos_id`, `eos_id`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

from jaxlm.errors import ConfigError


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: 0 pad, 1 BOS, 2 EOS, 3..258 the bytes."""

  VOCAB_SIZE = 259
  OFFSET = 3
  vocab_size = VOCAB_SIZE
  pad_id, bos_id, eos_id = 0, 1, 2

  def encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A sentencepiece model; pad=0, BOS=1, EOS=2 as in the byte tokenizer."""

  def __init__(self, model_file: str | Path):
    import sentencepiece as spm

    path = Path(model_file)
    if not path.is_file():
      raise ConfigError(f"sentencepiece model not found: {path}")
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=str(path))
    self.vocab_size = self.sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
    if (self.pad_id, self.bos_id, self.eos_id) != (0, 1, 2):
      raise ConfigError(f"{path}: jaxlm expects pad=0, bos=1, eos=2; this model has {self.pad_id}, {self.bos_id}, {self.eos_id}")

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids if int(i) > 2])

  @staticmethod
  def train(texts: Iterable[str], model_file: str | Path, vocab_size: int) -> "SentencePieceTokenizer":
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
