"""Tokenizers: the registry, byte and sentencepiece round trips with their special ids, a Hugging
Face tokenizer.json whose special ids agree with transformers', and the vocabulary check."""

import json
import sys

import numpy as np
import pytest

from jaxlm.config import DataConfig, Experiment, ModelConfig
from jaxlm.data import pipeline, tokenizers
from jaxlm.data.tokenizers import TOKENIZERS, ByteTokenizer, HFTokenizer, SentencePieceTokenizer
from jaxlm.errors import ConfigError
from jaxlm.train.run import tokenizer_for

MIX = {"stdlib_prose": 0.5, "stdlib_code": 0.5}
SAMPLE = "déjà vu → the quick fox 🙂 def f(x):\n    return x + 1"
SPECIALS = ["<pad>", "<s>", "</s>", "<|end|>"]  # added after training: ids past the learned vocabulary


def test_registry_lists_the_three_kinds():
  assert TOKENIZERS.keys() == ["byte", "hf", "sentencepiece"]
  with pytest.raises(ConfigError, match="unknown data.tokenizer 'tiktoken'; known: byte, hf, sentencepiece"):
    DataConfig(tokenizer="tiktoken")
  with pytest.raises(ConfigError, match="read only by data.tokenizer='hf'"):
    DataConfig(tokenizer="byte", tokenizer_path="tok.json")
  with pytest.raises(ConfigError, match="smaller than the 259 tokens of data.tokenizer='byte'"):
    Experiment(model=ModelConfig(vocab_size=128))
  Experiment(model=ModelConfig(vocab_size=128), data=DataConfig(tokenizer="hf", tokenizer_path="tok.json"))  # read later


def test_byte_tokenizer_round_trip_and_ids():
  tok = ByteTokenizer()
  ids = tok.encode(SAMPLE)
  assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259
  assert tok.decode(ids) == SAMPLE
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.stop_ids) == (0, 1, 2, (2,))
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == SAMPLE


def test_sentencepiece_trains_and_round_trips(tmp_path):
  texts = list(pipeline.sample_texts(MIX, max_chars=150_000))
  tok = SentencePieceTokenizer.train(texts, tmp_path / "sp.model", vocab_size=600)
  assert tok.vocab_size == 600 and (tok.pad_id, tok.bos_id, tok.eos_id, tok.stop_ids) == (0, 1, 2, (2,))
  sample = "def f(x):\n    return x + 1  # the answer"
  assert tok.decode(tok.encode(sample)) == sample
  assert tok.decode([tok.bos_id] + tok.encode(sample) + [tok.eos_id, tok.pad_id]) == sample
  assert len(tok.encode(sample)) < len(sample.encode())  # it learned something about the corpus
  assert SentencePieceTokenizer(tmp_path / "sp.model").encode(sample) == tok.encode(sample)


def test_tokenizer_for_trains_a_sentencepiece_model_into_the_run_dir(tmp_path):
  from pydoc_data.topics import topics

  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in list(topics.values())[:60]))
  data = DataConfig(mixture={f"jsonl:{tmp_path}/docs.jsonl": 1.0}, tokenizer="sentencepiece", sp_vocab_size=400)
  exp = Experiment(model=ModelConfig(vocab_size=512), data=data)
  tok = tokenizer_for(exp, tmp_path / "run")
  assert (tmp_path / "run" / SentencePieceTokenizer.RUN_FILE).is_file() and tok.vocab_size == 400
  assert tokenizer_for(exp, tmp_path / "run", train_if_missing=False).encode(SAMPLE) == tok.encode(SAMPLE)


