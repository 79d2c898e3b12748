"""Model growth (Du et al. 2024, arXiv 2405.15319): G_stack copies the source's layers in the
order (0..L-1, 0..L-1, ...), bitwise, scanned or not; G_zero and the width splits keep the
source's function; the grown model is causal; `jaxlm convert grow` and `init_from` + `grow`
write / start the grown run; bad input is one line, exit 2, nothing written."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.cli import main
from jaxlm.config import GROW_OPERATORS, GrowConfig, ModelConfig, MoEConfig
from jaxlm.errors import ConfigError
from jaxlm.models.build import abstract_model, layer_trees
from jaxlm.models.grow import OPERATORS, check_growth, grow_state, target_config

SRC = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, dtype="float32")
TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
logits_of = nnx.jit(lambda model, tokens: model(tokens)[0])


def pure(model) -> dict:
  """The model's variables as a pure dict of numpy arrays (slicing them compiles nothing)."""
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def random_tree(cfg: ModelConfig, seed: int, *, zeros: bool = False, scale: float = 0.1) -> dict:
  """Distinct random values (or zeros) in the shapes of a model of `cfg`, built on the host."""
  rng = np.random.default_rng(seed)
  shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype) if zeros else (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def model_of(cfg: ModelConfig, tree: dict):
  graphdef, state = nnx.split(abstract_model(cfg))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, tree))
  return nnx.merge(graphdef, state)


def stacked(src_tree: dict, src_cfg: ModelConfig, operator: str, factor: int, **cfg_changes) -> tuple[ModelConfig, dict]:
  cfg = dataclasses.replace(target_config(src_cfg, operator, factor), **cfg_changes)
  return cfg, pure_tree(grow_state(src_tree, src_cfg, random_tree(cfg, 0, zeros=True), cfg, GrowConfig(operator, factor)))


def pure_tree(tree):
  return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b, msg=""):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=msg), a, b)


@pytest.fixture(scope="module")
def source() -> dict:
  return random_tree(SRC, 0)


@pytest.fixture(scope="module")
def source_logits(source):
  return logits_of(model_of(SRC, source), TOKENS)


def test_registry_matches_the_config_names():
  assert set(OPERATORS.keys()) == set(GROW_OPERATORS) - {"none"}


def test_stack_repeats_the_whole_stack_bitwise_scanned_or_not():
  """Layer i of the grown model is source layer i mod L (order 0..L-1, 0..L-1, ...), every
  variable bitwise; scanned and unrolled grown models hold the same layers; embeddings and the
  final norm are the source's."""
  src = random_tree(SRC, 1)
  src_layers = layer_trees(src, SRC)
  grown = {}
  for factor, scan in ((2, False), (2, True), (3, True)):
    cfg, tree = stacked(src, SRC, "stack", factor, scan_layers=scan)
    assert cfg.n_layers == factor * SRC.n_layers
    layers = layer_trees(tree, cfg)
    for i, layer in enumerate(layers):
      assert_trees_equal(layer, src_layers[i % SRC.n_layers], f"x{factor} scan={scan} layer {i}")
    assert_trees_equal({k: tree[k] for k in ("embed", "final_norm")}, {k: src[k] for k in ("embed", "final_norm")})
    grown[factor, scan] = layers
  assert_trees_equal(grown[2, False], grown[2, True])


def test_moe_blocks_stack_like_dense_and_the_pattern_is_kept():
  """MoE layers (every 2nd layer, scanned units) stack as whole blocks; a dense prefix followed
  by MoE layers cannot be stacked (layer L would be a prefix copy where the pattern puts MoE)."""
  cfg = dataclasses.replace(SRC, n_layers=2, ffn="moe", ffn_every=2, moe=MoEConfig(n_experts=4, top_k=2, router="sigmoid_bias"), scan_layers=True)
  src = random_tree(cfg, 2)
  big, tree = stacked(src, cfg, "stack", 2)
  assert big.ffn_kinds == ("moe", "dense", "moe", "dense")
  src_layers = layer_trees(src, cfg)
  for i, layer in enumerate(layer_trees(tree, big)):
    assert_trees_equal(layer, src_layers[i % 2], f"layer {i}")
  prefixed = dataclasses.replace(cfg, first_k_dense=1, ffn_every=1, scan_layers=False)
  with pytest.raises(ConfigError, match="layer 2 of the grown model would be a copy of source layer 0 .* does not stack"):
    target_config(prefixed, "stack", 2)
  assert target_config(prefixed, "zero", 2).ffn_kinds == ("dense", "moe", "moe", "moe")  # new layers on top keep any pattern


