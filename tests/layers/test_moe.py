"""Sparse MoE dispatch: dropless == a per-token loop, capacity drops exactly the documented
assignments, every grouped-matmul backend agrees, each step (layout, dispatch, combine) on its
own, and a causal decoder stays causal through the MoE layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.layers.moe import MoE, grouped_matmul, moe
from jaxlm.layers.moe.gmm import resolve_backend, target_platform
from jaxlm.layers.moe.layer import resolve_all_to_all
from jaxlm.layers.moe import layout as lay
from jaxlm.layers.moe.routing import capacity
from jaxlm.models import Transformer

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, ffn="moe", dtype="float32", moe=MoEConfig(n_experts=4, top_k=2))


def with_moe(cfg: ModelConfig = CFG, **kw) -> ModelConfig:
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **kw))


def params_of(layer: MoE) -> dict:
  p = {"router": layer.router[...], "w_gate": layer.experts.w_gate[...], "w_up": layer.experts.w_up[...], "w_down": layer.experts.w_down[...]}
  if layer.shared is not None:
    p["shared"] = {"w_gate": layer.shared.w_gate[...], "w_up": layer.shared.w_up[...], "w_down": layer.shared.w_down[...]}
  if layer.bias is not None:
    p["bias"] = layer.bias[...]
  return p


def random_params(cfg: ModelConfig, seed: int = 0, router_std: float = 1.0) -> dict:
  """Layer params with a strong router (distinct, confident choices) and O(1) expert outputs."""
  p = params_of(MoE(cfg, rngs=nnx.Rngs(seed)))
  k = jax.random.split(jax.random.key(seed + 100), 4)
  p["router"] = router_std * jax.random.normal(k[0], p["router"].shape)
  for i, name in enumerate(("w_gate", "w_up", "w_down")):
    p[name] = jax.random.normal(k[i + 1], p[name].shape) / np.sqrt(p[name].shape[1])
  return p


def silu(v):
  return v / (1 + np.exp(-v))


def loop_reference(p: dict, x_bld: np.ndarray, cfg: ModelConfig, keep=None) -> np.ndarray:
  """Token by token in float64: route, run the chosen experts, add them up with their weights.
  `keep(b, l, k)` says whether the k-th choice of token (b, l) was given a slot."""
  m = cfg.moe
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x_bld, np.float64)
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    for l in range(x.shape[1]):
      logits = x[b, l] @ p["router"]
      if m.router == "sigmoid_bias":
        scores = 1 / (1 + np.exp(-logits))
        chosen = np.argsort(-(scores + p.get("bias", 0)), kind="stable")[: m.top_k]
      else:
        scores = np.exp(logits - logits.max())
        scores /= scores.sum()
        chosen = np.argsort(-scores, kind="stable")[: m.top_k]
      w = scores[chosen]
      if m.renormalize:
        w = w / w.sum()
      w = w * m.route_scale
      for k, e in enumerate(chosen):
        if keep is None or keep(b, l, k, e):
          h = silu(x[b, l] @ p["w_gate"][e]) * (x[b, l] @ p["w_up"][e])
          y[b, l] += w[k] * (h @ p["w_down"][e])
      if "shared" in p:
        s = p["shared"]
        y[b, l] += (silu(x[b, l] @ s["w_gate"]) * (x[b, l] @ s["w_up"])) @ s["w_down"]
  return y


X = np.asarray(jax.random.normal(jax.random.key(7), (3, 8, 16)))


@pytest.mark.parametrize(
    "backend, overrides",
    [
        ("capacity_einsum", {}),
        ("capacity_einsum", dict(block_rows=8)),  # several blocks per expert
        ("ragged_dot", {}),
        ("capacity_einsum", dict(n_experts=8, top_k=3, d_ff_expert=8, n_shared_experts=2)),  # fine-grained + shared (DeepSeekMoE)
        ("ragged_dot", dict(router="sigmoid_bias", route_scale=2.5)),
        ("capacity_einsum", dict(renormalize=False, top_k=1)),  # Switch
    ],
)
def test_dropless_equals_per_token_loop(backend, overrides):
  cfg = with_moe(**overrides, gmm_backend=backend)
  p = random_params(cfg)
  if "bias" in p:
    p["bias"] = jnp.asarray(np.linspace(-0.3, 0.3, cfg.moe.n_experts), jnp.float32)
  y, aux, _ = jax.jit(moe, static_argnums=2)(p, X, cfg)
  np.testing.assert_allclose(y, loop_reference(p, X, cfg), rtol=2e-5, atol=2e-5)
  assert float(aux["metrics"]["moe_dropped_fraction"]) == 0.0


def test_pallas_backend_matches():
  cfg = with_moe(gmm_backend="pallas")
  p = random_params(cfg)
  np.testing.assert_allclose(moe(p, X, cfg)[0], loop_reference(p, X, cfg), rtol=2e-5, atol=2e-5)


def abstract_mesh_on(platform: str) -> jax.sharding.AbstractMesh:
  """A 1-device mesh of `platform` devices that need not exist (as for ahead-of-time compiles)."""
  device = jax.sharding.AbstractDevice(device_kind=f"fake {platform}", num_cores=1, platform=platform)
  return jax.sharding.AbstractMesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), abstract_device=device)


@pytest.mark.parametrize("platform, backend, exchange", [("cpu", "capacity_einsum", "padded"), ("tpu", "pallas", "ragged"), ("gpu", "pallas", "ragged")])
def test_auto_resolves_for_the_target_platform_not_the_host(platform, backend, exchange):
  """'auto' follows the devices of the mesh the step is traced under: compiling for a TPU slice
  from a CPU host builds the TPU path. Without a mesh it falls back to the host's backend."""
  assert resolve_backend("auto", platform) == backend and resolve_all_to_all("auto", platform) == exchange
  with jax.sharding.use_abstract_mesh(abstract_mesh_on(platform)):
    assert target_platform() == platform
    assert resolve_backend("auto") == backend and resolve_all_to_all("auto") == exchange
    seen = []
    jax.jit(lambda x: seen.append(target_platform()) or x).trace(jax.ShapeDtypeStruct((2,), jnp.float32))  # in a trace too
    assert seen == [platform]
  assert target_platform() == jax.default_backend()
  assert resolve_backend("ragged_dot", platform) == "ragged_dot" and resolve_all_to_all("padded", platform) == "padded"


