"""Training with PEFT: only adapters get gradients and optimizer state, the base stays bitwise
unchanged, an adapter run starts from `init_from` and checkpoints its adapters alone, and
examples of one batch may train different adapters."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import experiments, peft
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, MoEConfig, OptimConfig, PeftConfig, TrainConfig
from jaxlm.errors import ConfigError
from jaxlm.train import loop
from jaxlm.train.loop import train
from jaxlm.train.run import load_for_inference

EXP = Experiment(
    name="peft_step_test",
    mesh=MeshConfig(data=2, fsdp=2, expert=2),
    model=ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32", ffn="moe", moe=MoEConfig(n_experts=4, top_k=2)),
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


def test_examples_of_one_batch_train_their_own_adapter(tmp_path):
  """A bank of two trainable adapters; `adapter_ids` in the batch: adapter 1 gets no gradient
  from examples that chose adapter 0."""
  from jaxlm.train.step import make_train_step, split_model

  cfg = dataclasses.replace(EXP.model, ffn="dense")
  base = lambda: nnx.Rngs(0)
  dirs = {}
  from jaxlm.models import Transformer

  for i in range(2):
    pcfg = PeftConfig(method="lora", rank=2, targets=(r".*attn/w_q",))
    m = peft.apply(Transformer(cfg, rngs=base()), pcfg)
    dirs[f"t{i}"] = peft.save_adapter(m, tmp_path / f"t{i}", pcfg, model_cfg=cfg)
  model = peft.load_adapters(Transformer(cfg, rngs=base()), dirs)
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


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  exp = experiments.load("quickstart:smoke")
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=2, eval_every=0, checkpoint_every=0, sample_tokens=0))
  run_dir = tmp_path_factory.mktemp("base") / "run"
  train(exp, run_dir)
  return exp, run_dir


@pytest.fixture(scope="module")
def lora_run(base_run, tmp_path_factory):
  base_exp, base_dir = base_run
  exp = dataclasses.replace(
      base_exp,
      name="lora_run",
      init_from=str(base_dir),
      peft=PeftConfig(method="lora", rank=4),
      train=dataclasses.replace(base_exp.train, steps=2, eval_every=2, checkpoint_every=2),
  )
  run_dir = tmp_path_factory.mktemp("lora") / "run"
  return exp, run_dir, train(exp, run_dir)


def test_adapter_run_starts_from_init_from_and_checkpoints_adapters_only(base_run, lora_run):
  base_exp, base_dir = base_run
  exp, run_dir, summary = lora_run
  evals = [r for r in map(json.loads, (base_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
  assert summary["initial_eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)  # zero-init LoRA == the base
  assert summary["final_eval_loss"] < summary["initial_eval_loss"]
  assert json.loads((run_dir / "init_from.json").read_text()) == {"path": str(base_dir), "step": 2}
  # The checkpoint holds the adapters (and no base weight): a few KB, not the model.
  params_dir = run_dir / "checkpoints" / "2" / "params"
  size = sum(f.stat().st_size for f in params_dir.rglob("*") if f.is_file())
  base_size = sum(f.stat().st_size for f in (base_dir / "checkpoints" / "2" / "params").rglob("*") if f.is_file())
  assert size < 0.5 * base_size
  # Loading the run rebuilds the base from init_from and restores the adapters on top.
  _, model, _, step = load_for_inference(run_dir)
  _, base_model, _, _ = load_for_inference(base_dir)
  assert step == 2 and peft.adapted_modules(model)
  base_w = {peft.targets.path_str(p): np.asarray(m.base[...]) for p, m in peft.adapted_modules(model)}
  for name, w in base_w.items():
    np.testing.assert_array_equal(w, np.asarray(peft.targets.get_node(base_model, tuple(int(x) if x.isdigit() else x for x in name.split("/")))[...]))
  assert any(np.abs(np.asarray(m.b[...])).max() > 0 for _, m in peft.adapted_modules(model))


def test_missing_init_from_names_the_command_that_makes_it(tmp_path):
  exp = experiments.load("quickstart:smoke")
  exp = dataclasses.replace(exp, init_from=str(tmp_path / "runs" / "quickstart"))
  with pytest.raises(ConfigError, match="no jaxlm run there; make it with `jaxlm train quickstart`"):
    train(exp, tmp_path / "x")
  assert not (tmp_path / "x").exists()


def test_jaxlm_merge_writes_the_merged_model_as_a_run(base_run, lora_run, tmp_path, capsys):
  """`jaxlm merge ADAPTER_RUN --out` = the adapted model as a plain run; several runs: TIES."""
  from jaxlm.cli import main

  _, base_dir = base_run
  _, run_dir, _ = lora_run
  out = tmp_path / "merged"
  assert main(["merge", str(run_dir), "--out", str(out)]) == 0
  exp, model, _, step = load_for_inference(out)
  _, adapted, _, _ = load_for_inference(run_dir)
  assert step == 0 and exp.peft.method == "none" and not peft.adapted_modules(model)
  tokens = jnp.asarray(batch(0)["inputs"][:2, :16])
  np.testing.assert_allclose(model(tokens)[0], adapted(tokens)[0], rtol=1e-5, atol=1e-5)
  # TIES over the adapter run and the base itself (a zero task vector) onto their shared base.
  assert main(["merge", str(run_dir), str(run_dir), "--method", "ties", "--density", "1.0", "--out", str(tmp_path / "ties")]) == 0
  _, ties_model, _, _ = load_for_inference(tmp_path / "ties")
  np.testing.assert_allclose(ties_model(tokens)[0], adapted(tokens)[0], rtol=1e-5, atol=1e-5)  # disjoint mean of two equal task vectors = the vector
  assert main(["merge", str(run_dir), "--out", str(out)]) == 2  # never overwrites
  assert "already holds a run" in capsys.readouterr().err
