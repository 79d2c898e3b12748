"""HyperMoE (`hypermoe`, jaxlm.layers.moe.hyper): the plain MoE when the hypernetwork's output is
zero (bitwise), the HyperExpert built from exactly the unselected experts' embeddings (a
hand-computed case), causal, expert-parallel equal to one device, scanned like unrolled,
decoding with the KV cache equal to the full forward, adaptable by LoRA all-linear, counted by
`jaxlm inspect`, and its bad settings one-line errors."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import peft, sharding
from jaxlm.cli import main
from jaxlm.config import HyperMoEConfig, MeshConfig, ModelConfig, MoEConfig, PeftConfig
from jaxlm.layers.ffn import FFN
from jaxlm.layers.moe import moe
from jaxlm.layers.moe.hyper import HyperExpert, HyperMoE, hyper_flops_per_token, hypermoe
from jaxlm.models import Transformer

CFG = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, ffn="hypermoe", dtype="float32",
    moe=MoEConfig(n_experts=8, top_k=2, d_ff_expert=16),
    hypermoe=HyperMoEConfig(expert_dim=8, process_dim=8, hyper_dim=4, adapter_dim=4),
)
E, D = CFG.moe.n_experts, CFG.d_model
SEG = jnp.ones((8, 8), jnp.int32).at[1, 6:].set(0)  # some padding; 8 rows: one per device on the mesh


def filled(make, seed: int) -> nnx.Module:
  """`make()`'s module with numpy-drawn values (eager jax.random inits compile a program per shape:
  seconds here); the HyperExperts' up heads zero, as their real init (tested below)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if "['gen_up" in jax.tree_util.keystr(path):
      return np.zeros(s.shape, s.dtype)
    if len(s.shape) == 1:  # norm scales and biases
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
    return (0.2 * rng.standard_normal(s.shape)).astype(s.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def wake_up_heads(module: nnx.Module, seed: int = 7) -> nnx.Module:
  """Give every HyperExpert non-zero up-projection heads (at init they are zero: the plain MoE)."""
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(module):
    if isinstance(node, HyperExpert):
      for name in ("gen_up", "gen_up_bias"):
        var = getattr(node, name)
        var[...] = (0.3 * rng.standard_normal(var.shape)).astype(np.float32)
  return module


def layer_params(layer: HyperMoE) -> dict:
  return {"router": layer.router[...], **layer.experts.params(), "hyper": layer.hyper.params()}


@jax.jit
def run(p, x, seg):
  """(HyperMoE output, plain MoE output with the same params, selected experts)."""
  y, _, stats = hypermoe(p, x, CFG, segment_ids=seg)
  return y, moe(p, x, CFG, segment_ids=seg)[0], stats["selected_ble"]


@pytest.fixture(scope="module")
def layer():
  return filled(lambda: HyperMoE(CFG, rngs=nnx.Rngs(0)), seed=0)


@pytest.fixture(scope="module")
def x():
  return jnp.asarray(np.random.default_rng(1).standard_normal((8, 8, D)), jnp.float32)


def test_at_init_the_up_heads_are_zero_and_the_moe_is_the_plain_moe_of_the_seed():
  """The hypernetwork draws its keys aside: the router equals a plain MoE's of the same seed and
  the key stream is left where the plain MoE leaves it (every later parameter is drawn alike)."""

  @jax.jit
  def init():
    rngs_h, rngs_p = nnx.Rngs(0), nnx.Rngs(0)
    hyper, plain = HyperMoE(CFG, rngs=rngs_h), FFN.get("moe")(CFG, rngs=rngs_p)
    heads = {k: v for k, v in hyper.hyper.params().items() if k.startswith("gen_up")}
    return heads, (hyper.router[...], plain.router[...]), (rngs_h.params.count[...], rngs_p.params.count[...])

  heads, *pairs = init()
  assert set(heads) == {"gen_up", "gen_up_bias"} and all(not np.any(np.asarray(v)) for v in heads.values())
  for a, b in pairs:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero_up_heads_are_the_plain_moe_bitwise_and_nonzero_ones_are_not(layer, x):
  y, plain, _ = run(layer_params(layer), x, SEG)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
  y, plain, _ = run(layer_params(wake_up_heads(nnx.clone(layer))), x, SEG)
  real = np.asarray(SEG, bool)
  assert not np.allclose(np.asarray(y)[real], np.asarray(plain)[real], atol=1e-3)
  np.testing.assert_array_equal(np.asarray(y)[~real], 0.0)  # padding: no output at all


def test_hyper_expert_is_computed_from_exactly_the_unselected_experts(layer):
  """Router = 10 x identity on the first E input features: token t selects the two experts of its
  two large features. The HyperExpert is recomputed in numpy with its weights formed per token;
  changing a selected expert's embedding leaves the token's output as it was, an unselected one's
  changes it."""
  awake = wake_up_heads(nnx.clone(layer))
  hp = {k: np.asarray(v, np.float64) for k, v in awake.hyper.params().items()}
  router = np.zeros((D, E), np.float32)
  router[:E, :E] = 10 * np.eye(E)
  params = {**layer_params(awake), "router": jnp.asarray(router)}
  chosen = [(0, 1), (2, 7), (0, 5), (3, 4), (6, 2), (1, 7), (5, 6), (3, 0)]
  x = (0.1 * np.random.default_rng(3).standard_normal((8, 8, D))).astype(np.float32)
  for t, pair in enumerate(chosen):
    x[0, t, list(pair)] = 1.0 + 0.1 * t
  seg = jnp.ones((8, 8), jnp.int32)
  y, plain, selected = (np.asarray(a)[0] for a in run(params, jnp.asarray(x), seg))
  got = y - plain

  relu = lambda a: np.maximum(a, 0)
  want, want_sel = np.zeros((len(chosen), D)), np.zeros((len(chosen), E))
  for t, pair in enumerate(chosen):
    want_sel[t, list(pair)] = 1
    unselected = [j for j in range(E) if j not in pair]
    s = hp["expert_emb"][unselected].sum(0)
    u = np.append(relu(relu(s @ hp["w_process"] + hp["b_process"]) @ hp["w_hyper"] + hp["b_hyper"]), 1.0)
    w_down = np.einsum("u,dua->da", u, hp["gen_down"])  # this token's generated weights
    b_down, w_up, b_up = u @ hp["gen_down_bias"], np.einsum("u,uad->ad", u, hp["gen_up"]), u @ hp["gen_up_bias"]
    want[t] = relu(x[0, t] @ w_down + b_down) @ w_up + b_up
  np.testing.assert_array_equal(selected, want_sel)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)

  t, pair = 0, chosen[0]
  for j, should_change in ((pair[0], False), (pair[1], False), (4, True)):
    emb = np.array(params["hyper"]["expert_emb"])
    emb[j] += 1.0
    y2, _, _ = run({**params, "hyper": {**params["hyper"], "expert_emb": emb}}, jnp.asarray(x), seg)
    assert (not np.array_equal(np.asarray(y2)[0, t], y[t])) == should_change, (j, should_change)