def test_sentencepiece_model_keeps_its_own_ids(tmp_path):
  """A model without pad and BOS pieces (unk 0, EOS 1): pad is EOS, and documents get no BOS."""
  import sentencepiece as spm

  texts = list(pipeline.sample_texts({"stdlib_prose": 1.0}, max_chars=40_000))
  lines = [line for t in texts for line in t.splitlines() if line.strip()]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="unigram",
      byte_fallback=True, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2, num_threads=1,
  )  # fmt: skip
  tok = SentencePieceTokenizer(tmp_path / "sp.model")
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (None, 1, 1, (1,))
  ids = tok.encode("the answer")
  row = pipeline.Tokenize(tok, add_bos=True)("the answer")
  np.testing.assert_array_equal(row["inputs"], ids)
  np.testing.assert_array_equal(row["targets"], ids[1:] + [1])
  assert tok.decode(ids + [1]) == "the answer"


# --- Hugging Face tokenizer.json ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_json():
  """A byte-level BPE trained here on a few sentences; specials at ids the byte tokenizer does not use."""
  lib = pytest.importorskip("tokenizers")
  tok = lib.Tokenizer(lib.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = lib.decoders.ByteLevel()
  trainer = lib.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<unk>"], initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
  )
  tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "def f(x): return x + 1", "déjà vu"] * 4, trainer)
  tok.add_special_tokens(SPECIALS)
  return tok.to_str()


def tokens_in(tokenizer_json):
  return 1 + max(json.loads(tokenizer_json)["model"]["vocab"].values()) + len(SPECIALS)


def hf_dir(path, tokenizer_json, config=None, special_tokens_map=None, generation_config=None, model_config=None):
  path.mkdir(parents=True, exist_ok=True)
  (path / "tokenizer.json").write_text(tokenizer_json)
  files = {"tokenizer_config.json": config, "special_tokens_map.json": special_tokens_map, "generation_config.json": generation_config, "config.json": model_config}
  for name, content in files.items():
    if content is not None:
      (path / name).write_text(json.dumps(content))
  return path


def spec(content):
  """A special token as transformers writes it into tokenizer_config.json (an AddedToken dict)."""
  return {"__type": "AddedToken", "content": content, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}