def test_capacity_mode_drops_exactly_the_documented_assignments():
  """C = ceil(cf * L * K / E) slots per (expert, sequence), given in (token, k) order: an
  assignment is dropped iff its expert already holds C earlier assignments of its sequence."""
  cfg = with_moe(mode="capacity", capacity_factor=0.5, router_z_weight=0.0)
  p = random_params(cfg, router_std=0.3)
  c = capacity(X.shape[1], cfg.moe)
  assert c == 2  # ceil(0.5 * 8 * 2 / 4)
  # Which assignments survive, replayed by hand from the float64 routing.
  x = np.asarray(X, np.float64)
  chosen = np.argsort(-(x @ np.asarray(p["router"], np.float64)), axis=-1, kind="stable")[..., :2]
  kept = {}
  for b in range(x.shape[0]):
    used = np.zeros(4, int)
    for l in range(x.shape[1]):
      for k in range(2):
        e = chosen[b, l, k]
        kept[b, l, k] = used[e] < c
        used[e] += 1
  n_dropped = sum(not v for v in kept.values())
  assert 0 < n_dropped < len(kept)
  y, aux, _ = jax.jit(moe, static_argnums=2)(p, X, cfg)
  np.testing.assert_allclose(y, loop_reference(p, X, cfg, keep=lambda b, l, k, e: kept[b, l, k]), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(aux["metrics"]["moe_dropped_fraction"], n_dropped / len(kept), rtol=1e-6)
  # Every grouped-matmul backend computes the same slots.
  y2, _, _ = moe(p, X, with_moe(cfg, gmm_backend="ragged_dot"))
  np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-6)


def test_padding_tokens_take_no_slot_and_no_load():
  cfg = with_moe(mode="capacity", capacity_factor=0.5)  # C = 2 slots for 8 tokens and for 5
  p = random_params(cfg)
  seg = np.ones(X.shape[:2], np.int32)
  seg[:, 5:] = 0
  y, aux, stats = moe(p, X, cfg, segment_ids=jnp.asarray(seg))
  y_short, _, stats_short = moe(p, X[:, :5], cfg)
  np.testing.assert_allclose(y[:, :5], y_short, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y[:, 5:], 0.0)
  assert float(stats["tokens"]) == 15.0
  np.testing.assert_allclose(stats["counts_e"], stats_short["counts_e"])


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_changing_a_later_token_never_changes_earlier_logits(mode):
  cfg = dataclasses.replace(with_moe(mode=mode, capacity_factor=0.5), first_k_dense=0)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda model, tokens: model(tokens)[0])
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  base = forward(model, tokens)
  for j in (3, 8, 11):
    changed = tokens.at[:, j].set((tokens[:, j] + 17) % cfg.vocab_size)
    out = forward(model, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :j]), np.asarray(base[:, :j]))
    assert not np.allclose(out[:, j], base[:, j])


def test_grad_of_earlier_output_wrt_later_input_is_zero():
  cfg = with_moe()
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  p = params_of(layer)
  g = jax.jit(jax.grad(lambda x: jnp.sum(moe(p, x, cfg)[0][:, :4])))(jnp.asarray(X))
  np.testing.assert_array_equal(np.asarray(g[:, 4:]), 0.0)
  assert np.all(np.any(np.asarray(g[:, :4]) != 0, axis=-1))