def test_changing_a_later_token_never_changes_earlier_outputs(layer, x):
  params = layer_params(wake_up_heads(nnx.clone(layer)))
  base = np.asarray(run(params, x, SEG)[0])
  for j in (3, 7):
    out = np.asarray(run(params, x.at[:, j].set(x[:, j] * -2.0 + 1.0), SEG)[0])
    np.testing.assert_array_equal(out[:, :j], base[:, :j])
    assert not np.allclose(out[0, j], base[0, j])


@pytest.mark.slow  # make test-all: the 8-device compile; the MoE under it is tested sharded in tests/layers/test_moe_parallel.py
def test_expert_parallel_equals_one_device(layer, x):
  """The layer on an expert=4 x fsdp=2 mesh (each device 2 experts, batch split 8 ways) equals
  the one-device layer."""
  params = layer_params(wake_up_heads(nnx.clone(layer)))
  params["router"] = np.random.default_rng(5).standard_normal(params["router"].shape).astype(np.float32)  # uneven, confident
  want = jax.device_get(run(params, x, SEG))
  with jax.set_mesh(sharding.make_mesh(MeshConfig(expert=4, fsdp=2))):
    got = jax.device_get(run(params, x, SEG))
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_lora_all_linear_adapts_the_hypernetwork_and_the_experts(x):
  """All-linear LoRA wraps every linear weight of the hypernetwork and the experts (not the
  router, not the embedding table), and the adapted layer runs (abstractly: LoRA's own values are
  tested in tests/peft)."""
  adapted = peft.apply(nnx.eval_shape(lambda: HyperMoE(CFG, rngs=nnx.Rngs(0))), PeftConfig(method="lora", rank=2))
  names = {"/".join(map(str, p)) for p, n in nnx.iter_graph(adapted) if isinstance(n, peft.Adapted)}
  assert names == {f"hyper/{w}" for w in ("w_process", "w_hyper", "gen_down", "gen_down_bias", "gen_up", "gen_up_bias")} | {f"experts/w_{w}" for w in ("gate", "up", "down")}
  y = jax.eval_shape(lambda m, x: nnx.merge(*m)(x, segment_ids=SEG)[0], nnx.split(adapted), x)
  assert y.shape == x.shape


