"""Tuning only the FFN's keys or values (Qiu et al. 2024, arXiv 2402.12233): the `ffn-keys` /
`ffn-values` targets select exactly every FFN's first (w_gate, w_up) or second (w_down)
matrices, for LoRA and for `peft.method="subset"`, which trains those base weights in full; a
train step changes them and leaves every other weight bitwise equal."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import peft
from jaxlm.cli import main
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, MoEConfig, OptimConfig, PeftConfig, TrainConfig
from jaxlm.errors import ConfigError
from jaxlm.layers.attention import Attention
from jaxlm.models import Transformer
from jaxlm.peft import targets as tg
from jaxlm.train import optimizer
from jaxlm.train.step import TrainState, guarded_optimizer, make_train_step, split_model

# Layer 0 dense, layers 1 and 2 sparse MoE with a gated shared expert.
MIXED = ModelConfig(
    vocab_size=384, d_model=16, n_layers=3, n_heads=2, n_kv_heads=2, d_ff=32, dtype="float32", ffn="moe", first_k_dense=1,
    moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, shared_gate=True),
)  # fmt: skip
KEYS = {f"blocks/0/ffn/{w}" for w in ("w_gate", "w_up")} | {f"blocks/{i}/ffn/{m}/{w}" for i in (1, 2) for m in ("experts", "shared") for w in ("w_gate", "w_up")}
VALUES = {"blocks/0/ffn/w_down"} | {f"blocks/{i}/ffn/{m}/w_down" for i in (1, 2) for m in ("experts", "shared")}


def abstract(cfg: ModelConfig) -> nnx.Module:
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def trained_paths(model: nnx.Module, pcfg: PeftConfig) -> set[str]:
  _, params, _, _ = split_model(model, peft.trainable(pcfg))
  return {"/".join(map(str, p)) for p, _ in params.flat_state()}


def test_aliases_select_exactly_the_keys_and_the_values():
  """Dense MLP, routed experts and shared experts alike; never attention, routers, the shared
  expert's gate or the head."""
  model = abstract(MIXED)
  assert {w[0] for w in tg.select(model, ("ffn-keys",))} == KEYS
  assert {w[0] for w in tg.select(model, ("ffn-values",))} == VALUES
  assert {w[0] for w in tg.select(model, ("ffn-keys", "ffn-values"))} == KEYS | VALUES
  scanned = abstract(dataclasses.replace(MIXED, n_layers=3, scan_layers=True))  # [layers, ...] under units/
  assert {w[0] for w in tg.select(scanned, ("ffn-values",))} == {"prefix/0/ffn/w_down", "units/blocks/0/ffn/experts/w_down", "units/blocks/0/ffn/shared/w_down"}


def test_subset_trains_exactly_the_selected_base_weights():
  model = abstract(MIXED)
  for alias, want in (("ffn-keys", KEYS), ("ffn-values", VALUES)):
    pcfg = PeftConfig(method="subset", targets=(alias,))
    assert trained_paths(peft.apply(model, pcfg), pcfg) == want
  pcfg = PeftConfig(method="subset", targets=("ffn-keys",), train_also=(".*final_norm.*",))
  assert trained_paths(model, pcfg) == KEYS | {"final_norm/scale"}


def test_lora_adapts_exactly_the_values():
  pcfg = PeftConfig(method="lora", rank=2, targets=("ffn-values",))
  model = peft.apply(abstract(MIXED), pcfg)
  assert {"/".join(map(str, p)) for p, _ in peft.adapted_modules(model)} == VALUES
  assert trained_paths(model, pcfg) == {f"{v}/{ab}" for v in VALUES for ab in ("a", "b")}


def test_a_key_tuning_step_changes_the_keys_and_nothing_else():
  cfg = dataclasses.replace(MIXED, ffn="dense", first_k_dense=0, n_layers=1)
  pcfg = PeftConfig(method="subset", targets=("ffn-keys",))
  exp = Experiment(name="kv", mesh=MeshConfig(data=1, fsdp=1), model=cfg, peft=pcfg, data=DataConfig(seq_len=8, batch_size=2), optim=OptimConfig(lr=1e-2, warmup_steps=0), train=TrainConfig(steps=2))
  model = abstract(cfg)
  rng = np.random.default_rng(0)
  for _, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Variable):
      v.set_value(jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype))
  graphdef, params, frozen, rest = split_model(peft.apply(model, pcfg), peft.trainable(pcfg))
  assert {"/".join(map(str, p)) for p, _ in params.flat_state()} == {"blocks/0/ffn/w_gate", "blocks/0/ffn/w_up"}
  tx, lr = optimizer.make(exp.optim, exp.train.steps)
  opt_state = guarded_optimizer(tx, exp).init(params)
  assert sum(x.size for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0) == 2 * sum(x.size for x in jax.tree.leaves(params))  # moments for the keys only
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, rest=rest, opt_state=opt_state)
  toks = jnp.asarray(rng.integers(3, 384, (2, 9)), jnp.int32)
  ones = jnp.ones((2, 8), jnp.int32)
  b = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": ones, "positions": jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8)), "loss_mask": ones}
  was = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)  # a tiny model: XLA's optimisations only cost compile time
  try:
    new, metrics = jax.jit(make_train_step(graphdef, tx, lr, exp))(state, b)
  finally:
    jax.config.update("jax_disable_most_optimizations", was)
  assert np.isfinite(float(metrics["loss"]))
  for x0, x1 in zip(jax.tree.leaves(params), jax.tree.leaves(new.params)):
    assert np.all(np.asarray(x0) != np.asarray(x1))  # every entry of w_gate and w_up moved
  for x0, x1 in zip(jax.tree.leaves((frozen, rest)), jax.tree.leaves((new.frozen, new.rest))):
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(x1))  # values, attention, norms, embeddings: bitwise


# -- bad input -------------------------------------------------------------------------------------


def test_an_alias_on_a_model_without_ffn_matrices_is_a_config_error():
  attn = nnx.eval_shape(lambda: Attention(MIXED, rngs=nnx.Rngs(0)))
  with pytest.raises(ConfigError, match=r"'ffn-keys' \(= .*: the model has no such FFN matrices\) matches no linear weight") as e:
    tg.select(attn, ("ffn-keys",))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["peft.method=subset"], "peft.method='subset' trains the base weights peft.targets names: set peft.targets"),
        (["peft.method=subset", "peft.targets=('ffn-key',)"], "peft.targets: 'ffn-key' matches no linear weight"),
        (["peft.method=lora", "peft.targets=('.*nosuch.*',)"], "matches no linear weight"),
    ],
)
def test_bad_subset_input_is_one_line_exit_2(sets, message, tmp_path, capsys):
  run_dir = tmp_path / "run"
  argv = ["train", "quickstart:smoke", "--run-dir", str(run_dir)] + [x for s in sets for x in ("--set", s)]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and message in err, err
  assert "\n" not in err and "Traceback" not in err
  assert not Path(run_dir).exists()
