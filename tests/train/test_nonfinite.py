"""Bad updates: a non-finite step is skipped without a trace or stops the run; loss spikes are
skipped against rolling statistics; a non-finite state is never checkpointed."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import cli, experiments
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxlm.errors import TrainingError
from jaxlm.train import loop
from jaxlm.train.guard import GuardState, SkipReport, guarded, judge

V = 320
EXP = Experiment(
    name="nonfinite_test",
    mesh=MeshConfig(fsdp=1),
    model=ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, dtype="float32"),
    data=DataConfig(seq_len=8, batch_size=2),
    optim=OptimConfig(lr=1e-2, warmup_steps=2),
    train=TrainConfig(steps=10),
)


def batch(seed, *, poison=False):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, V, (2, 9)).astype(np.int32)
  if poison:
    toks[0, 3] = V  # out of the table: the embedding lookup fills NaN, so loss and gradients are NaN
  ones = np.ones((2, 8), np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": ones, "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8)).copy(), "loss_mask": ones}


def test_a_nonfinite_step_is_skipped_and_leaves_no_trace():
  setup = loop.prepare(EXP, jax.devices()[:1])
  with jax.set_mesh(setup.mesh):
    step = setup.train_step.lower(setup.state, loop.to_global(batch(0), setup.batch_sharding)).compile()

    def run(batches):
      state = jax.tree.map(jnp.copy, setup.state)  # the step donates its input
      states, metrics = [], []
      for b in batches:
        state, m = step(state, loop.to_global(b, setup.batch_sharding))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
      return states, metrics

    (s1, s_bad, s2), (_, m_bad, m2) = run([batch(0), batch(0, poison=True), batch(1)])
    (_, t2), (_, n2) = run([batch(0), batch(1)])
  assert np.isnan(m_bad["loss"]) and int(m_bad["skipped_nonfinite"]) == 1 and int(m_bad["last_nonfinite_step"]) == 2
  assert int(s_bad.step) == 2 and not bool(s_bad.opt_state.guard.applied)
  for name in ("params", "rest"):  # bitwise the state before the bad step
    jax.tree.map(np.testing.assert_array_equal, getattr(s_bad, name), getattr(s1, name))
  jax.tree.map(np.testing.assert_array_equal, s_bad.opt_state.inner, s1.opt_state.inner)
  # The next step continues as if the bad batch had never come: same parameters, moments, lr.
  for name in ("params", "rest"):
    jax.tree.map(np.testing.assert_array_equal, getattr(s2, name), getattr(t2, name))
  jax.tree.map(np.testing.assert_array_equal, s2.opt_state.inner, t2.opt_state.inner)
  assert m2["loss"] == n2["loss"] and m2["lr"] == n2["lr"] > 0
  assert int(m2["skipped_nonfinite"]) == 1 and int(s2.step) == 3 and int(t2.step) == 2


def test_loss_spikes_are_skipped_against_a_rolling_mean_and_deviation():
  cfg = TrainConfig(spike_sigma=4.0, spike_window=20)
  rng = np.random.default_rng(0)
  losses = 3.0 - 0.002 * np.arange(120) + 0.02 * rng.standard_normal(120)
  losses[5] += 0.5  # within the first window: never judged
  losses[50] += 1.0  # a spike
  losses[80:] += 1.0  # a lasting change of level: absorbed, not skipped for ever
  finite = np.ones(120, bool)
  finite[60] = False  # a non-finite step: counted as such, not a spike, not fed into the statistics

  def body(g, x):
    g = judge(g, cfg, loss=x[0], finite=x[1], step=jnp.int32(0))
    return g, g.applied

  g, applied = jax.jit(lambda l, f: jax.lax.scan(body, GuardState.initial(), (l, f)))(jnp.asarray(losses, jnp.float32), jnp.asarray(finite))
  skipped = set(np.flatnonzero(~np.asarray(applied)).tolist())
  assert 50 in skipped and 60 in skipped and 5 not in skipped and 80 in skipped
  assert skipped <= {50, 60} | set(range(80, 100))  # the new level is accepted within a window
  assert int(g.skipped_spikes) == len(skipped) - 1 and int(g.skipped_nonfinite) == 1
  assert int(g.losses_seen) == 119


def test_guarded_optimizer_leaves_params_and_state_bitwise_on_a_spike():
  tx = guarded(optax.adam(0.1), TrainConfig(spike_sigma=3.0, spike_window=4))
  params = {"w": jnp.array([1.0, -0.0, 2.0])}
  state = tx.init(params)
  grads = {"w": jnp.ones(3)}
  for i, loss in enumerate([1.0, 1.1, 0.9, 1.0, 1.05, 9.0]):
    updates, new_state = tx.update(grads, state, params, loss=jnp.float32(loss), step=jnp.int32(i + 1))
    if loss == 9.0:
      assert not bool(new_state.guard.applied) and int(new_state.guard.skipped_spikes) == 1
      assert all(float(u) == 0 for u in updates["w"])
      jax.tree.map(np.testing.assert_array_equal, new_state.inner, state.inner)
    else:
      assert bool(new_state.guard.applied)
    params, state = optax.apply_updates(params, updates), new_state


def test_skip_report_counts_new_skips_and_stop_names_the_step():
  lines = []
  cfg = TrainConfig(spike_sigma=3.0)
  report = SkipReport(cfg, GuardState.initial()._replace(skipped_nonfinite=jnp.int32(2)), lines.append, lambda: 40)  # 2 from before a resume
  report(50, 2, 0, 17)
  assert lines == []
  report(60, 3, 1, 55)
  assert lines == [
      "step     60  skipped 1 update(s) with a non-finite loss or gradient (latest at step 55; 3 in the run)",
      "step     60  skipped 1 update(s) at a loss spike (train.spike_sigma=3; 1 in the run)",
  ]
  stop = SkipReport(dataclasses.replace(cfg, nonfinite="stop"), GuardState.initial(), lines.append, lambda: 40)
  stop(60, 0, 1, -1)  # spikes never stop a run
  with pytest.raises(TrainingError, match=r"^step 57: non-finite loss or gradient \(train.nonfinite='stop'\).*resumes from the checkpoint of step 40$"):
    stop(70, 1, 1, 57)


@pytest.mark.slow  # a whole `jaxlm train` run (~20 s on 2 cores); the message itself: test_skip_report_counts_new_skips_and_stop_names_the_step
def test_stop_names_the_step_and_checkpoints_nothing_after_it(tmp_path, monkeypatch, capsys):
  """`jaxlm train` with train.nonfinite=stop: one line naming the step, exit code 1."""
  calls = {"n": 0}
  to_global = loop.to_global

  def poison_third_batch(batch, sharding):
    calls["n"] += 1
    if calls["n"] == 3:  # the batch of step 3
      batch = {**batch, "inputs": np.where(np.arange(batch["inputs"].shape[1]) == 0, 10**6, batch["inputs"]).astype(np.int32)}
    return to_global(batch, sharding)

  monkeypatch.setattr(loop, "to_global", poison_third_batch)
  sets = ["train.nonfinite=stop", "train.steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0", "train.sample_tokens=0"]
  code = cli.main(["train", "quickstart:smoke", "--run-dir", str(tmp_path), *[a for s in sets for a in ("--set", s)]])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1
  assert err[-1].startswith("jaxlm: error: step 3: non-finite loss or gradient (train.nonfinite='stop')"), err
  assert "checkpoint of step 2" in err[-1]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


@pytest.mark.slow  # a whole `jaxlm train` run (~10 s on 2 cores)
def test_a_nonfinite_state_is_never_checkpointed(tmp_path, monkeypatch):
  """Skip mode with a NaN already in the parameters: every update is skipped, and the first
  checkpoint is refused rather than written."""
  prepare = loop.prepare

  def poisoned(*args, **kw):
    setup = prepare(*args, **kw)
    leaves, tree = jax.tree.flatten(setup.state.params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    setup.state = setup.state.replace(params=jax.tree.unflatten(tree, leaves))
    return setup

  monkeypatch.setattr(loop, "prepare", poisoned)
  exp = experiments.load("quickstart:smoke")
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=2, checkpoint_every=2, eval_every=0, log_every=1, sample_tokens=0))
  with pytest.raises(TrainingError, match=r"^step 2: the train state holds NaN or Inf values; not checkpointed"):
    loop.train(exp, tmp_path)
  assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["skipped_nonfinite"] for r in records if "loss" in r] == [1, 2]