# -- the steps, one at a time -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["capacity_einsum", "ragged_dot"])
def test_grouped_matmul_backends_with_empty_groups(backend):
  rng = np.random.default_rng(0)
  sizes = np.array([8, 0, 16, 0, 8, 0], np.int32)  # multiples of the 8-row block, empty experts included
  m = 48  # 8 rows past the groups: zeros
  x = rng.normal(size=(m, 5)).astype(np.float32)
  w = rng.normal(size=(6, 5, 3)).astype(np.float32)
  ends = np.cumsum(sizes)
  ref = np.zeros((m, 3), np.float32)
  for e in range(6):
    ref[ends[e] - sizes[e] : ends[e]] = x[ends[e] - sizes[e] : ends[e]] @ w[e]
  y = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), backend=backend, block_rows=8)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # Equal groups (the [E, C, K] capacity buffer).
  y_eq = grouped_matmul(jnp.asarray(x), jnp.asarray(w), None, backend=backend)
  np.testing.assert_allclose(y_eq, np.einsum("eck,ekn->ecn", x.reshape(6, 8, 5), w).reshape(m, 3), rtol=1e-5, atol=1e-5)


def test_dropless_layout_sorts_by_expert_and_pads_groups():
  expert = jnp.array([2, 0, 2, 4, 1, 2, 0], jnp.int32)  # 4 = sentinel (padding token) with E = 4
  out = lay.dropless_layout(expert, 4, multiple=4)
  np.testing.assert_array_equal(out.group_sizes_e, [4, 4, 4, 0])
  np.testing.assert_array_equal(out.row_n, [8, 0, 9, out.n_rows, 4, 10, 1])
  assert out.n_rows == 7 + 4 * 3 + 1  # N + E (b - 1), rounded up to a block
  tight = lay.dropless_layout(expert, 4)
  np.testing.assert_array_equal(tight.row_n, [3, 0, 4, 7, 2, 5, 1])
  np.testing.assert_array_equal(tight.group_sizes_e, [2, 1, 3, 0])


def test_capacity_layout_slots_and_drops():
  expert = jnp.array([1, 1, 1, 0, 1, 0], jnp.int32)
  group = jnp.array([0, 0, 0, 0, 1, 1], jnp.int32)
  out = lay.capacity_layout(expert, group, n_experts=2, n_groups=2, capacity=2)
  # rows ordered (expert, group, slot): expert 1 group 0 takes n=0, 1; n=2 is the third: dropped.
  np.testing.assert_array_equal(out.row_n, [4, 5, 8, 0, 6, 2])
  assert int(lay.dropped(out, expert, 2)) == 1


def test_dispatch_and_combine_invert_each_other():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
  from jaxlm.layers.moe.routing import Routing

  expert = jnp.array([1, 0, 1, 1, 0, 2, 2, 0, 1, 0], jnp.int32)  # (t, k) order, K = 2
  weight = jnp.linspace(0.1, 1.0, 10)
  routing = Routing(expert, jnp.repeat(jnp.arange(5, dtype=jnp.int32), 2), weight, jnp.zeros((5, 3)), 2)
  layout = lay.dropless_layout(expert, 3)
  buf = lay.dispatch(x, layout, routing.token_n)
  np.testing.assert_array_equal(buf, x[jnp.array([0, 2, 3, 4, 0, 1, 1, 4, 2, 3])])  # token of each sorted row
  y = lay.combine(lay.gather_rows(buf * 2.0, layout), routing, 5)
  np.testing.assert_allclose(y, 2.0 * x * (weight[0::2] + weight[1::2])[:, None], rtol=1e-6)


def test_layer_in_bfloat16_runs_and_is_close_to_float32():
  cfg = with_moe()
  p = random_params(cfg)
  y32 = moe(p, X, cfg)[0]
  y16 = moe(p, X, dataclasses.replace(cfg, dtype="bfloat16"))[0]
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.1, atol=0.05)


def test_expert_load_heatmap_is_written_from_the_history(tmp_path):
  from jaxlm.layers.moe.plots import expert_load_heatmap
  from jaxlm.plots import PLOTS

  assert PLOTS.get("moe_expert_load") is expert_load_heatmap
  assert expert_load_heatmap(tmp_path, [{"step": 1, "loss": 2.0}]) is None  # a dense run: no picture
  load = np.full((3, 4), 0.25)
  history = [{"step": s, "metrics/moe_expert_load": (load + 0.01 * s * np.eye(3, 4)).tolist()} for s in (10, 20, 30)]
  path = expert_load_heatmap(tmp_path, history)
  assert path == tmp_path / "moe_expert_load.png" and path.stat().st_size > 1000
