"""Several hosts: two processes x two CPU devices with gloo collectives equal one process x four,
also across a checkpoint and resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def _jaxlm_on_two_hosts(args: list[str]) -> list[subprocess.Popen]:
  """`jaxlm ARGS` started as two processes of two CPU devices each, coordinated on localhost."""
  port = _free_port()
  return [
      subprocess.Popen(
          [sys.executable, "-m", "jaxlm.cli", *args, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
          env=_env(2),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          cwd=HERE.parent,
      )
      for i in range(2)
  ]


def _wait(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]


@pytest.mark.multihost
@pytest.mark.slow  # two processes, 45 s on 2 cores: make test-all
def test_two_processes_equal_one(tmp_path):
  """Five steps; the two processes checkpoint after the third and resume from it."""
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, str(HERE / "multihost_worker.py"), str(tmp_path / "multi.json"), f"127.0.0.1:{port}", "2", str(i)],
          env=_env(2),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  single = subprocess.run([sys.executable, str(HERE / "multihost_worker.py"), str(tmp_path / "single.json")], env=_env(4), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
  multi, one = json.loads((tmp_path / "multi.json").read_text()), json.loads((tmp_path / "single.json").read_text())
  assert multi["processes"] == 2 and one["processes"] == 1 and len(multi["losses"]) == 5
  assert sorted(p.name for p in (tmp_path / "multi.json.ckpt").iterdir()) == ["3"]
  np.testing.assert_allclose(multi["losses"], one["losses"], rtol=1e-5)
  np.testing.assert_allclose(multi["param_sq_norm"], one["param_sq_norm"], rtol=1e-5)


@pytest.mark.multihost
@pytest.mark.slow
def test_jaxlm_train_on_two_hosts_writes_once_and_resumes(tmp_path):
  """The same `jaxlm train` command on two processes: one metrics file, per-host data state."""
  run_dir = tmp_path / "run"

  def launch(steps: int) -> None:
    _wait(_jaxlm_on_two_hosts(["train", "quickstart:smoke", "--run-dir", str(run_dir), "--set", f"train.steps={steps}", "--set", "train.sample_tokens=0"]))

  launch(3)
  data_state = sorted(p.name for p in (run_dir / "checkpoints" / "3" / "data").glob("process_*"))
  assert data_state == ["process_0-of-2.json", "process_1-of-2.json"]
  launch(6)
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 6  # written once, by process 0


@pytest.mark.multihost
@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_one_checkpoint(tmp_path):
  """A scheduler's SIGTERM reaching one host: jax's preemption sync point makes both processes
  checkpoint the same step and exit 0; rerunning the command resumes from that step."""
  import signal
  import time

  run_dir = tmp_path / "run"
  args = ["train", "quickstart:smoke", "--run-dir", str(run_dir), "--set", "train.steps=400", "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0", "--set", "train.log_every=1", "--set", "train.sample_tokens=0"]
  procs = _jaxlm_on_two_hosts(args)
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 2):
    assert all(p.poll() is None for p in procs), "a process ended before training started"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  _wait(procs)
  steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) == 1 and 2 <= steps[0] < 400, steps
  saved = steps[0]
  assert sorted(p.name for p in (run_dir / "checkpoints" / str(saved) / "data").glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
  _wait(_jaxlm_on_two_hosts([a if a != "train.steps=400" else f"train.steps={saved + 2}" for a in args]))
  train_steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
  assert train_steps[-2:] == [saved + 1, saved + 2] and train_steps == sorted(set(train_steps))
