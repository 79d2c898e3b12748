"""EMoE (Qiu et al. 2023, arXiv 2310.10908): the experts partition each dense FFN (every hidden
unit in exactly one expert, equal sizes, its w_gate / w_up columns and w_down row moved
together), so activating every expert with weight 1 is the dense model; the router is each
cluster's mean key; balanced k-means finds planted clusters; the hard top-k router selects
without weighting; the EMoE model is causal; `jaxlm convert emoe` writes the split run and
refuses bad input with one line, exit 2, nothing written."""

import dataclasses
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.cli import main
from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.layers.moe.routing import ROUTERS, avg_keys
from jaxlm.models import Transformer
from jaxlm.models.build import abstract_model, layer_trees
from jaxlm.models.emoe import _balanced_assign, balanced_kmeans, emoe, emoe_state, function_preserved

DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32")
E = 4
TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
logits_of = nnx.jit(lambda model, tokens: model(tokens)[0])


def emoe_cfg(top_k: int, *, router_from_keys: bool = False, **model_kw) -> ModelConfig:
  moe = MoEConfig(n_experts=E, top_k=top_k, d_ff_expert=DENSE.d_ff // E, router="hard_topk", router_from_keys=router_from_keys, load_balance_weight=0.0, router_z_weight=0.0)
  return dataclasses.replace(DENSE, ffn="moe", moe=moe, **model_kw)


# every expert active, a stored router, layer 0 left dense / top-2 of 4 routed by the current keys
FULL = emoe_cfg(E, first_k_dense=1)
SPARSE = emoe_cfg(2, router_from_keys=True)


def pure(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def with_weights(cfg: ModelConfig, pure_state) -> Transformer:
  """A model of `cfg` holding `pure_state` (or, given a seed, random weights of std 0.2 so that
  the logits are O(1) and the comparisons below mean something), built without compiling."""
  graphdef, state = nnx.split(abstract_model(cfg))
  if isinstance(pure_state, int):
    rng = np.random.default_rng(pure_state)
    pure_state = jax.tree.map(lambda s: np.ones(s.shape, s.dtype) if len(s.shape) == 1 else rng.normal(0, 0.2, s.shape).astype(s.dtype), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure_state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def dense():
  return with_weights(DENSE, 0)


@pytest.fixture(scope="module")
def models(dense):
  """EMoE of `dense` by `emoe_state` (every parameter of these configs comes from the dense
  model, so an abstract target suffices; `emoe()` itself, which builds one, is run in the slow test)."""
  split = lambda cfg: with_weights(cfg, emoe_state(pure(dense), DENSE, nnx.to_pure_dict(nnx.state(abstract_model(cfg))), cfg))
  return {"full": split(FULL), "sparse": split(SPARSE)}


def units_of(expert_w_gate_edf: np.ndarray, dense_w_gate_df: np.ndarray) -> np.ndarray:
  """[E, F/E]: the dense hidden unit of each expert column, found by its (unique) key."""
  keys = {col.tobytes(): f for f, col in enumerate(dense_w_gate_df.T)}
  return np.array([[keys[expert_w_gate_edf[e][:, j].tobytes()] for j in range(expert_w_gate_edf.shape[2])] for e in range(expert_w_gate_edf.shape[0])])


@pytest.mark.parametrize("which", ["full", "sparse"])
def test_the_experts_partition_the_dense_ffn(dense, models, which):
  cfg = FULL if which == "full" else SPARSE
  src, dst = layer_trees(pure(dense), DENSE), layer_trees(pure(models[which]), cfg)
  for i, (s, d) in enumerate(zip(src, dst)):
    np.testing.assert_array_equal(d["attn"]["w_q"], s["attn"]["w_q"])
    if cfg.layer_ffn(i) == "dense":
      for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_array_equal(d["ffn"][name], s["ffn"][name])
      continue
    x = d["ffn"]["experts"]
    units = units_of(x["w_gate"], s["ffn"]["w_gate"])
    assert units.shape == (E, DENSE.d_ff // E)  # equal sizes ...
    np.testing.assert_array_equal(np.sort(units.ravel()), np.arange(DENSE.d_ff))  # ... each unit in exactly one expert
    assert not np.array_equal(units.ravel(), np.arange(DENSE.d_ff))  # clustered, not the index order
    for e in range(E):  # the unit's w_up column and w_down row travel with its key
      np.testing.assert_array_equal(x["w_up"][e], s["ffn"]["w_up"][:, units[e]])
      np.testing.assert_array_equal(x["w_down"][e], s["ffn"]["w_down"][units[e]])


def test_every_expert_active_with_weight_1_is_the_dense_model(dense, models):
  assert function_preserved(FULL) and not function_preserved(SPARSE)
  np.testing.assert_allclose(logits_of(models["full"], TOKENS), logits_of(dense, TOKENS), rtol=1e-5, atol=1e-5)
  # top-2 of 4 drops half of each FFN: the function changes
  assert not np.allclose(logits_of(models["sparse"], TOKENS), logits_of(dense, TOKENS), atol=1e-3)


def test_the_router_is_the_mean_key_of_each_cluster(dense, models):
  s = layer_trees(pure(dense), DENSE)[1]["ffn"]
  d = layer_trees(pure(models["full"]), FULL)[1]["ffn"]
  units = units_of(d["experts"]["w_gate"], s["w_gate"])
  mean_keys_de = np.stack([s["w_gate"][:, units[e]].mean(axis=1) for e in range(E)], axis=1)
  np.testing.assert_allclose(d["router"], mean_keys_de, rtol=1e-6, atol=1e-7)
  # router_from_keys: no router parameter; avg_keys of the experts is the same matrix
  sp = layer_trees(pure(models["sparse"]), SPARSE)[1]["ffn"]
  assert "router" not in sp
  units = units_of(sp["experts"]["w_gate"], s["w_gate"])
  mean_keys_de = np.stack([s["w_gate"][:, units[e]].mean(axis=1) for e in range(E)], axis=1)
  np.testing.assert_allclose(avg_keys(jnp.asarray(sp["experts"]["w_gate"])), mean_keys_de, rtol=1e-6, atol=1e-7)


def test_emoe_is_causal(models):
  later = TOKENS.at[:, 8:].set((TOKENS[:, 8:] + 7) % 64)
  a, b = logits_of(models["sparse"], TOKENS), logits_of(models["sparse"], later)
  np.testing.assert_array_equal(a[:, :8], b[:, :8])
  assert not np.allclose(a[:, 8:], b[:, 8:])


def test_hard_topk_selects_the_top_k_logits_with_weight_1():
  logits = jax.random.normal(jax.random.key(1), (2, 5, 6))
  mask = jnp.ones((2, 5), bool).at[1, 4].set(False)
  cfg = MoEConfig(n_experts=6, top_k=3, router="hard_topk")  # renormalize (default) does not apply
  route = jax.jit(lambda x, m: (lambda r: (r.expert_n, r.weight_n))(ROUTERS.get("hard_topk")(x, cfg, mask_bl=m)))
  expert_n, weight_n = route(logits, mask)
  expert_tk = np.asarray(expert_n).reshape(10, 3)
  want = np.argsort(-np.asarray(logits).reshape(10, 6), axis=1)[:, :3]
  np.testing.assert_array_equal(expert_tk[:9], want[:9])
  assert (expert_tk[9] == 6).all()  # padding: the sentinel expert
  np.testing.assert_array_equal(np.asarray(weight_n), np.ones(30, np.float32))


def test_balanced_kmeans_finds_planted_equal_clusters():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 8)) * 10
  truth = rng.permutation(np.repeat(np.arange(4), 16))
  x = centers[truth] + rng.normal(size=(64, 8))
  labels = balanced_kmeans(x, 4, seed=3)
  assert np.bincount(labels).tolist() == [16] * 4
  assert len({(t, l) for t, l in zip(truth, labels)}) == 4  # the same partition, up to names
  np.testing.assert_array_equal(balanced_kmeans(x, 4, seed=3), labels)  # deterministic
  # every point prefers cluster 0, which holds 2: the two closest to it get it
  dist = np.array([[3.0, 4.0], [0.0, 5.0], [2.0, 9.0], [1.0, 3.0]])
  np.testing.assert_array_equal(_balanced_assign(dist, 2), [1, 0, 1, 0])


def _snapshot(path: Path) -> dict[str, str]:
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


def test_convert_emoe_refuses_bad_input(tmp_path, capsys):
  """One line, exit 2, nothing written. The checks read the runs' configs only, before any
  weights are loaded, so configs stand in for the runs here."""
  from jaxlm import experiments
  from jaxlm.train.run import save_config

  dense_run, moe_run = tmp_path / "dense", tmp_path / "moe"
  for run, name in ((dense_run, "quickstart:smoke"), (moe_run, "emoe_quickstart:smoke")):
    run.mkdir()
    save_config(run, experiments.load(name))
  argv = lambda src, exp, out=tmp_path / "new": ["convert", "emoe", str(src), exp, "--run-dir", str(out)]
  cases = [
      (argv(dense_run, "emoe_quickstart:smoke") + ["--set", "model.moe.n_experts=3", "--set", "model.moe.d_ff_expert=42"], "emoe: the dense d_ff (128) is not divisible by model.moe.n_experts (3)"),
      (argv(dense_run, "emoe_quickstart:smoke") + ["--set", "model.moe.d_ff_expert=64"], "emoe: model.moe.d_ff_expert (64) must be the dense d_ff / n_experts = 32"),
      (argv(dense_run, "emoe_quickstart:smoke") + ["--set", "model.moe.d_ff_expert=0"], "emoe: model.moe.d_ff_expert (0) must be the dense d_ff / n_experts = 32"),
      (argv(dense_run, "emoe_quickstart:smoke") + ["--set", "model.moe.n_shared_experts=1"], "emoe: model.moe.n_shared_experts must be 0"),
      (argv(dense_run, "emoe_quickstart:smoke") + ["--set", "model.d_model=32"], "emoe: model.d_model is 32 but the dense model has 64"),
      (argv(moe_run, "emoe_quickstart:smoke"), "emoe: the source model must be dense in every layer"),
      (argv(dense_run, "quickstart:smoke"), "emoe: the target model has no MoE layer"),
      (argv(tmp_path / "nosuch", "emoe_quickstart:smoke"), "is not a jaxlm run directory"),
      (argv(dense_run, "emoe_quickstart:smoke", moe_run), "already holds a run"),
      (argv(dense_run, "emoe_quickstart:smoke") + ["--set", "model.moe.router=hardtop"], "model.moe.router must be one of"),
  ]
  before = _snapshot(tmp_path)
  for args, message in cases:
    assert main(args) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlm: error: ") and message in err and "\n" not in err and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_convert_emoe_cli_round_trip(tmp_path, capsys):
  """quickstart:smoke trained 2 steps -> `jaxlm convert emoe` -> the run's experts are the dense
  FFNs split as `emoe()` splits them; with every expert active its step-0 eval is the dense
  run's last one; training goes on."""
  import json

  from jaxlm.train.run import load_for_inference

  dense_dir, moe_dir = tmp_path / "dense", tmp_path / "emoe"
  small = ["--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.sample_tokens=0", "--set", "train.checkpoint_every=2"]
  assert main(["train", "quickstart:smoke", "--run-dir", str(dense_dir)] + small) == 0
  full = ["--set", "model.moe.top_k=4"]
  assert main(["convert", "emoe", str(dense_dir), "emoe_quickstart:smoke", "--run-dir", str(moe_dir)] + full) == 0
  assert "computes the dense model's function" in capsys.readouterr().out
  _, dense, _, _ = load_for_inference(dense_dir)
  exp, model, _, step = load_for_inference(moe_dir)
  assert step == 0 and exp.model.moe.router == "hard_topk" and exp.model.moe.router_from_keys
  jax.tree.map(np.testing.assert_array_equal, pure(model), pure(emoe(dense, exp.model)))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 259)
  np.testing.assert_allclose(logits_of(model, tokens), logits_of(dense, tokens), rtol=1e-4, atol=1e-4)
  assert main(["train", "emoe_quickstart:smoke", "--run-dir", str(moe_dir)] + full + small) == 0
  evals = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
  assert evals(moe_dir)[0]["step"] == 0 and evals(moe_dir)[-1]["step"] == 2
  np.testing.assert_allclose(evals(moe_dir)[0]["eval_loss"], evals(dense_dir)[-1]["eval_loss"], rtol=1e-4)