def test_zero_new_layers_keep_the_function(source, source_logits):
  """G_zero: the source's layers at the bottom, new layers on top whose w_o and w_down are zero:
  the grown model's logits are the source's (each new block adds exactly 0)."""
  cfg = target_config(SRC, "zero", 2)
  fresh = random_tree(cfg, 7)
  tree = pure_tree(grow_state(source, SRC, fresh, cfg, GrowConfig("zero")))
  layers, fresh_layers = layer_trees(tree, cfg), layer_trees(fresh, cfg)
  assert_trees_equal(layers[:2], layer_trees(source, SRC))
  for layer, new in zip(layers[2:], fresh_layers[2:]):
    assert not np.any(layer["attn"]["w_o"]) and not np.any(layer["ffn"]["w_down"])
    np.testing.assert_array_equal(layer["attn"]["w_q"], new["attn"]["w_q"])  # the rest is the fresh init (gradients flow once w_o moves)
  np.testing.assert_allclose(logits_of(model_of(cfg, tree), TOKENS), source_logits, rtol=1e-6, atol=1e-6)
  # G_random: the same placement, the new layers left as initialised
  layers = layer_trees(pure_tree(grow_state(source, SRC, fresh, cfg, GrowConfig("random"))), cfg)
  assert_trees_equal(layers, layer_trees(source, SRC) + fresh_layers[2:])