@pytest.fixture(scope="module")
def model():
  return wake_up_heads(filled(lambda: Transformer(dataclasses.replace(CFG, n_layers=1), rngs=nnx.Rngs(2)), seed=2))


@pytest.mark.slow  # make test-all: decoding compiles a cache step; stateless FFN kinds decode through the shared path tested in tests/test_generate.py
def test_decoding_token_by_token_with_the_cache_equals_the_full_forward(model):
  tokens = jnp.asarray(np.random.default_rng(4).integers(3, CFG.vocab_size, (2, 8)), jnp.int32)
  full = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, tokens))
  step = nnx.jit(lambda m, t, cache: m.decode(t, cache))
  cache = model.init_cache(2, 8)
  for i in range(8):
    logits, cache = step(model, tokens[:, i : i + 1], cache)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, i], rtol=1e-4, atol=1e-5)


def test_scanned_layers_trace_to_the_unrolled_shapes():
  """Fast counterpart of the slow equality below: the scanned HyperMoE model builds (vmapped
  layers) and runs its forward pass (nnx.scan) abstractly, with stacked hypernetworks."""
  tokens = jnp.zeros((2, 8), jnp.int32)
  scanned = nnx.eval_shape(lambda: Transformer(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0)))
  assert scanned.units.blocks[0].ffn.hyper.gen_down.shape == (CFG.n_layers, D, 5, 4)
  logits, aux = jax.eval_shape(lambda m: nnx.merge(*m)(tokens), nnx.split(scanned))
  assert logits.shape == (2, 8, CFG.vocab_size) and aux["metrics"]["moe_expert_load"].shape == (CFG.n_layers, E)


@pytest.mark.slow
def test_scanned_layers_equal_unrolled():
  from jaxlm.models.build import load_unrolled_into_scanned

  model = wake_up_heads(filled(lambda: Transformer(CFG, rngs=nnx.Rngs(2)), seed=2))
  tokens = jnp.asarray(np.random.default_rng(4).integers(3, CFG.vocab_size, (2, 8)), jnp.int32)
  scanned = filled(lambda: Transformer(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(9)), seed=9)
  load_unrolled_into_scanned(model, scanned)
  fwd = nnx.jit(lambda m, t: m(t)[0])
  np.testing.assert_allclose(np.asarray(fwd(scanned, tokens)), np.asarray(fwd(model, tokens)), rtol=1e-5, atol=1e-5)


def test_inspect_counts_the_hypernetwork_as_active_and_its_flops():
  from jaxlm import experiments
  from jaxlm.report import format_report, report

  def numbers(ffn):
    exp = experiments.load("quickstart:smoke", [f"model.ffn={ffn}"])
    return exp, report(exp, 1)

  exp, r_hyper = numbers("hypermoe")
  _, r_moe = numbers("moe")
  cfg = exp.model
  shapes = jax.eval_shape(lambda: HyperExpert(cfg, rngs=nnx.Rngs(0)).params())
  per_layer = sum(int(np.prod(s.shape)) for s in shapes.values())
  assert r_hyper["params_total"] - r_moe["params_total"] == cfg.n_layers * per_layer
  assert r_hyper["params_active"] - r_moe["params_active"] == cfg.n_layers * per_layer
  assert r_hyper["train_flops_per_token"] - r_moe["train_flops_per_token"] == pytest.approx(3 * cfg.n_layers * hyper_flops_per_token(cfg))
  assert "hyper.gen_down" in format_report(exp, r_hyper)


def _snapshot(path: Path) -> dict[str, str]:
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.hypermoe.adapter_dim=0"], "model.hypermoe.adapter_dim must be >= 1, got 0"),
        (["model.hypermoe.hyper_dim=2.5"], "bad value for model.hypermoe.hyper_dim: expected an integer"),
        (["model.moe.top_k=8"], "model.moe.top_k (8) must be < model.moe.n_experts (8)"),
        (["model.moe.n_experts=6", "mesh.expert=4", "mesh.fsdp=2"], "model.moe.n_experts (6) must be divisible by the expert mesh axis"),
    ],
)
def test_bad_settings_are_one_line_exit_2_and_write_nothing(sets, message, tmp_path, capsys):
  argv = ["train", "quickstart:smoke", "--set", "model.ffn=hypermoe"] + [a for s in sets for a in ("--set", s)] + ["--run-dir", str(tmp_path / "run")]
  before = _snapshot(tmp_path)
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and message in err and "\n" not in err, err
  assert _snapshot(tmp_path) == before
