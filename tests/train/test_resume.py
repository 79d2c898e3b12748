"""Resuming: a run stopped and resumed ends bit for bit where an uninterrupted run ends; the first
step after a restore needs no more memory than any other; a checkpoint restores onto other meshes."""

import dataclasses
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import experiments
from jaxlm.train import loop
from jaxlm.train.checkpoint import Checkpointer
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
  assert l_resumed == l_straight  # bit for bit (JSON keeps every bit of a float)
  (s1, p1), (s2, p2) = params(straight), params(resumed)
  assert s1 == s2 == 6
  for a, b in zip(p1, p2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def synthetic_batch(seed: int) -> dict[str, np.ndarray]:
  b, l, vocab = BASE.data.batch_size, BASE.data.seq_len, BASE.model.vocab_size
  toks = np.random.default_rng(seed).integers(3, vocab, (b, l + 1)).astype(np.int32)
  ones = np.ones((b, l), np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": ones, "positions": np.cumsum(ones, 1) - 1, "loss_mask": ones}


def live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays())


def not_donated(state) -> list[str]:
  """Paths of the arrays a step left alive (XLA cannot reuse every input, e.g. a bool scalar)."""
  return [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state.replace(frozen=None))[0] if not x.is_deleted()]


def test_first_step_after_restore_is_a_steady_state_step(tmp_path):
  """The restored arrays are the devices' own and the step donates them; the fresh state the
  run was built with is gone: live device bytes before and after the first step after a restore
  equal those around a steady-state step (the compiled step is the same program)."""
  base = live_bytes()
  setup = loop.prepare(EXP)
  with jax.set_mesh(setup.mesh):
    batch = loop.to_global(synthetic_batch(0), setup.batch_sharding)
    compiled = setup.train_step.lower(setup.state, batch).compile()
    state, _ = compiled(setup.state, batch)
    steady_before = live_bytes() - base
    inputs = state
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    steady_after = live_bytes() - base
  kept = not_donated(inputs)
  ckpt = Checkpointer(tmp_path, EXP.checkpoint)
  ckpt.save(2, params=state.params, rest=state.rest, opt_state=state.opt_state, data_iterator=None, config={})
  ckpt.wait()
  del metrics

  setup = dataclasses.replace(setup, state=jax.tree.map(jnp.copy, state))  # the rerun: a fresh state (as from `prepare`), then the checkpoint
  for x in jax.tree.leaves(state):  # the first process ends
    x.delete()
  state, start = loop.resume(setup, Checkpointer(tmp_path, EXP.checkpoint), None)
  assert start == 2
  restored = state
  with jax.set_mesh(setup.mesh), warnings.catch_warnings():
    warnings.simplefilter("error")  # "Some donated buffers were not usable" would be a warning
    first_before = live_bytes() - base
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    first_after = live_bytes() - base
  assert not_donated(restored) == kept  # every restored array the step could donate, it did
  assert first_before <= 1.05 * steady_before, (first_before, steady_before)
  assert first_after <= 1.05 * steady_after, (first_after, steady_after)


def test_checkpoint_restores_onto_smaller_meshes(tmp_path):
  """Written on 8 devices, restored onto 4, written again and restored onto 1: the same values."""
  setup = loop.prepare(EXP)
  with jax.set_mesh(setup.mesh):
    state, _ = setup.train_step(setup.state, loop.to_global(synthetic_batch(0), setup.batch_sharding))  # moments not zero
  reference = [np.asarray(x) for x in jax.tree.leaves(state)]
  src = tmp_path / "8"
  ckpt = Checkpointer(src, EXP.checkpoint)
  ckpt.save(1, params=state.params, rest=state.rest, opt_state=state.opt_state, data_iterator=None, config={})
  ckpt.wait()
  for n in (4, 1):
    setup = loop.prepare(EXP, devices=jax.devices()[:n], abstract=True)  # shapes and shardings: the restore target
    state, start = loop.resume(setup, Checkpointer(src, EXP.checkpoint, read_only=True), None)
    assert start == 1 and setup.mesh.size == n
    leaves = jax.tree.leaves(state)
    assert {len(x.sharding.device_set) for x in leaves} == {n}
    for a, b in zip(leaves, reference):
      np.testing.assert_array_equal(np.asarray(a), b)
    src = tmp_path / str(n)
    ckpt = Checkpointer(src, EXP.checkpoint)
    ckpt.save(1, params=state.params, rest=state.rest, opt_state=state.opt_state, data_iterator=None, config={})
    ckpt.wait()
