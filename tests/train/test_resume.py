"""Checkpoints: a run stopped and resumed ends exactly where an uninterrupted run ends."""

import dataclasses
import json
import shutil

import jax
import numpy as np
from flax import nnx

from jaxlm import experiments
from jaxlm.train.loop import train
from jaxlm.train.run import load_for_inference

BASE = experiments.load("quickstart:smoke")
EXP = dataclasses.replace(
    BASE,
    optim=dataclasses.replace(BASE.optim, decay_steps=6),  # the schedule must not depend on train.steps here
    train=dataclasses.replace(BASE.train, steps=6, eval_every=0, checkpoint_every=2, log_every=1, sample_tokens=0),
)


def losses(run_dir):
  return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def params(run_dir):
  _, model, _, step = load_for_inference(run_dir)
  return step, jax.tree.leaves(nnx.state(model, nnx.Param))


def test_resume_is_exact(tmp_path):
  """Stop after step 4 (the state of its step-4 checkpoint), rerun: steps 5-6 match exactly."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train(EXP, straight)
  # The "interrupted" run: the straight run's directory as it was right after step 4.
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  kept = [line for line in (resumed / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4]
  (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
  summary = train(EXP, resumed)  # the same command again: continues at step 5
  assert summary["steps"] == 6
  l_straight, l_resumed = losses(straight), losses(resumed)
  assert sorted(l_resumed) == sorted(l_straight) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([l_resumed[s] for s in (5, 6)], [l_straight[s] for s in (5, 6)], rtol=1e-6)
  (s1, p1), (s2, p2) = params(straight), params(resumed)
  assert s1 == s2 == 6
  for a, b in zip(p1, p2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
