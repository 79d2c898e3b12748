"""The dense warm-up: dense while the flag is set, then expert 0 (weights and AdamW moments) is
copied into every expert by a trainer hook compiled once, and the experts drift apart."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxlm import experiments
from jaxlm.config import MeshConfig
from jaxlm.train import loop


def batch(seed, b=8, l=64, vocab=384):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, vocab, (b, l + 1)).astype(np.int32)
  ones = np.ones((b, l), np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": ones, "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(), "loss_mask": ones}


def experts_of(tree):
  """{path: [E, ...] array} of every soft-MoE expert weight in a params-shaped tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat if any(getattr(k, "key", None) in ("w_gate", "w_up", "w_down") for k in p) and np.ndim(v) >= 3}


@pytest.mark.parametrize("scan", [True])  # stacked (scanned) layers: the harder path
def test_warmup_copies_expert_zero_with_its_optimizer_state(scan):
  exp = experiments.load("lory_quickstart:smoke")
  exp = dataclasses.replace(exp, mesh=MeshConfig(fsdp=2, tensor=2, data=2), model=dataclasses.replace(exp.model, scan_layers=scan))
  setup = loop.prepare(exp)
  state = setup.state
  hooks = loop.state_hooks(setup, state)
  assert list(hooks) == [2]  # round(0.34 * 6 steps)
  with jax.set_mesh(setup.mesh):
    for i in range(2):
      state, _ = setup.train_step(state, loop.to_global(batch(i), setup.batch_sharding))
    before = experts_of(state.params)
    assert len(before) == 3 * (1 if scan else exp.model.n_layers)
    for w in before.values():  # only expert 0 trained (the others only decayed)
      e_axis = w.ndim - 3
      assert not np.allclose(np.take(w, 0, e_axis), np.take(w, 1, e_axis))
    state = hooks[2](state)
    mu = state.opt_state
    for name, w in experts_of(state.params).items():
      e_axis = w.ndim - 3
      for e in range(1, w.shape[e_axis]):
        np.testing.assert_array_equal(np.take(w, e, e_axis), np.take(before[name], 0, e_axis))
    moments = [np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(mu)[0] if "w_gate" in jax.tree_util.keystr(p)]
    assert moments and all(np.array_equal(np.take(m, 1, m.ndim - 3), np.take(m, 0, m.ndim - 3)) for m in moments)
    flags = [np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.rest)[0] if "dense" in jax.tree_util.keystr(p)]
    assert flags and not any(f.any() for f in flags)
    state, metrics = setup.train_step(state, loop.to_global(batch(3), setup.batch_sharding))
  assert np.isfinite(float(metrics["loss"]))
  w = next(iter(experts_of(state.params).values()))
  assert not np.allclose(np.take(w, 0, w.ndim - 3), np.take(w, 1, w.ndim - 3))  # routing breaks the symmetry
