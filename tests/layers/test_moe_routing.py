"""Routers, losses and router state: float32 decisions, hand-computed losses, the DeepSeek-V3
bias rule, expert choice, jitter only in training, and the bad-input errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.cli import main
from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.errors import ConfigError
from jaxlm.layers.moe import MoE, load_balance_loss, router_z_loss, update_bias
from jaxlm.layers.moe import moe as moe_eager
from jaxlm.layers.moe.routing import ROUTERS, router_logits

moe = jax.jit(moe_eager, static_argnums=2)

CFG = ModelConfig(vocab_size=64, d_model=4, n_layers=2, n_heads=1, n_kv_heads=1, d_ff=8, ffn="moe", dtype="float32", moe=MoEConfig(n_experts=4, top_k=1))


def with_moe(cfg: ModelConfig = CFG, **kw) -> ModelConfig:
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **kw))


def identity_router_params(cfg: ModelConfig) -> dict:
  """router = I (D = E = 4): the router logits are the inputs themselves."""
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  return {"router": jnp.eye(4), "w_gate": layer.experts.w_gate[...], "w_up": layer.experts.w_up[...], "w_down": layer.experts.w_down[...]}


def test_topk_is_decided_in_float32_with_bfloat16_activations():
  # Expert 1's column exceeds expert 0's by 2^-12: invisible in bfloat16 (8 mantissa bits).
  router = jnp.array([[1.0, 1.0 + 2.0**-12, 0.5, 0.25]] * 4, jnp.float32)
  x = jnp.ones((1, 3, 4), jnp.bfloat16)
  assert jnp.argmax(x @ router.astype(jnp.bfloat16), -1)[0, 0] == 0  # a bfloat16 router would pick expert 0
  logits = router_logits(x, router)
  assert logits.dtype == jnp.float32
  routing = ROUTERS.get("softmax_topk")(logits, CFG.moe, mask_bl=jnp.ones((1, 3), bool))
  np.testing.assert_array_equal(routing.expert_n, [1, 1, 1])
  # and so does the whole layer in bfloat16
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  p = identity_router_params(cfg) | {"router": router}
  _, aux, stats = moe(p, x, cfg)
  np.testing.assert_array_equal(stats["counts_e"], [0, 3, 0, 0])


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias"])
def test_gradients_are_finite_at_perfectly_balanced_load(router):
  cfg = dataclasses.replace(with_moe(router=router, top_k=2), dtype="bfloat16")
  p = identity_router_params(cfg)
  # token i prefers experts i and i+1 (mod 4): every expert gets exactly the same load ...
  x = jnp.tile((jnp.eye(4) + 0.5 * jnp.roll(jnp.eye(4), 1, axis=1)).astype(jnp.bfloat16)[None], (2, 1, 1))
  # ... and, with a zero router, every token ties across all experts.
  for params in (p, p | {"router": jnp.zeros((4, 4))}):
    if router == "sigmoid_bias":
      params = params | {"bias": jnp.zeros((4,))}

    def loss(params, x):
      y, aux, _ = moe_eager(params, x, cfg)
      return jnp.sum(y.astype(jnp.float32)) + sum(aux["losses"].values())

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for leaf in jax.tree.leaves(g):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  _, aux, _ = moe(p, x, cfg)
  np.testing.assert_allclose(aux["metrics"]["moe_expert_load"], [0.25] * 4)


def test_load_balance_and_z_loss_against_hand_computed_values():
  probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]])
  cfg = with_moe(load_balance_weight=0.5, router_z_weight=0.25)
  x = jnp.asarray(np.log(probs)[None], jnp.float32)  # logits = log p: softmax gives p back
  _, aux, _ = moe(identity_router_params(cfg), x, cfg)
  # top-1 experts 0, 1, 0: f = (2/3, 1/3, 0, 0); P = mean of the rows
  f = np.array([2 / 3, 1 / 3, 0, 0])
  p_mean = probs.mean(0)
  lb = 4 * np.sum(f * p_mean)
  np.testing.assert_allclose(aux["losses"]["moe_load_balance"], 0.5 * lb, rtol=1e-6)
  np.testing.assert_allclose(aux["losses"]["moe_router_z"], 0.0, atol=1e-6)  # logsumexp(log p) = 0
  np.testing.assert_allclose(aux["metrics"]["moe_expert_load"], f, rtol=1e-6)
  entropy = -np.sum(probs * np.log(probs), axis=1).mean()
  np.testing.assert_allclose(aux["metrics"]["moe_router_entropy"], entropy, rtol=1e-5)
  # z-loss with non-normalised logits: mean(logsumexp^2)
  logits = np.array([[[2.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
  _, aux, _ = moe(identity_router_params(cfg), jnp.asarray(logits, jnp.float32), cfg)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(aux["losses"]["moe_router_z"], 0.25 * np.mean(lse**2), rtol=1e-6)
  # the formulas on their own
  np.testing.assert_allclose(load_balance_loss(jnp.array([2.0, 1, 0, 0]), jnp.asarray(probs.sum(0)), jnp.array(3.0)), lb, rtol=1e-6)
  np.testing.assert_allclose(router_z_loss(jnp.array(8.0), jnp.array(4.0)), 2.0)
  # uniform routing scores 1 (the loss's minimum for a fixed f = uniform)
  np.testing.assert_allclose(load_balance_loss(jnp.ones(4), jnp.full(4, 2.0), jnp.array(8.0)), 1.0)


def test_bias_update_rule():
  bias = jnp.array([0.0, 0.1, -0.2, 0.0])
  load = jnp.array([5.0, 1.0, 2.0, 0.0])  # mean 2: expert 0 overloaded, 1 and 3 under, 2 exact
  np.testing.assert_allclose(update_bias(bias, load, 0.01), [-0.01, 0.11, -0.2, 0.01], rtol=1e-6)


def test_bias_steers_selection_not_weights_and_updates_only_in_training():
  cfg = with_moe(router="sigmoid_bias", top_k=2, bias_update_rate=0.1, route_scale=2.5)
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  layer.router[...] = jnp.eye(4)
  x = jnp.asarray([[[3.0, 2.0, 1.0, 0.0]] * 4])  # every token prefers experts 0 and 1
  mask = jnp.ones((1, 4), bool)
  scores = jax.nn.sigmoid(x[0, 0])
  r = ROUTERS.get("sigmoid_bias")(x, cfg.moe, mask_bl=mask, bias_e=jnp.array([0.0, 0.0, 0.0, 5.0]))
  np.testing.assert_array_equal(r.expert_n[:2], [3, 0])  # the bias moved expert 3 in ...
  w = np.array([scores[3], scores[0]])
  np.testing.assert_allclose(r.weight_n[:2], 2.5 * w / w.sum(), rtol=1e-6)  # ... but weights use the raw scores
  layer(x)  # training forward: loads (4, 4, 0, 0) -> bias += 0.1 * sign(2 - load)
  np.testing.assert_allclose(layer.bias[...], [-0.1, -0.1, 0.1, 0.1], rtol=1e-6)
  layer.eval()
  layer(x)
  np.testing.assert_allclose(layer.bias[...], [-0.1, -0.1, 0.1, 0.1], rtol=1e-6)


def test_expert_choice_gives_every_expert_its_capacity():
  cfg = dataclasses.replace(with_moe(router="expert_choice", top_k=2, capacity_factor=1.0, allow_noncausal_routing=True), d_model=4)
  x = jax.random.normal(jax.random.key(0), (2, 8, 4))
  _, aux, stats = moe(identity_router_params(cfg), x, cfg)
  c = math.ceil(1.0 * 8 * 2 / 4)
  np.testing.assert_array_equal(stats["counts_e"], [2 * c] * 4)
  assert float(aux["metrics"]["moe_dropped_fraction"]) == 0.0
  r = ROUTERS.get("expert_choice")(x, cfg.moe, mask_bl=jnp.ones((2, 8), bool))
  # each expert took its c highest-probability tokens of each sequence
  probs = np.asarray(jax.nn.softmax(x, -1))
  for b in range(2):
    for e in range(4):
      picked = set(np.asarray(r.token_n).reshape(2, 4, c)[b, e] - b * 8)
      assert picked == set(np.argsort(-probs[b, :, e], kind="stable")[:c])


def test_jitter_only_in_training_and_deterministic_in_eval():
  cfg = with_moe(jitter=0.5, top_k=2)
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  layer.router[...] = jax.random.normal(jax.random.key(1), (4, 4))
  x = jax.random.normal(jax.random.key(2), (2, 16, 4))
  call = nnx.jit(lambda layer, x: layer(x)[0])
  a, b = call(layer, x), call(layer, x)
  assert not np.allclose(a, b)  # a fresh draw per training call
  assert int(layer.jitter_step[0]) == 2
  layer.eval()
  c, d = call(layer, x), call(layer, x)
  np.testing.assert_array_equal(c, d)
  p = {"router": layer.router[...], "w_gate": layer.experts.w_gate[...], "w_up": layer.experts.w_up[...], "w_down": layer.experts.w_down[...]}
  np.testing.assert_allclose(c, moe(p, x, cfg)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(top_k=9), "model.moe.top_k must be in [1, n_experts=8], got 9"),
        (dict(mode="capacity", capacity_factor=0.0), "model.moe.capacity_factor must be > 0 with model.moe.mode='capacity'"),
        (dict(mode="capacity", capacity_factor=-1.0), "model.moe.capacity_factor must be > 0"),
        (dict(router="expert_choice"), "model.moe.allow_noncausal_routing=true to opt in"),
        (dict(router="nosuch"), "model.moe.router must be one of"),
    ],
)
def test_bad_config_is_a_config_error_naming_the_field(overrides, message):
  with pytest.raises(ConfigError, match=None) as e:
    MoEConfig(**overrides)
  assert message in str(e.value)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.moe.top_k=9"], "model.moe.top_k must be in [1, n_experts=8], got 9"),
        (["mesh.expert=8", "mesh.fsdp=1", "model.moe.n_experts=12"], "model.moe.n_experts (12) must be divisible by the expert mesh axis (mesh.expert = 8)"),
        (["model.moe.mode=capacity", "model.moe.capacity_factor=0"], "model.moe.capacity_factor must be > 0 with model.moe.mode='capacity', got 0.0"),
        (["model.moe.router=expert_choice"], "model.moe.router='expert_choice' lets a token's routing depend on later tokens"),
    ],
)
def test_bad_input_on_the_command_line_is_one_line_exit_2(sets, message, tmp_path, capsys):
  run_dir = tmp_path / "run"
  argv = ["train", "moe_quickstart:smoke", "--run-dir", str(run_dir)]
  for s in sets:
    argv += ["--set", s]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and message in err, err
  assert "\n" not in err
  assert not run_dir.exists()
