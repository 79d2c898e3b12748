"""LoRA, DoRA and (IA)^3 on every kind of weight: zero-init is a no-op, merged equals unmerged,
expert LoRA equals the materialised W_e + s A_e B_e (also under expert parallelism), DoRA's norm
is computed without forming the adapted weight, banks chosen per example equal each adapter alone."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import peft, sharding
from jaxlm.config import MeshConfig, ModelConfig, MoEConfig, PeftConfig, SoftMoEConfig
from jaxlm.errors import ConfigError
from jaxlm.layers.moe import moe
from jaxlm.models import Transformer
from jaxlm.peft.weights import LoRAWeight, dora_column_scale

BASE = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, dtype="float32")
MODELS = {
    "dense": BASE,
    "scanned": dataclasses.replace(BASE, scan_layers=True),
    "moe": dataclasses.replace(BASE, ffn="moe", moe=MoEConfig(n_experts=4, top_k=2)),
    "soft_moe": dataclasses.replace(BASE, ffn="soft_moe", soft_moe=SoftMoEConfig(n_experts=4, segment_len=4)),
}
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)


def randomize(model, seed=0, scale=0.2):
  """Random values for every adapter weight (a fresh LoRA's B is zero: no effect to test)."""
  for i, (path, mod) in enumerate(peft.adapted_modules(model)):
    for name in ("a", "b", "scale", "magnitude"):
      var = getattr(mod, name, None)
      if isinstance(var, nnx.Variable):
        k = jax.random.fold_in(jax.random.key(seed), i * 8 + len(name))
        var.set_value(var[...] + scale * jax.random.normal(k, var.shape, var.dtype))
  return model


_logits = nnx.jit(lambda m, t: m(t)[0])  # one function: compiled once per model structure


def logits(model, tokens=TOKENS):
  return np.asarray(_logits(model, tokens))


CASES = [("lora", k) for k in MODELS] + [("dora", "moe"), ("dora", "soft_moe"), ("ia3", "scanned"), ("ia3", "moe")]


@pytest.mark.parametrize("method, kind", CASES)
def test_fresh_adapters_change_nothing_and_merged_equals_unmerged(method, kind, model_of):
  base = logits(model_of(MODELS[kind]))
  model = peft.apply(model_of(MODELS[kind]), PeftConfig(method=method, rank=4))
  np.testing.assert_allclose(logits(model), base, rtol=1e-6, atol=1e-6)  # B = 0, l = 1, m = ||W||
  adapted = logits(randomize(model))
  assert not np.allclose(adapted, base, atol=1e-3)  # the adapters do something
  np.testing.assert_allclose(logits(peft.merge(model)), adapted, rtol=1e-5, atol=1e-5)
  assert not peft.adapted_modules(model)  # a plain model again


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_adapters_then_unmerge_restores_the_base(method, model_of):
  model = randomize(peft.apply(model_of(MODELS["moe"]), PeftConfig(method=method, rank=4)))
  bases = [np.asarray(m.base[...]) for _, m in peft.adapted_modules(model)]
  adapted = logits(model)
  peft.merge_adapters(model)
  np.testing.assert_allclose(logits(model), adapted, rtol=1e-5, atol=1e-5)
  peft.unmerge_adapters(model)
  for b, (_, m) in zip(bases, peft.adapted_modules(model)):
    np.testing.assert_allclose(np.asarray(m.base[...]), b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits(model), adapted, rtol=1e-5, atol=1e-5)


def test_dora_column_norm_equals_the_materialised_weight():
  """||W + s A B|| per output column, for a two-axis fan-in (w_o [H, K, D]) with an expert axis."""
  k = jax.random.split(jax.random.key(0), 4)
  w = jax.random.normal(k[0], (3, 2, 4, 5))  # [E, H, K, D]: stack 1, fan-in 2, fan-out 1
  a = jax.random.normal(k[1], (3, 2, 4, 2))
  b = jax.random.normal(k[2], (3, 2, 5))
  m = jax.random.uniform(k[3], (3, 5)) + 0.5
  dense = w + 0.7 * jnp.einsum("ehkr,erd->ehkd", a, b)
  want = m / jnp.sqrt(jnp.sum(dense**2, axis=(1, 2)))
  got = dora_column_scale(w, a, b, jnp.float32(0.7), m, n_in=2, bank=False)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # ... and the adapted weight's merge equals m * dense / ||dense||
  lw = LoRAWeight(w, a, b, jnp.float32(0.7), got, n_in=2)
  np.testing.assert_allclose(lw.dense(), dense * want[:, None, None, :], rtol=1e-5, atol=1e-6)


# -- routed experts ----------------------------------------------------------------------------

MOE_CFG = dataclasses.replace(MODELS["moe"], moe=MoEConfig(n_experts=8, top_k=2))
X = jax.random.normal(jax.random.key(3), (8, 8, 16))
SEG = jnp.ones((8, 8), jnp.int32).at[1, 6:].set(0)


def expert_params(seed=0, rank=3, dora=False):
  """Random MoE params whose experts carry LoRA (or DoRA) weights, and the materialised ones."""
  from jaxlm.layers.moe import MoE

  layer = MoE(MOE_CFG, rngs=nnx.Rngs(seed))
  p = {"router": layer.router[...]}
  dense = dict(p)
  for j, name in enumerate(("w_gate", "w_up", "w_down")):
    w = getattr(layer.experts, name)[...]
    e, i, o = w.shape
    ka, kb, km = jax.random.split(jax.random.key(seed * 10 + j), 3)
    a, b = jax.random.normal(ka, (e, i, rank)) / 4, jax.random.normal(kb, (e, rank, o)) / 4
    col = dora_column_scale(w, a, b, jnp.float32(0.5), jax.random.uniform(km, (e, o)) + 0.5, n_in=1, bank=False) if dora else None
    p[name] = LoRAWeight(w, a, b, jnp.float32(0.5), col)
    dense[name] = p[name].dense()
  return p, dense


def moe_loss(params, x, cfg):
  y, aux, _ = moe(params, x, cfg, segment_ids=SEG)
  return jnp.sum(y * jnp.cos(jnp.arange(y.shape[-1]))) + sum(aux["losses"].values()), y


@pytest.mark.parametrize("moe_kw, dora", [(dict(gmm_backend="capacity_einsum"), False), (dict(gmm_backend="ragged_dot"), True), (dict(mode="capacity", capacity_factor=1.0), True)])
def test_expert_lora_equals_materialised_experts(moe_kw, dora):
  """x_sorted @ A_e @ B_e through the grouped matmul == experts W_e + s A_e B_e (never formed)."""
  cfg = dataclasses.replace(MOE_CFG, moe=dataclasses.replace(MOE_CFG.moe, **moe_kw))
  p, dense = expert_params(dora=dora)
  _, y = jax.jit(moe_loss, static_argnums=2)(p, X, cfg)
  _, y_ref = jax.jit(moe_loss, static_argnums=2)(dense, X, cfg)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _expert_grads(ep: int, all_to_all: str):
  cfg = dataclasses.replace(MOE_CFG, moe=dataclasses.replace(MOE_CFG.moe, all_to_all=all_to_all))
  p, _ = expert_params()
  grad = jax.jit(jax.grad(lambda p: moe_loss(p, X, cfg)[0]))
  if ep == 1:
    return jax.device_get(grad(p))
  with jax.set_mesh(sharding.make_mesh(MeshConfig(expert=ep, fsdp=-1, tensor=1))):
    return jax.device_get(grad(p))


@pytest.mark.parametrize("ep, all_to_all", [(8, "padded"), (4, "ragged")])
def test_expert_lora_under_expert_parallelism_equals_one_device(ep, all_to_all):
  """A_e [E, D, R] and B_e [E, R, F] split over `expert` with their experts: same gradients."""
  got, want = _expert_grads(ep, all_to_all), _expert_grads(1, "padded")
  for name in ("w_gate", "w_up", "w_down"):
    for part in ("a", "b"):
      np.testing.assert_allclose(getattr(got[name], part), getattr(want[name], part), rtol=2e-4, atol=2e-5)
  assert np.abs(np.asarray(got["w_down"].b)).max() > 0


def test_soft_moe_expert_lora_equals_merging_the_materialised_experts(model_of):
  """sum_e p_e (W_e + s A_e B_e) kept as the merged W plus one rank-E*R product."""
  from jaxlm.layers.soft_moe import soft_moe

  cfg = MODELS["soft_moe"]
  model = randomize(peft.apply(model_of(cfg), PeftConfig(method="lora", rank=2, targets=(r".*experts/w_.*",))))
  ffn = model.blocks[0].ffn
  p = ffn.params()
  dense = {k: (v.dense() if hasattr(v, "dense") else v) for k, v in p.items()}
  x = jax.random.normal(jax.random.key(4), (2, 8, 16))
  y = jax.jit(lambda p: soft_moe(p, x, cfg)[0])(p)
  y_ref = jax.jit(lambda p: soft_moe(p, x, cfg)[0])(dense)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


# -- targeting ---------------------------------------------------------------------------------


def adapted_paths(model_of, cfg: ModelConfig, pcfg: PeftConfig) -> list[str]:
  model = peft.apply(model_of(cfg), pcfg)
  return [peft.targets.path_str(p) for p, _ in peft.adapted_modules(model)]


def test_targets_select_by_regex_and_all_linear_skips_head_and_routers(model_of):
  untied = dataclasses.replace(MODELS["moe"], tie_embeddings=False)
  paths = adapted_paths(model_of, untied, PeftConfig(method="lora", targets=("all-linear",)))
  assert "blocks/0/attn/w_q" in paths and "blocks/1/ffn/experts/w_down" in paths
  assert not any(p.endswith(("router", "lm_head")) for p in paths)
  assert adapted_paths(model_of, untied, PeftConfig(method="lora", targets=(r"blocks/.*/attn/w_(q|v)",))) == ["blocks/0/attn/w_q", "blocks/0/attn/w_v", "blocks/1/attn/w_q", "blocks/1/attn/w_v"]
  assert not any(p.endswith("router") for p in adapted_paths(model_of, untied, PeftConfig(method="lora", targets=(r".*",))))
  assert adapted_paths(model_of, untied, PeftConfig(method="lora", rank=2, targets=(r"blocks/0/ffn/router",))) == ["blocks/0/ffn/router"]
  # (IA)^3's default: keys, values and the FFN's down projection (its hidden units)
  assert adapted_paths(model_of, BASE, PeftConfig(method="ia3")) == ["blocks/0/attn/w_k", "blocks/0/attn/w_v", "blocks/0/ffn/w_down", "blocks/1/attn/w_k", "blocks/1/attn/w_v", "blocks/1/ffn/w_down"]


def test_per_target_ranks_and_bad_targets(model_of):
  model = peft.apply(model_of(BASE), PeftConfig(method="lora", rank=4, rank_pattern={r".*w_q": 2}, alpha_pattern={r".*w_q": 4.0}))
  mods = {peft.targets.path_str(p): m for p, m in peft.adapted_modules(model)}
  assert mods["blocks/0/attn/w_q"].rank == 2 and mods["blocks/0/attn/w_k"].rank == 4
  assert mods["blocks/0/attn/w_q"].scales == (2.0,) and mods["blocks/0/attn/w_k"].scales == (4.0,)  # alpha / rank
  with pytest.raises(ConfigError, match="matches no linear weight"):
    peft.apply(model_of(BASE), PeftConfig(method="lora", targets=(r".*attn/q_proj",)))
  with pytest.raises(ConfigError, match="larger than the adapted dimensions"):
    peft.apply(model_of(BASE), PeftConfig(method="lora", rank=17))
  with pytest.raises(ConfigError, match="peft.method"):
    PeftConfig(method="lorax")
  with pytest.raises(ConfigError, match="peft.rank"):
    PeftConfig(rank=0)


# -- banks of adapters -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, model_of):
  """Two saved DoRA adapters of different ranks and scales on the MoE model (attention and expert
  weights): a bank of them exercises LoRA's rank-N*R product and DoRA's per-adapter column scale."""
  dirs = {}
  for i, rank in enumerate((2, 4)):
    cfg = PeftConfig(method="dora", rank=rank, alpha=2.0 * (i + 1), targets=(r".*attn/w_(q|v)", r".*experts/w_up"))
    model = randomize(peft.apply(model_of(MODELS["moe"]), cfg), seed=i)
    d = tmp_path_factory.mktemp(f"adapter{i}")
    peft.save_adapter(model, d, cfg, model_cfg=MODELS["moe"])
    dirs[f"task{i}"] = (d, logits(model))
  return dirs


def test_adapter_round_trip_and_refusing_another_base(two_adapters, tmp_path, model_of):
  d, want = two_adapters["task1"]
  model = peft.load_adapter(model_of(MODELS["moe"]), d)
  np.testing.assert_allclose(logits(model), want, rtol=1e-6, atol=1e-6)
  other = dataclasses.replace(MODELS["moe"], d_ff=48)
  with pytest.raises(ConfigError, match="trained on a base whose"):
    peft.load_adapter(model_of(other), d)
  with pytest.raises(ConfigError, match="not a saved adapter"):
    peft.load_adapter(model_of(MODELS["moe"]), tmp_path)


def test_per_example_adapters_in_one_batch_equal_each_adapter_alone(two_adapters, model_of):
  """A bank of two resident DoRA adapters (ranks 2 and 4, expert weights included: their gates
  travel with the dispatched rows): example b uses adapter ids[b]; each row equals the model with
  only that adapter loaded; one active adapter; merging it."""
  model = peft.load_adapters(model_of(MODELS["moe"]), {n: d for n, (d, _) in two_adapters.items()})
  tokens = jnp.concatenate([TOKENS, TOKENS[::-1]])
  ids = jnp.asarray([0, 1, 1, 0], jnp.int32)

  @nnx.jit
  def mixed(m, t, ids):
    with peft.use_adapter(ids):
      return m(t)[0]

  got = np.asarray(mixed(model, tokens, ids))
  for row, (i, src) in enumerate(zip(np.asarray(ids), [0, 1, 1, 0])):
    np.testing.assert_allclose(got[row], two_adapters[f"task{i}"][1][src], rtol=1e-5, atol=1e-5)
  peft.set_active(model, "task1")
  np.testing.assert_allclose(logits(model), two_adapters["task1"][1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits(peft.merge(model)), two_adapters["task1"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_mixture_of_identical_experts_equals_one_adapter(method, model_of):
  """MoLoRA / MoV (a per-token softmax over N LoRA or (IA)^3 experts, Zadouri et al. 2023): N
  copies of one adapter give that adapter, whatever the router says; the router trains."""
  cfg = PeftConfig(method=method, rank=2)
  single = randomize(peft.apply(model_of(BASE), cfg))
  mix = randomize(peft.apply(model_of(BASE), dataclasses.replace(cfg, n_experts=3)), seed=5)  # random router too
  for (_, s), (_, m) in zip(peft.adapted_modules(single), peft.adapted_modules(mix)):
    for name in ("a", "b") if method == "lora" else ("scale",):
      getattr(m, name).set_value(jnp.stack([getattr(s, name)[...]] * 3, axis=s.n_stack))
    m.router.set_value(jax.random.normal(jax.random.key(9), m.router.shape))
  np.testing.assert_allclose(logits(mix), logits(single), rtol=1e-5, atol=1e-5)
  trainable = peft.trainable(dataclasses.replace(cfg, n_experts=3))
  assert all(trainable(p + ("router",), m.router) for p, m in peft.adapted_modules(mix))
