"""A catalogue of bad input: each case is one line `jaxlm: error: ...` naming the problem, exit
code 2, no traceback, and the run directory exactly as it was (absent, or an earlier run's files
untouched).

Cases run in-process (`jaxlm.cli.main`) and fail before any step is compiled, so the whole table
costs a few seconds. Placeholders in argv: {tmp} is the test's temporary directory, {files}
a directory of prepared experiment, data and tokenizer files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from jaxlm.cli import main

SMOKE = "quickstart:smoke"

EXPERIMENT_FILES = {
    "syntax.py": "def experiment(:\n  pass\n",
    "raises.py": "def experiment():\n  return 1 / 0\n",
    "unknown_key.py": "from jaxlm.config import *\ndef experiment():\n  return Experiment(model=ModelConfig(n_layerz=2))\n",
    "wrong_type.py": "from jaxlm.config import *\ndef experiment():\n  return Experiment(model=ModelConfig(d_model='256'))\n",
    "wrong_tuple.py": "from jaxlm.config import *\ndef experiment():\n  return Experiment(peft=PeftConfig(method='lora', targets='all-linear'))\n",
    "not_experiment.py": "def experiment():\n  return {'name': 'x'}\n",
    "no_function.py": "def other():\n  pass\n",
    "import_error.py": "import jaxlm.nosuchmodule\ndef experiment():\n  pass\n",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad_input")
  for name, text in EXPERIMENT_FILES.items():
    (d / name).write_text(text)
  (d / "empty.txt").write_text("")
  (d / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
  (d / "tokenizer").mkdir()
  (d / "tokenizer" / "tokenizer.json").write_text("{not a tokenizer")
  (d / "hf_no_weights").mkdir()
  (d / "hf_no_weights" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4}))
  (d / "hf_gpt2").mkdir()
  (d / "hf_gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  return d


def train(*sets: str) -> list[str]:
  return ["train", SMOKE] + [x for s in sets for x in ("--set", s)]


CASES = [
    # experiment files
    (["train", "nosuch"], "unknown experiment 'nosuch'"),
    (["train", "missing/file.py"], "experiment file not found"),
    (["train", "{files}/syntax.py"], "syntax.py, line 1: invalid syntax"),
    (["train", "{files}/raises.py"], "raises.py, line 2: experiment() raised ZeroDivisionError"),
    (["train", "{files}/unknown_key.py"], "unexpected keyword argument 'n_layerz'"),
    (["train", "{files}/wrong_type.py"], "model.d_model must be an integer, got '256'"),
    (["train", "{files}/wrong_tuple.py"], "peft.targets must be a tuple, got 'all-linear'"),
    (["train", "{files}/not_experiment.py"], "returned dict, not an Experiment"),
    (["train", "{files}/no_function.py"], "has no function 'experiment'"),
    (["train", "{files}/no_function.py:nosuch"], "has no function 'nosuch'"),
    (["train", "{files}/import_error.py"], "importing it raised ModuleNotFoundError"),
    # overrides
    (train("model.n_layerz=2"), "unknown config key 'model.n_layerz'"),
    (train("model.n_layers=many"), "bad value for model.n_layers"),
    (train("model.n_layers"), "bad override 'model.n_layers'"),
    (train("model=2"), "model is a section"),
    (train("model.tie_embeddings=maybe"), "expected true or false"),
    (train("optim.lr=fast"), "bad value for optim.lr: expected a number"),
    (train("peft.targets=[unclosed"), "is not a Python literal"),
    (train("data.mixture=['a']"), "expected a mapping"),
    (train("model.moe=1", "model.moe.top_k=1"), "model.moe is a section"),
    # model
    (train("model.n_kv_heads=3"), "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
    (train("model.n_layers=0"), "model.n_layers must be >= 1"),
    (train("model.dtype=float8"), "model.dtype must be one of"),
    (train("model.remat=some"), "model.remat must be one of"),
    (train("model.ffn=sparse"), "ffn kind"),
    (train("model.attention.qk_norm=layer"), "model.attention.qk_norm must be one of"),
    (train("model.rope_scaling.kind=yarn"), "model.rope_scaling.kind must be one of"),
    (train("model.vocab_size=200"), "model.vocab_size (200) is smaller than the 259 tokens"),
    # mesh
    (train("mesh.data=3", "mesh.fsdp=1"), "mesh: data*fsdp*expert*tensor = 3 but there are 8 devices"),
    (train("mesh.data=-1"), "at most one axis may be -1"),
    (train("mesh.tensor=0"), "mesh: axis sizes must be >= 1 or -1"),
    (train("data.batch_size=4"), "must be divisible by the 8 devices along the batch axes"),
    # data
    (train("data.mixture={'nosuch': 1.0}"), "nosuch"),
    (train("data.mixture={'text:{tmp}/none/*.txt': 1.0}"), "no files match"),
    (train("data.mixture={'text:{files}/empty.txt': 1.0}"), "empty.txt"),
    (train("data.mixture={'stdlib_code': 0.0, 'stdlib_prose': 0.0}"), "data.mixture weights must not all be 0"),
    (train("data.mixture={'stdlib_code': -1.0}"), "must be a weight >= 0"),
    (train("data.seq_len=1"), "data.seq_len must be >= 2"),
    (train("data.tokenizer=wordpiece"), "data.tokenizer"),
    (train("data.tokenizer=sentencepiece", "data.sp_model={tmp}/none.model"), "none.model"),
    (train("data.tokenizer=hf", "data.tokenizer_path={files}/tokenizer"), "tokenizer"),
    (train("data.similarity=cosine"), "data.similarity must be none, exact, lsh or auto"),
    # train / optim / checkpoint
    (train("train.steps=0"), "train.steps must be >= 1"),
    (train("train.grad_accum=3"), "data.batch_size (8) must be divisible by train.grad_accum (3)"),
    (train("optim.lr=0"), "optim.lr must be > 0"),
    (train("optim.b2=1.0"), "optim.b1 and optim.b2 must be in [0, 1)"),
    (train("checkpoint.max_to_keep=0"), "checkpoint.max_to_keep must be >= 1"),
    # MoE and soft MoE
    (train("model.ffn=moe", "model.moe.top_k=9"), "model.moe.top_k must be in [1, n_experts=8]"),
    (train("model.ffn=moe", "model.moe.router=hash"), "model.moe.router must be one of"),
    (train("model.ffn=moe", "model.moe.router=expert_choice"), "allow_noncausal_routing"),
    (train("model.ffn=moe", "model.moe.n_experts=6", "mesh.expert=4", "mesh.fsdp=2"), "model.moe.n_experts (6) must be divisible by the expert mesh axis"),
    (train("model.ffn=moe", "model.moe.jitter=1.5"), "model.moe.jitter must be in [0, 1)"),
    (train("model.ffn=soft_moe", "model.soft_moe.segment_len=48"), "must be a multiple of model.soft_moe.segment_len (48)"),
    (train("model.ffn=soft_moe", "model.soft_moe.granularity=sequence"), "allow_noncausal_routing"),
    (train("model.ffn=soft_moe", "model.soft_moe.expert_dropout=1.0"), "model.soft_moe.expert_dropout must be in [0, 1)"),
    # PEFT
    (train("peft.method=lorax"), "peft.method must be one of"),
    (train("peft.method=lora", "peft.targets=('.*attn/q_proj',)"), "matches no linear weight"),
    (train("peft.method=lora", "peft.rank=0"), "peft.rank must be >= 1"),
    (train("peft.method=lora", "peft.rank=100"), "rank 100 is larger than the adapted dimensions"),
    (train("peft.method=bitfit", "peft.n_experts=4"), "peft.n_experts (a mixture of adapters) works with lora, ia3 or bottleneck"),
    (train("peft.method=arrow"), "peft.library needs at least 2 adapter directories"),
    # initial weights
    (train("init_from={tmp}/nothing"), "no jaxlm run or Hugging Face model there"),
    (train("init_from={files}/hf_gpt2"), "model_type 'gpt2' is not supported"),
    (train("init_from={files}/hf_no_weights"), "no model.safetensors"),
    # other commands
    (["train"], "the following arguments are required: experiment"),
    (["generate", "{tmp}/nothing", "--prompt", "x"], "is not a jaxlm run directory"),
    (["eval", "{tmp}/nothing"], "is not a jaxlm run directory"),
    (["merge", "{tmp}/nothing", "--out", "{tmp}/merged"], "is not a jaxlm run directory"),
    (["convert", "hf-import", "{tmp}/nothing", "{tmp}/run"], "no config.json"),
    (["convert", "hf-import", "{files}/hf_gpt2", "{tmp}/run"], "model_type 'gpt2' is not supported"),
    (["convert", "hf-export", "{tmp}/nothing", "{tmp}/out"], "is not a jaxlm run directory"),
    (["inspect", SMOKE, "--set", "mesh.tensor=3"], "mesh:"),
]


def _snapshot(path: Path) -> dict[str, str]:
  if not path.exists():
    return {}
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("argv, message", CASES, ids=[f"{i:02d}-{c[0][0]}" for i, c in enumerate(CASES)])
def test_bad_input(argv, message, files, tmp_path, capsys):
  fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{files}", str(files))
  argv, message = [fill(a) for a in argv], fill(message)
  run_dir = tmp_path / "run"
  if argv[0] == "train" and len(argv) > 1:
    argv = argv + ["--run-dir", str(run_dir)]
  before = _snapshot(tmp_path)
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and message in err, err
  assert "\n" not in err and "Traceback" not in err
  assert _snapshot(tmp_path) == before  # nothing written, nothing changed


def test_there_are_at_least_forty_cases():
  assert len(CASES) >= 40


def test_an_existing_run_is_left_as_it_was(tmp_path, capsys):
  """Resuming a run with another model, or with a bad override, changes none of its files."""
  from jaxlm import experiments
  from jaxlm.train.run import save_config

  run_dir = tmp_path / "run"
  run_dir.mkdir()
  save_config(run_dir, experiments.load(SMOKE))
  (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
  before = _snapshot(run_dir)
  for sets, message in ((["model.n_layers=3"], "different model config (model.n_layers)"), (["train.steps=-1"], "train.steps must be >= 1")):
    assert main(train(*sets) + ["--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert _snapshot(run_dir) == before
