"""The command line: bad input is one line with exit code 2 and writes nothing; train, resume,
generate and inspect work from the shell."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxlm.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "nosuch"], "unknown experiment 'nosuch'"),
        (["train", "missing/file.py"], "experiment file not found"),
        (["train", "quickstart:smoke", "--set", "model.n_layerz=2"], "unknown config key 'model.n_layerz'"),
        (["train", "quickstart:smoke", "--set", "model.n_layers=many"], "bad value for model.n_layers"),
        (["train", "quickstart:smoke", "--set", "model.n_kv_heads=3"], "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
        (["train", "quickstart:smoke", "--set", "mesh.data=3", "--set", "mesh.fsdp=1"], "mesh: data*fsdp*expert*tensor = 3 but there are 8 devices"),
        (["train", "quickstart:smoke", "--set", "data.batch_size=4"], "must be divisible by the 8 devices along the batch axes"),
        (["train", "quickstart:smoke", "--set", "data.mixture={'nosuch': 1.0}"], "unknown data source 'nosuch'"),
        (["train"], "the following arguments are required: experiment"),
        (["generate", "/nonexistent/run", "--prompt", "x"], "is not a jaxlm run directory"),
        (["train", "quickstart:smoke", "--set", "peft.method=lorax"], "peft.method must be one of"),
        (["train", "quickstart:smoke", "--set", "peft.method=lora", "--set", "peft.targets=('.*attn/q_proj',)"], "peft.targets: '.*attn/q_proj' matches no linear weight"),
        (["train", "quickstart:smoke", "--set", "peft.method=lora", "--set", "peft.rank=0"], "peft.rank must be >= 1"),
        (["train", "quickstart:smoke", "--set", "peft.method=lora", "--set", "peft.rank=100"], "rank 100 is larger than the adapted dimensions of blocks/0/attn/w_k"),
        (["train", "quickstart:smoke", "--set", "init_from=/nonexistent/run"], "init_from /nonexistent/run: no jaxlm run or Hugging Face model there"),
        (["merge", "/nonexistent/run", "--out", "/tmp/jaxlm_never_written"], "is not a jaxlm run directory"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys):
  run_dir = tmp_path / "run"
  if argv[0] == "train" and len(argv) > 1:
    argv = argv + ["--run-dir", str(run_dir)]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and message in err, err
  assert "\n" not in err and "Traceback" not in err
  assert not run_dir.exists()


def _jaxlm(*args, **kw):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], env=env, capture_output=True, text=True, cwd=REPO, **kw)


@pytest.mark.slow
def test_interrupt_then_rerun_resumes_then_generate(tmp_path):
  """Kill `jaxlm train` after its first checkpoint; the same command resumes from it."""
  run_dir = tmp_path / "run"
  args = ["train", "quickstart:smoke", "--run-dir", str(run_dir), "--set", "train.steps=400", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=0"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *args], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = run_dir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts.glob("*")):
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=60)
  done = sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
  assert done and done[-1] < 400
  out = _jaxlm(*args[:-4], "--set", "train.steps=" + str(done[-1] + 2), "--set", "train.eval_every=0", timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"resuming at step {done[-1]}" in out.stdout
  steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert max(steps) == done[-1] + 2
  gen = _jaxlm("generate", str(run_dir), "--prompt", "def ", "--prompt", "The", "--max-new-tokens", "8", timeout=300)
  assert gen.returncode == 0, gen.stderr[-2000:]
  assert gen.stdout.count("--- quickstart_smoke step") == 2


def test_inspect_prints_counts_memory_and_sharding(capsys):
  assert main(["inspect", "quickstart", "--devices", "8"]) == 0
  out = capsys.readouterr().out
  assert "parameters  " in out and "memory per device" in out
  assert "blocks.0.ffn.w_gate" in out and "P('fsdp'" in out
  assert main(["inspect", "quickstart", "--json"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert r["params_total"] == r["params_active"] > 3_000_000


@pytest.mark.slow  # the whole CLI lifecycle, 36 s on 2 cores: make test-all (its parts have their own fast tests)
def test_train_then_eval_and_generate_then_lora_and_merge_in_process(tmp_path, capsys):
  run_dir = tmp_path / "run"
  assert main(["train", "quickstart:smoke", "--run-dir", str(run_dir), "--set", "train.steps=2", "--set", "train.sample_tokens=0"]) == 0
  capsys.readouterr()
  assert main(["eval", str(run_dir), "--batches", "1"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["step"] == 2 and set(report) >= {"eval_loss", "eval_ppl", "eval_loss/stdlib_prose", "eval_loss/stdlib_code"}
  last_eval = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line][-1]
  assert report["eval_loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-5)  # same checkpoint, same batches
  assert main(["generate", str(run_dir), "--prompt", "def ", "--prompt", "x", "--max-new-tokens", "4"]) == 0
  assert capsys.readouterr().out.count("--- quickstart_smoke step 2") == 2
  assert main(["generate", str(run_dir), "--prompt", "x", "--top-p", "2"]) == 2
  # LoRA from that run (init_from): it starts where the base ends, checkpoints only its adapters,
  # and `jaxlm merge` turns it into a plain run that evaluates the same.
  lora_dir, merged_dir = tmp_path / "lora", tmp_path / "merged"
  assert main(["train", "lora_quickstart:smoke", "--run-dir", str(lora_dir), "--set", f"init_from={run_dir}", "--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.sample_tokens=0"]) == 0
  out = capsys.readouterr().out
  assert f"from {run_dir} step 2" in out and "peft lora: " in out and "trainable parameters of" in out
  lora_evals = [json.loads(line) for line in (lora_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
  assert lora_evals[0]["eval_loss"] == pytest.approx(last_eval["eval_loss/stdlib_code"], rel=1e-6)  # zero-init LoRA == the base
  assert json.loads((lora_dir / "init_from.json").read_text()) == {"path": str(run_dir), "step": 2}
  saved = json.loads((lora_dir / "checkpoints" / "2" / "params" / "_METADATA").read_text())["tree_metadata"]
  assert saved and all(eval(k)[-2] in ("a", "b") for k in saved)  # LoRA A and B only: the base is named by init_from
  # Merging rebuilds the base from init_from and restores the adapters; the merged run evaluates
  # like the adapter run did at its last step (same batches).
  assert main(["merge", str(lora_dir), "--out", str(merged_dir)]) == 0
  capsys.readouterr()
  assert main(["eval", str(merged_dir), "--batches", "1"]) == 0
  merged_report = json.loads(capsys.readouterr().out)
  assert merged_report["step"] == 0 and merged_report["eval_loss"] == pytest.approx(lora_evals[-1]["eval_loss"], rel=1e-5)
  assert main(["merge", str(lora_dir), "--out", str(merged_dir)]) == 2  # never overwrites
