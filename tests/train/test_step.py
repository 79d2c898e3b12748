"""The train step: sharded equals single-device, compiles once, accumulation is exact."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxlm.train import loop
from jaxlm.train.optimizer import decay_mask
from jaxlm.train.step import make_train_step, token_losses

EXP = Experiment(
    name="step_test",
    mesh=MeshConfig(data=2, fsdp=2, tensor=2),
    model=ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32"),
    data=DataConfig(seq_len=16, batch_size=8),
    optim=OptimConfig(lr=1e-2, warmup_steps=1),
    train=TrainConfig(steps=10),
)


def batch(seed, b=8, l=16, vocab=384):
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(1, 4, (b, l)), axis=1).astype(np.int32)
  pos = np.zeros_like(seg)
  for i in range(b):
    for j in range(1, l):
      pos[i, j] = pos[i, j - 1] + 1 if seg[i, j] == seg[i, j - 1] else 0
  toks = rng.integers(3, vocab, (b, l + 1)).astype(np.int32)
  mask = np.ones((b, l), np.int32)
  mask[:, -2:] = 0  # some positions without a target
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos, "loss_mask": mask}


def run(exp, n_steps, devices=None):
  setup = loop.prepare(exp, devices)
  state, losses = setup.state, []
  with jax.set_mesh(setup.mesh):
    for i in range(n_steps):
      state, metrics = setup.train_step(state, loop.to_global(batch(i), setup.batch_sharding))
      losses.append(float(metrics["loss"]))
  return state, losses


SINGLE = dataclasses.replace(EXP, mesh=MeshConfig(fsdp=1))


@pytest.fixture(scope="module")
def sharded_run():
  return run(EXP, 3)


@pytest.fixture(scope="module")
def single_run():
  return run(SINGLE, 3, devices=jax.devices()[:1])


def test_sharded_step_equals_single_device(sharded_run, single_run):
  (sharded_state, sharded_losses), (single_state, single_losses) = sharded_run, single_run
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded_state.params)}
  assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)  # really sharded
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(sharded_state.params), jax.tree.leaves(single_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_step_compiles_once():
  setup = loop.prepare(EXP)
  graphdef = setup.graphdef
  from jaxlm.train import optimizer

  tx, lr = optimizer.make(EXP.optim, EXP.train.steps)
  step = jax.jit(
      chex.assert_max_traces(make_train_step(graphdef, tx, lr, EXP), n=1),
      in_shardings=(setup.shardings, setup.batch_sharding),
      out_shardings=(setup.shardings, None),
      donate_argnums=0,
  )
  state = setup.state
  with jax.set_mesh(setup.mesh):
    for i in range(4):
      state, _ = step(state, loop.to_global(batch(i), setup.batch_sharding))
  assert int(state.step) == 4
  assert step._cache_size() == 1
  # The state comes back with exactly the shardings it went in with.
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(setup.shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    assert got.sharding.is_equivalent_to(want, got.ndim)


def test_gradient_accumulation_equals_full_batch(sharded_run):
  full_state, full_losses = sharded_run
  acc_state, acc_losses = run(dataclasses.replace(EXP, train=dataclasses.replace(EXP.train, grad_accum=2)), 3)
  np.testing.assert_allclose(full_losses, acc_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(acc_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_token_losses_by_hand():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  ce, z, n = token_losses(logits, jnp.array([[0, 2]]), jnp.array([[1, 0]]))
  np.testing.assert_allclose(ce, -np.log(0.5), rtol=1e-6)  # the masked token is not counted
  np.testing.assert_allclose(z, 0.0, atol=1e-6)  # normalised logits: logsumexp = 0
  assert float(n) == 1


def test_z_loss_weight_changes_gradients_only_when_set(single_run):
  s0, l0 = single_run
  exp_z = dataclasses.replace(SINGLE, train=dataclasses.replace(EXP.train, z_loss_weight=1e-1))
  s1, l1 = run(exp_z, 3, jax.devices()[:1])
  assert l0[0] == pytest.approx(l1[0], rel=1e-6)  # same reported cross-entropy before any update
  assert not np.allclose(jax.tree.leaves(s0.params)[0], jax.tree.leaves(s1.params)[0])


def test_no_weight_decay_on_norms():
  from jaxlm.models import abstract_model
  from jaxlm.train.step import split_model

  _, params, _, _ = split_model(abstract_model(dataclasses.replace(EXP.model, scan_layers=False)))
  mask = nnx.to_pure_dict(decay_mask(params))
  assert mask["blocks"][0]["attn_norm"]["scale"] is False
  assert mask["final_norm"]["scale"] is False
  assert mask["blocks"][0]["ffn"]["w_up"] is True
  assert mask["embed"]["w_vd"] is True
  # Scanned layers stack a leading axis on every variable: a stacked norm scale stays undecayed.
  _, params, _, _ = split_model(abstract_model(dataclasses.replace(EXP.model, scan_layers=True)))
  mask = nnx.to_pure_dict(decay_mask(params))
  assert mask["units"]["blocks"][0]["ffn_norm"]["scale"] is False
  assert mask["units"]["blocks"][0]["attn"]["w_q"] is True
