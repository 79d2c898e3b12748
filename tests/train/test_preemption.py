"""Stopping `jaxlm train`: SIGTERM saves and exits 0 quickly; SIGKILL anywhere, even while a
checkpoint is being written, loses nothing that a rerun does not redo bit for bit."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.cli import main
from jaxlm.train import loop
from jaxlm.train.checkpoint import TMP_SUFFIX, Checkpointer
from jaxlm.train.run import load_for_inference

REPO = Path(__file__).resolve().parents[2]
# Bound on SIGTERM -> exit for the smoke model: the step in flight plus one checkpoint write take
# well under a second here; the rest is slack for a loaded 2-core machine.
SIGTERM_BOUND_S = 10.0


def losses(run_dir: Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path, monkeypatch, capsys):
  run_dir = tmp_path / "run"
  fired = []

  def spy(where, step):  # note when the signal goes out (JAXLM_SIGNAL_AT sends it from this hook)
    if (where, step) == ("step", 3):
      fired.append(time.perf_counter())
    signal_at(where, step)

  signal_at = loop.signal_at
  monkeypatch.setattr(loop, "signal_at", spy)
  monkeypatch.setenv("JAXLM_SIGNAL_AT", "step:3:TERM")
  settings = ("optim.decay_steps=6", "train.steps=6", "train.eval_every=0", "train.checkpoint_every=2", "train.log_every=1", "train.sample_tokens=0")  # test_resume's
  argv = ["train", "quickstart:smoke", "--run-dir", str(run_dir), *(x for s in settings for x in ("--set", s))]
  assert main(argv) == 0
  elapsed = time.perf_counter() - fired[0]
  assert elapsed < SIGTERM_BOUND_S, elapsed
  assert "stopped by SIGTERM at step 3: checkpoint of step 3 saved" in capsys.readouterr().out
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the trainer's only while it trains
  ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  assert sorted(losses(run_dir)) == [1, 2, 3]


def _train(run_dir: Path, *overrides: str, signal_at: str | None = None) -> subprocess.Popen:
  args = ["train", "quickstart:smoke", "--run-dir", str(run_dir), "--set", "train.steps=10", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]
  args += ["--set", "train.eval_every=0", "--set", "train.sample_tokens=0", *(x for o in overrides for x in ("--set", o))]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  env.pop("JAXLM_SIGNAL_AT", None)
  if signal_at:
    env["JAXLM_SIGNAL_AT"] = signal_at
  return subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


@pytest.mark.slow
def test_killed_and_preempted_runs_end_bitwise_like_an_uninterrupted_one(tmp_path):
  straight, run = tmp_path / "straight", tmp_path / "run"
  rc, out = _finish(_train(straight))
  assert rc == 0, out[-3000:]

  # 1. SIGKILL right after the save of step 4 started: its files are still being written.
  rc, out = _finish(_train(run, signal_at="save:4:KILL"))
  assert rc == -signal.SIGKILL, out[-3000:]
  assert Checkpointer(run / "checkpoints", read_only=True).latest_step() == 2
  assert (run / "checkpoints" / f"4{TMP_SUFFIX}").is_dir()  # caught mid-write (the write takes far longer than the kill)

  # 2. The rerun resumes from step 2; SIGTERM from outside while it is at step 7 (held there by
  #    SIGSTOP so the signal lands mid-run): it saves step 7 and exits 0.
  proc = _train(run, signal_at="step:7:STOP")
  _, status = os.waitpid(proc.pid, os.WUNTRACED)
  assert os.WIFSTOPPED(status)
  t0 = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGCONT)
  rc, out = _finish(proc)
  assert rc == 0 and time.perf_counter() - t0 < SIGTERM_BOUND_S, out[-3000:]
  assert "resuming at step 2" in out and "stopped by SIGTERM at step 7: checkpoint of step 7 saved" in out
  assert f"4{TMP_SUFFIX}: an unfinished checkpoint save" in out

  # 3. SIGKILL after step 9 (step 8's save may still be in flight), then the plain rerun.
  rc, out = _finish(_train(run, signal_at="step:9:KILL"))
  assert rc == -signal.SIGKILL and "resuming at step 7" in out, out[-3000:]
  rc, out = _finish(_train(run))
  assert rc == 0 and re.search("resuming at step [78] ", out), out[-3000:]

  assert losses(run) == losses(straight) and sorted(losses(run)) == list(range(1, 11))  # bit for bit
  (_, a, _, step_a), (_, b, _, step_b) = load_for_inference(straight), load_for_inference(run)
  assert step_a == step_b == 10
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
