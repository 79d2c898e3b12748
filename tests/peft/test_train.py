"""Training with PEFT: only adapters get gradients and optimizer state, the base stays bitwise
unchanged, and examples of one batch may train different adapters. (A whole adapter run from
`init_from`, its adapter-only checkpoints and `jaxlm merge`: tests/test_cli.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import peft
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, MoEConfig, OptimConfig, PeftConfig, TrainConfig
from jaxlm.train import loop

EXP = Experiment(
    name="peft_step_test",
    mesh=MeshConfig(data=2, fsdp=2, expert=2),
    model=ModelConfig(vocab_size=384, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32", ffn="moe", moe=MoEConfig(n_experts=4, top_k=2)),
    data=DataConfig(seq_len=16, batch_size=8),
    optim=OptimConfig(lr=1e-2, warmup_steps=1),
    train=TrainConfig(steps=10),
    peft=PeftConfig(method="dora", rank=4),
)


def batch(seed, b=8, l=16, vocab=384):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, vocab, (b, l + 1)).astype(np.int32)
  ones = np.ones((b, l), np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": ones, "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(), "loss_mask": ones}


def test_only_adapters_train_and_the_base_stays_bitwise_equal():
  setup = loop.prepare(EXP)
  frozen0 = jax.device_get(setup.state.frozen)
  params0 = jax.device_get(setup.state.params)
  n_adapter = sum(x.size for x in jax.tree.leaves(params0))
  n_moments = sum(x.size for x in jax.tree.leaves(setup.state.opt_state) if getattr(x, "ndim", 0) > 0)
  assert n_moments == 2 * n_adapter  # AdamW moments for the adapters only
  assert n_adapter < 0.2 * sum(x.size for x in jax.tree.leaves(frozen0))
  state = setup.state
  with jax.set_mesh(setup.mesh):
    for i in range(2):
      state, metrics = setup.train_step(state, loop.to_global(batch(i), setup.batch_sharding))
  assert np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(jax.device_get(state.frozen)), jax.tree.leaves(frozen0)):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params0))]
  assert all(changed)  # A, B and the DoRA magnitudes of every adapted weight (experts included)


def test_examples_of_one_batch_train_their_own_adapter(tmp_path, model_of):
  """A bank of two trainable adapters; `adapter_ids` in the batch: adapter 1 gets no gradient
  from examples that chose adapter 0."""
  from jaxlm.train.step import make_train_step, split_model

  cfg = dataclasses.replace(EXP.model, ffn="dense")
  dirs = {}
  for i in range(2):
    pcfg = PeftConfig(method="lora", rank=2, targets=(r".*attn/w_q",))
    m = peft.apply(model_of(cfg), pcfg)
    dirs[f"t{i}"] = peft.save_adapter(m, tmp_path / f"t{i}", pcfg, model_cfg=cfg)
  model = peft.load_adapters(model_of(cfg), dirs)
  graphdef, params, frozen, rest = split_model(model, peft.trainable(PeftConfig(method="lora")))
  from jaxlm.train.step import _forward, token_losses

  def loss(params, ids):
    b = {k: jnp.asarray(v) for k, v in batch(0).items()} | {"adapter_ids": ids}
    logits, _, _ = _forward(graphdef, params, frozen, rest, b, train=True)
    return token_losses(logits, b["targets"], b["loss_mask"])[0]

  g = jax.grad(loss)(params, jnp.zeros((8,), jnp.int32))
  a_grads = [np.asarray(x) for x in jax.tree.leaves(g)]  # [N, D, R] (a) and [N, R, H, K] (b) per layer
  assert all(np.abs(x[1]).max() == 0 for x in a_grads)  # adapter 1: no example chose it
  assert any(np.abs(x[0]).max() > 0 for x in a_grads)
  g_mixed = jax.grad(loss)(params, jnp.asarray([0, 1] * 4, jnp.int32))
  assert all(np.abs(np.asarray(x)[1]).max() > 0 for x in jax.tree.leaves(g_mixed) if np.asarray(x).ndim == 4)