FAST = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}
LAYOUTS = {
    "tokenizer_config": dict(config={**FAST, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}),
    "added_token_dicts_no_pad": dict(config={**FAST, "bos_token": spec("<s>"), "eos_token": spec("</s>"), "pad_token": None}),
    "no_bos": dict(config={**FAST, "bos_token": None, "eos_token": "<|end|>", "pad_token": "<pad>"}),
    "legacy_special_tokens_map_wins": dict(config={**FAST, "bos_token": "<s>", "eos_token": "</s>"}, special_tokens_map={"eos_token": spec("<|end|>"), "pad_token": "<pad>"}),
    "special_tokens_map_ignored": dict(config={**FAST, "eos_token": "</s>", "added_tokens_decoder": {}}, special_tokens_map={"eos_token": "<|end|>", "bos_token": "<s>"}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hf_special_ids_agree_with_transformers(tmp_path, tokenizer_json, layout):
  transformers = pytest.importorskip("transformers")
  d = hf_dir(tmp_path, tokenizer_json, **LAYOUTS[layout])
  tok, ref = HFTokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
  assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
  assert tok.pad_id == (ref.eos_token_id if ref.pad_token_id is None else ref.pad_token_id)  # no pad token: pad = EOS
  assert tok.eos_id not in (0, 1, 2) and tok.stop_ids == (tok.eos_id,)
  assert tok.vocab_size == len(ref)
  ids = tok.encode(SAMPLE)
  assert ids == ref.encode(SAMPLE, add_special_tokens=False)
  assert tok.decode(ids) == SAMPLE
  specials = [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]
  assert tok.decode(specials[:1] + ids + specials) == SAMPLE


def test_hf_generation_config_adds_stop_ids(tmp_path, tokenizer_json):
  """generate stops at generation_config.json's eos ids (config.json's when there is none); they
  give the EOS when the tokenizer files name none (here: a bare tokenizer.json beside config.json)."""
  end, close = SPECIALS.index("<|end|>") - len(SPECIALS) + tokens_in(tokenizer_json), 7
  d = hf_dir(tmp_path / "a", tokenizer_json, config={**FAST, "eos_token": "</s>"}, generation_config={"eos_token_id": [close, end]}, model_config={"eos_token_id": 3})
  tok = HFTokenizer(d / "tokenizer.json")
  assert tok.stop_ids == (tok.eos_id, close, end) and tok.bos_id is None and tok.pad_id == tok.eos_id
  bare = HFTokenizer(hf_dir(tmp_path / "b", tokenizer_json, model_config={"eos_token_id": end}))
  assert (bare.eos_id, bare.stop_ids, bare.pad_id, bare.bos_id) == (end, (end,), end, None)


def test_hf_bad_input_is_one_line(tmp_path, tokenizer_json, monkeypatch):
  def error(**files):
    with pytest.raises(ConfigError) as e:
      HFTokenizer(hf_dir(tmp_path / str(len(list(tmp_path.iterdir()))), tokenizer_json, **files))
    assert "\n" not in str(e.value)
    return str(e.value)

  assert "no EOS token" in error()
  assert "eos_token '<eos>' is not a token of tokenizer.json" in error(config={"eos_token": "<eos>"})
  assert "eos_token_id must be a token id" in error(model_config={"eos_token_id": "</s>"})
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(ConfigError, match="the tokenizers library cannot read it"):
    HFTokenizer(tmp_path / "broken.json")
  with pytest.raises(ConfigError, match="no tokenizer.json at"):
    HFTokenizer(tmp_path / "missing")
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
  with pytest.raises(ConfigError, match=r"pip install 'jaxlm\[hf\]'"):
    HFTokenizer(tmp_path / "broken.json")


def test_tokenizer_for_uses_the_registry_and_checks_the_vocabulary(tmp_path, tokenizer_json):
  d = hf_dir(tmp_path, tokenizer_json, config={**FAST, "bos_token": "<s>", "eos_token": "</s>"})
  data = DataConfig(tokenizer="hf", tokenizer_path=str(d))
  tok = tokenizer_for(Experiment(model=ModelConfig(vocab_size=384), data=data), tmp_path / "run")
  assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 384
  with pytest.raises(ConfigError, match=f"^the tokenizer has {tok.vocab_size} tokens but model.vocab_size is 256$"):
    tokenizer_for(Experiment(model=ModelConfig(vocab_size=256), data=data), tmp_path / "run")
  assert isinstance(tokenizers.load(DataConfig()), ByteTokenizer)
  assert tokenizers.load(DataConfig(tokenizer="sentencepiece")) is None  # to be trained in a run directory
  with pytest.raises(ConfigError, match="needs data.tokenizer_path"):  # the path may come from an HF init_from
    tokenizers.load(DataConfig(tokenizer="hf"))
  with pytest.raises(ConfigError, match="no sentencepiece model"):
    tokenizer_for(Experiment(model=ModelConfig(vocab_size=1024), data=DataConfig(tokenizer="sentencepiece")), tmp_path, train_if_missing=False)


def test_pipeline_packs_documents_with_the_hf_special_ids(tmp_path, tokenizer_json):
  tok = HFTokenizer(hf_dir(tmp_path, tokenizer_json, config={**FAST, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"the fox {i}"}) for i in range(100)))
  b = next(iter(pipeline.lm_dataset({f"jsonl:{tmp_path}/docs.jsonl": 1.0}, "train", tok, seq_len=32, batch_size=2, seed=0)))
  for inp, tgt, seg in zip(b["inputs"], b["targets"], b["segment_ids"]):
    starts = [j for j in range(1, 32) if seg[j] != seg[j - 1]]
    assert len(starts) >= 2
    assert all(inp[j] == tok.bos_id and tgt[j - 1] == tok.eos_id for j in starts)  # [BOS] text [EOS] [BOS] ...
    assert not np.isin(inp, [0, 1, 2, tok.pad_id]).any()  # no byte-tokenizer specials (here <unk>, "!", '"'), no padding
