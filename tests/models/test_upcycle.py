"""Sparse upcycling: at step 0 the MoE model computes the dense model's function (when the
combine weights sum to 1), from Python and from `jaxlm convert upcycle`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.cli import main
from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.errors import ConfigError
from jaxlm.models import Transformer
from jaxlm.models.upcycle import function_preserved, upcycle

DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, dtype="float32")
TOKENS = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
logits_of = nnx.jit(lambda model, tokens: model(tokens)[0])


def moe_cfg(**kw) -> ModelConfig:
  model_kw = {k: kw.pop(k) for k in ("first_k_dense", "ffn_every", "scan_layers") if k in kw}
  return dataclasses.replace(DENSE, ffn="moe", moe=MoEConfig(**{"n_experts": 4, "top_k": 2, **kw}), **model_kw)


@pytest.mark.parametrize(
    "cfg",
    [
        moe_cfg(),
        moe_cfg(router="sigmoid_bias", n_shared_experts=1, first_k_dense=1, ffn_every=3, scan_layers=True),
        moe_cfg(top_k=1, jitter=0.1),
        moe_cfg(ffn_every=2, scan_layers=True),  # 2 scanned units: MoE layers 0 and 2
    ],
    ids=["softmax-top2", "sigmoid-shared-scanned", "top1-jitter", "every2-scanned"],
)
def test_upcycled_model_computes_the_dense_function(cfg):
  dense = Transformer(DENSE, rngs=nnx.Rngs(0))
  model = upcycle(dense, cfg, seed=1)
  assert function_preserved(cfg)
  np.testing.assert_allclose(logits_of(model, TOKENS), logits_of(dense, TOKENS), rtol=1e-5, atol=1e-5)
  # every expert is a copy of its own layer's MLP; the router is fresh
  moe_layers = [i for i in range(cfg.n_layers) if cfg.layer_ffn(i) == "moe"]
  assert moe_layers
  for i in moe_layers:
    if cfg.scan_layers:  # layer i = first_k_dense + u * ffn_every + j is row u of units.blocks[j]
      u, j = divmod(i - cfg.first_k_dense, cfg.ffn_every)
      ffn, row = model.units.blocks[j].ffn, lambda a, u=u: np.asarray(a)[u]
    else:
      ffn, row = model.blocks[i].ffn, np.asarray
    for name in ("w_gate", "w_up", "w_down"):
      w = row(getattr(ffn.experts, name)[...])
      assert w.shape[0] == cfg.moe.n_experts
      for e in range(cfg.moe.n_experts):
        np.testing.assert_array_equal(w[e], np.asarray(getattr(dense.blocks[i].ffn, name)[...]), err_msg=f"layer {i} expert {e} {name}")
    assert float(jnp.std(row(ffn.router[...]))) > 0


def test_weights_that_do_not_sum_to_one_change_the_function():
  cfg = moe_cfg(renormalize=False)
  dense = Transformer(DENSE, rngs=nnx.Rngs(0))
  model = upcycle(dense, cfg)
  assert not function_preserved(cfg)
  assert not np.allclose(logits_of(model, TOKENS), logits_of(dense, TOKENS), atol=1e-4)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (moe_cfg(d_ff_expert=24), "model.moe.d_ff_expert (24) must equal the dense model's d_ff (48)"),
        (dataclasses.replace(moe_cfg(), d_model=64, n_heads=4), "upcycle: model.d_model is 64 but the dense model has 32"),
        (DENSE, "the target model has no MoE layer"),
    ],
)
def test_incompatible_configs_are_config_errors(cfg, message):
  with pytest.raises(ConfigError) as e:
    upcycle(Transformer(DENSE, rngs=nnx.Rngs(0)), cfg)
  assert message in str(e.value)


@pytest.mark.slow
def test_convert_upcycle_cli_writes_a_run_that_trains_on(tmp_path, capsys):
  """dense run -> `jaxlm convert upcycle` -> the MoE run's step-0 eval equals the dense one's."""
  import json

  from jaxlm.train.run import load_for_inference

  dense_dir, moe_dir = tmp_path / "dense", tmp_path / "moe"
  small = ["--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.sample_tokens=0", "--set", "train.checkpoint_every=2"]
  assert main(["train", "quickstart:smoke", "--run-dir", str(dense_dir)] + small) == 0
  assert main(["convert", "upcycle", str(dense_dir), "moe_quickstart:smoke", "--run-dir", str(moe_dir), "--set", "model.moe.d_ff_expert=128"]) == 0
  assert "computes the dense model's function" in capsys.readouterr().out
  _, dense, _, _ = load_for_inference(dense_dir)
  _, moe, _, step = load_for_inference(moe_dir)
  assert step == 0
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 259)
  np.testing.assert_allclose(logits_of(moe, tokens), logits_of(dense, tokens), rtol=1e-4, atol=1e-4)
  # training continues from the upcycled checkpoint: its step-0 evaluation is the dense model's final one
  assert main(["train", "moe_quickstart:smoke", "--run-dir", str(moe_dir), "--set", "model.moe.d_ff_expert=128"] + small) == 0
  dense_eval = [json.loads(l) for l in (dense_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l][-1]
  moe_eval = [json.loads(l) for l in (moe_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l][0]
  assert moe_eval["step"] == 0
  np.testing.assert_allclose(moe_eval["eval_loss"], dense_eval["eval_loss"], rtol=1e-4)
  # and the run directory refuses a second conversion
  assert main(["convert", "upcycle", str(dense_dir), "moe_quickstart:smoke", "--run-dir", str(moe_dir)]) == 2
