"""The Hugging Face commands end to end, on a tiny Llama with its own tokenizer.json:
`jaxlm generate HF_DIR`, `convert hf-import` / `hf-export`, `init_from` an HF directory with the
finetune_hf_lora template, and upcycling an imported Llama into a Mixtral that transformers loads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from jaxlm.cli import main  # noqa: E402
from jaxlm.interop.hf import tiny  # noqa: E402

torch.set_num_threads(1)
TOKENS = np.random.default_rng(0).integers(3, 318, (1, 96))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(directory, transformers model): a tiny Llama with a BPE tokenizer.json (BOS 318, EOS 319)."""
  path = tmp_path_factory.mktemp("hf") / "tiny-llama"
  ids = tiny.tokenizer(path)
  model = tiny.make("llama", path, vocab_size=384, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
  return path, model


def _generated(capsys, target) -> str:
  assert main(["generate", str(target), "--prompt", "The ", "--max-new-tokens", "12"]) == 0
  return capsys.readouterr().out.split("\n", 1)[1]


def _transformers(path):
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()


def test_import_generate_export(llama, tmp_path, capsys):
  src, ref = llama
  text = _generated(capsys, src)  # straight from the HF directory
  assert main(["convert", "hf-import", str(src), str(tmp_path / "run")]) == 0
  assert "imported llama" in capsys.readouterr().out
  assert _generated(capsys, tmp_path / "run") == text  # the imported run decodes the same (greedy)
  assert main(["convert", "hf-export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
  back = _transformers(tmp_path / "out")
  np.testing.assert_array_equal(tiny.logits(back, TOKENS), tiny.logits(ref, TOKENS))  # float32 both ways: bitwise
  assert (tmp_path / "out" / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
  assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 319


def test_bad_input_is_one_line(llama, tmp_path, capsys):
  src, _ = llama
  assert main(["convert", "hf-import", str(tmp_path / "nothing"), str(tmp_path / "run")]) == 2
  assert "no config.json" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()
  bad = tmp_path / "bad"
  bad.mkdir()
  for f in src.iterdir():
    (bad / f.name).write_bytes(f.read_bytes())
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": 300}))  # fewer rows than the tokenizer's 320 tokens
  assert main(["convert", "hf-import", str(bad), str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "error:" in err, err
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_lora_from_an_hf_directory_then_export(llama, tmp_path, capsys):
  """finetune_hf_lora:smoke trains LoRA on the HF model; the merged export loads in transformers."""
  src, ref = llama
  run = tmp_path / "lora"
  assert main(["train", "experiments/finetune_hf_lora.py:smoke", "--run-dir", str(run), "--set", f"init_from={src}"]) == 0
  assert json.loads((run / "init_from.json").read_text()) == {"path": str(src), "format": "hf"}
  assert main(["convert", "hf-export", str(run), str(tmp_path / "out")]) == 0
  merged = tiny.logits(_transformers(tmp_path / "out"), TOKENS)
  assert 0 < np.abs(merged - tiny.logits(ref, TOKENS)).max() < 1.0  # trained a little, still the same model


@pytest.mark.slow
def test_upcycle_imported_llama_into_mixtral(llama, tmp_path, capsys):
  """Upcycled (every expert a copy of the MLP, softmax top-k renormalised): transformers' Mixtral
  computes the Llama's function."""
  src, ref = llama
  assert main(["convert", "hf-import", str(src), str(tmp_path / "dense")]) == 0
  exp_file = tmp_path / "moe_exp.py"
  exp_file.write_text(
      "import dataclasses\n"
      "from jaxlm.config import MoEConfig\n"
      "from jaxlm.interop import hf\n"
      "def experiment():\n"
      f"  exp = hf.experiment({str(src)!r})\n"
      "  return dataclasses.replace(exp, name='moe', init_from='', model=dataclasses.replace(exp.model, ffn='moe', moe=MoEConfig(n_experts=4, top_k=2)))\n"
  )
  assert main(["convert", "upcycle", str(tmp_path / "dense"), str(exp_file), "--run-dir", str(tmp_path / "moe")]) == 0
  assert main(["convert", "hf-export", str(tmp_path / "moe"), str(tmp_path / "out"), "--model-type", "mixtral"]) == 0
  mixtral = _transformers(tmp_path / "out")
  assert type(mixtral).__name__ == "MixtralForCausalLM"
  np.testing.assert_allclose(tiny.logits(mixtral, TOKENS), tiny.logits(ref, TOKENS), atol=1e-4)