@pytest.mark.parametrize("operator", ["split_ffn", "split_model"])
def test_width_splits_keep_the_function(source, source_logits, operator):
  """G_direct in width: hidden units (split_ffn) or residual features (split_model) copied,
  the weights that read them split into shares summing to 1: the same logits."""
  cfg = target_config(SRC, operator, 2)
  tree = pure_tree(grow_state(source, SRC, random_tree(cfg, 8), cfg, GrowConfig(operator, 2)))
  np.testing.assert_allclose(logits_of(model_of(cfg, tree), TOKENS), source_logits, rtol=2e-5, atol=2e-5)
  s, m = source["blocks"][0], tree["blocks"][0]
  if operator == "split_ffn":
    f = SRC.d_ff
    np.testing.assert_array_equal(m["ffn"]["w_gate"][:, f:], s["ffn"]["w_gate"])  # unit f + j is a copy of unit j
    np.testing.assert_allclose(m["ffn"]["w_down"][:f] + m["ffn"]["w_down"][f:], s["ffn"]["w_down"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(m["ffn"]["w_down"][:f], m["ffn"]["w_down"][f:])  # unequal shares: the copies drift apart in training
  else:
    d = SRC.d_model
    np.testing.assert_array_equal(m["attn"]["w_o"][..., d:], s["attn"]["w_o"])  # writes to the residual: tiled
    np.testing.assert_allclose(m["attn"]["w_q"][:d] + m["attn"]["w_q"][d:], s["attn"]["w_q"], rtol=1e-5, atol=1e-7)  # reads it: split


def test_equal_shares_are_net2net_halving():
  src = random_tree(SRC, 5)
  cfg = target_config(SRC, "split_ffn", 2)
  tree = pure_tree(grow_state(src, SRC, random_tree(cfg, 0, zeros=True), cfg, GrowConfig("split_ffn", 2, split_noise=0.0)))
  s, m = src["blocks"][1]["ffn"]["w_down"], tree["blocks"][1]["ffn"]["w_down"]
  np.testing.assert_array_equal(m[: SRC.d_ff], s / 2)
  np.testing.assert_array_equal(m[SRC.d_ff :], s / 2)


def test_the_stacked_model_is_causal(source):
  cfg, tree = stacked(source, SRC, "stack", 2)
  model = model_of(cfg, tree)
  t = 7
  changed = TOKENS.at[:, t].set((TOKENS[:, t] + 1) % SRC.vocab_size)
  a, b = logits_of(model, TOKENS), logits_of(model, changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize(
    "dst, grow_cfg, message",
    [
        (dataclasses.replace(SRC, n_layers=5), GrowConfig("stack"), "model.n_layers = 5 is not a multiple >= 2 of the source model's n_layers = 2"),
        (dataclasses.replace(SRC, n_layers=4), GrowConfig("stack", factor=3), "model.n_layers is 4, but growing the source model (n_layers 2) by 3 gives 6"),
        (dataclasses.replace(SRC, n_layers=4, d_ff=64), GrowConfig("random"), "model.d_ff is 64, but growing"),
        (dataclasses.replace(SRC, d_ff=96, ffn="hypothetical"), GrowConfig("split_ffn"), "cannot grow FFN kind(s) hypothetical"),
        (dataclasses.replace(SRC, n_layers=4), GrowConfig("split_model"), "model.d_model = 32 is not a multiple >= 2"),
    ],
)
def test_configs_that_do_not_grow_are_config_errors(dst, grow_cfg, message):
  src = dataclasses.replace(SRC, ffn=dst.ffn)
  with pytest.raises(ConfigError) as e:
    check_growth(src, dst, grow_cfg)
  assert message in str(e.value)


def test_grow_config_validates():
  with pytest.raises(ConfigError, match="grow.factor must be >= 2"):
    GrowConfig("stack", factor=1)
  with pytest.raises(ConfigError, match="grow.operator must be one of"):
    GrowConfig("learn")
  from jaxlm.config import Experiment

  with pytest.raises(ConfigError, match="grows the model of init_from"):
    Experiment(grow=GrowConfig("stack"))


# -- runs ------------------------------------------------------------------------------------


def bad(argv, capsys) -> str:
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
  return err


@pytest.fixture(scope="module")
def config_only_run(tmp_path_factory):
  """A directory with a quickstart:smoke run's config.json and no checkpoint: every growth check
  reads the config alone, before any weight is loaded or anything written."""
  from jaxlm import experiments
  from jaxlm.train.run import save_config

  path = tmp_path_factory.mktemp("grow") / "config_only"
  path.mkdir()
  save_config(path, experiments.load("quickstart:smoke"))
  return path


def test_convert_grow_bad_input_is_one_line_and_writes_nothing(config_only_run, tmp_path, capsys):
  new = tmp_path / "new"
  for argv, message in [
      (["--factor", "1"], "the growth factor must be an integer >= 2, got 1"),
      (["--factor", "2", "--operator", "learn"], "unknown growth operator 'learn'"),
      (["--factor", "2", "--set", "model.n_layers=6"], "model.n_layers is 6, but growing the source model (n_layers 2) by 2 gives 4"),
      (["--factor", "2", "--operator", "split_model", "--set", "model.d_model=96"], "model.d_model is 96"),
      (["--factor", "2", "--set", "model.ffn_every=2", "--set", "model.ffn=moe"], "model.ffn is 'moe', but growing"),
  ]:
    assert message in bad(["convert", "grow", str(config_only_run), str(new)] + argv, capsys)
    assert not new.exists()
  assert "is not a jaxlm run directory" in bad(["convert", "grow", str(tmp_path / "nothing"), str(new), "--factor", "2"], capsys)
  before = sorted(p.name for p in config_only_run.iterdir())
  assert "already holds a run" in bad(["convert", "grow", str(config_only_run), str(config_only_run), "--factor", "2"], capsys)
  assert sorted(p.name for p in config_only_run.iterdir()) == before
  assert not new.exists()


def test_train_init_from_with_bad_growth_writes_nothing(config_only_run, tmp_path, capsys):
  """`jaxlm train` of an experiment with init_from + grow: a depth that no factor gives, a
  factor that disagrees, a changed width, factor 1: one line, exit 2, no run directory."""
  run = tmp_path / "grown"
  src = f"--set=init_from={config_only_run}"
  for sets, message in [
      (["grow.operator=stack", "model.n_layers=5"], "model.n_layers = 5 is not a multiple >= 2 of the source model's n_layers = 2"),
      (["grow.operator=stack", "grow.factor=3", "model.n_layers=4"], "model.n_layers is 4, but growing the source model (n_layers 2) by 3 gives 6"),
      (["grow.operator=stack", "model.n_layers=4", "model.d_model=128"], "model.d_model is 128, but growing"),
      (["grow.operator=stack", "grow.factor=1"], "grow.factor must be >= 2"),
  ]:
    assert message in bad(["train", "quickstart:smoke", "--run-dir", str(run), src] + [f"--set={s}" for s in sets], capsys)
    assert not run.exists()
  # a consistent growth passes the checks and then finds no checkpoint in this source
  assert "the run has no checkpoint yet" in bad(["train", "quickstart:smoke", "--run-dir", str(run), src, "--set=grow.operator=stack", "--set=model.n_layers=4"], capsys)
  assert not run.exists()


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  """A quickstart:smoke run at step 0 (random init: growth does not care what was learned)."""
  from jaxlm import experiments
  from jaxlm.train.run import write_initial_run

  path = tmp_path_factory.mktemp("grow") / "small"
  write_initial_run(path, experiments.load("quickstart:smoke"), lambda model: None)
  return path


@pytest.mark.slow
def test_convert_grow_round_trip(source_run, tmp_path, capsys):
  """`jaxlm convert grow` writes a run at step 0 whose layers are the source's, stacked
  (~30 s on a 2-core CPU: three model initialisations compile; the bitwise stacking itself is
  tested on parameter dicts above)."""
  from jaxlm.train.run import load_for_inference

  dst = tmp_path / "big"
  assert main(["convert", "grow", str(source_run), str(dst), "--factor", "2", "--set", "model.scan_layers=true"]) == 0
  out = capsys.readouterr().out
  assert "x2" in out and "4 layers" in out
  assert f"--run-dir {dst} --set model.n_layers=4 --set model.scan_layers=true" in out  # how to continue it
  src_exp, src, _, _ = load_for_inference(source_run)
  exp, model, _, step = load_for_inference(dst)
  assert step == 0 and exp.model.n_layers == 4 and exp.model.scan_layers and exp.init_from == ""
  src_layers = layer_trees(pure(src), src_exp.model)
  for i, layer in enumerate(layer_trees(pure(model), exp.model)):
    assert_trees_equal(layer, src_layers[i % 2], f"layer {i}")
  before = sorted((p, p.stat().st_mtime_ns) for p in dst.rglob("*"))
  assert "already holds a run" in bad(["convert", "grow", str(source_run), str(dst), "--factor", "2"], capsys)
  assert sorted((p, p.stat().st_mtime_ns) for p in dst.rglob("*")) == before


@pytest.mark.slow
def test_init_from_grows_on_load(source_run):
  """run.initial_model of an experiment with init_from = the smaller run and grow.operator=stack
  holds the stacked source model; resolve_init records the growth (init_from.json)."""
  from jaxlm import experiments, sharding
  from jaxlm.train.run import initial_model, load_for_inference, resolve_init

  exp = experiments.load("quickstart:smoke", [f"init_from={source_run}", "grow.operator=stack", "model.n_layers=4", "model.scan_layers=true"])
  init = resolve_init(exp, None)
  assert init["grow"] == {"operator": "stack", "factor": 2, "source_n_layers": 2}
  model = initial_model(exp, sharding.make_mesh(exp.mesh), sharding.make_rules(exp.mesh.rules), init=init)
  src_exp, src, _, _ = load_for_inference(source_run)
  src_layers = layer_trees(pure(src), src_exp.model)
  for i, layer in enumerate(layer_trees(pure(model), exp.model)):
    assert_trees_equal(layer, src_layers[i % 2], f"layer {i}")


@pytest.mark.slow
def test_grown_run_trains_on(source_run, tmp_path):
  """`jaxlm convert grow` then `jaxlm train` continues the grown run; init_from + grow trains too
  and both start from the same weights (step-0 eval losses equal)."""
  import json

  small = ["--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.sample_tokens=0", "--set", "train.checkpoint_every=2"]
  converted, on_load = tmp_path / "converted", tmp_path / "on_load"
  assert main(["convert", "grow", str(source_run), str(converted), "--factor", "2"]) == 0
  assert main(["train", "quickstart:smoke", "--run-dir", str(converted), "--set", "model.n_layers=4"] + small) == 0
  assert main(["train", "quickstart:smoke", "--run-dir", str(on_load), "--set", f"init_from={source_run}", "--set", "grow.operator=stack", "--set", "model.n_layers=4"] + small) == 0
  assert json.loads((on_load / "init_from.json").read_text())["grow"]["factor"] == 2
  first = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l][0]
  assert first(converted)["step"] == first(on_load)["step"] == 0
  np.testing.assert_allclose(first(converted)["eval_loss"], first(on_load)["eval_loss"], rtol=1e-5)
