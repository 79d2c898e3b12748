"""GW-MoE (jaxlm/layers/moe/gw.py): exactly the tokens whose router entropy reaches the threshold
are broadcast, each to every expert weighted by its router probabilities (against a numpy
hand computation); inference is the plain MoE bit for bit; causal; expert-parallel equals one
device; bad thresholds are one-line errors."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import sharding
from jaxlm.cli import main
from jaxlm.config import MeshConfig, ModelConfig, MoEConfig
from jaxlm.layers.moe import MoE, gw, moe
from jaxlm.layers.moe.routing import softmax_topk

E, D = 8, 16
BASE = ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=16, ffn="moe", dtype="float32", moe=MoEConfig(n_experts=E, top_k=2))
F = 16
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(4, 8, D)), jnp.float32)


def with_moe(cfg: ModelConfig = BASE, **kw) -> ModelConfig:
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **kw))


@pytest.fixture(scope="module")
def params():
  r = np.random.default_rng(5)
  normal = lambda shape, scale: jnp.asarray(r.normal(size=shape) * scale, jnp.float32)
  # A router spread so that about half the tokens have H / log E >= 0.7 (softmax).
  return {"router": normal((D, E), 0.4), "w_gate": normal((E, D, F), 0.25), "w_up": normal((E, D, F), 0.25), "w_down": normal((E, F, D), 0.25)}


moe_jit = jax.jit(lambda p, x, cfg: moe(p, x, cfg)[:2], static_argnums=2)


# -- which tokens ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=2)
def route(logits_ble, mask_bl, cfgs):
  """(normalized entropies, and for each config the router's and GW's assignments): one compile."""
  out = []
  for cfg in cfgs:
    routing = softmax_topk(logits_ble, cfg, mask_bl=mask_bl)
    sparse, ws = gw.split(routing, mask_bl, cfg)
    out.append((routing.expert_n, sparse.expert_n, sparse.weight_n, ws.token_s, ws.weight_se))
  return gw.normalized_entropy(routing.probs_te), out


def test_broadcasts_exactly_the_tokens_at_or_above_the_threshold():
  """Four experts, hand-made router distributions with known entropies (fractions of log 4)."""
  ninf = -1e9
  logits = np.array(
      [
          [[0, 0, 0, 0], [0, 0, ninf, ninf], [9, 0, 0, 0], np.log([0.7, 0.1, 0.1, 0.1])],  # H/log4 = 1, 0.5, ~0.003, 0.678
          [np.log([0.4, 0.3, 0.2, 0.1]), [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],  # 0.923, 1, 1 (padding), 1
      ],
      np.float32,
  )
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1) / math.log(4)
  np.testing.assert_allclose(h[0, :2], [1.0, 0.5], rtol=1e-6)
  mask = np.ones((2, 4), bool)
  mask[1, 2] = False  # padding is never broadcast
  cases = ((0.6, 0), (0.4, 9), (0.95, 1))  # (threshold, slots)
  cfgs = tuple(MoEConfig(n_experts=4, top_k=2, route_scale=1.5, gw_threshold=t, gw_slots=s) for t, s in cases)
  entropy, outs = route(jnp.asarray(logits), jnp.asarray(mask), cfgs)
  np.testing.assert_allclose(np.asarray(entropy), h.reshape(-1), rtol=1e-5, atol=1e-6)

  def broadcast_set(i):
    expert_n, sparse_expert_n, sparse_weight_n, token_s, weight_se = outs[i]
    chosen = sorted(int(t) for t in token_s if t < 8)
    # Broadcast tokens leave their top-k (sentinel expert 4, weight 0); the others keep theirs.
    is_b = np.isin(np.repeat(np.arange(8), 2), chosen)
    np.testing.assert_array_equal(np.asarray(sparse_expert_n)[is_b], 4)
    np.testing.assert_array_equal(np.asarray(sparse_expert_n)[~is_b], np.asarray(expert_n)[~is_b])
    np.testing.assert_array_equal(np.asarray(sparse_weight_n)[is_b], 0.0)
    # Every slot holds its token's router probabilities times route_scale (0 when empty).
    token_s = np.asarray(token_s)
    want = np.where((token_s < 8)[:, None], p.reshape(8, 4)[np.minimum(token_s, 7)] * 1.5, 0.0)
    np.testing.assert_allclose(np.asarray(weight_se), want, rtol=1e-6, atol=1e-7)
    return chosen

  # Expected sets from the hand entropies: tokens are 0-3 (row 0) and 4-7 (row 1); 6 is padding.
  assert broadcast_set(0) == [0, 3, 4, 5, 7]  # H >= 0.6
  assert broadcast_set(1) == [0, 1, 3, 4, 5, 7]  # H >= 0.4: 0.5 included, 0.003 not; a cap above L is no cap
  assert broadcast_set(2) == [0, 5]  # H >= 0.95, one slot per sequence: the first uncertain token


# -- what they compute ----------------------------------------------------------------------------


def _swiglu_all(p, x_td):
  """numpy float64 [E, T, D]: every expert on every token."""
  x = np.asarray(x_td, np.float64)
  g = np.einsum("td,edf->etf", x, np.asarray(p["w_gate"], np.float64))
  u = np.einsum("td,edf->etf", x, np.asarray(p["w_up"], np.float64))
  return np.einsum("etf,efd->etd", g / (1 + np.exp(-g)) * u, np.asarray(p["w_down"], np.float64))


def _by_hand(p, x_bld, cfg: MoEConfig):
  """(y [B, L, D], broadcast [B, L]) of a GW-MoE layer in training, in numpy float64."""
  b, l, d = x_bld.shape
  x = np.asarray(x_bld, np.float64).reshape(-1, d)
  logits = x @ np.asarray(p["router"], np.float64)
  if cfg.router == "softmax_topk":
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    score = probs
  else:  # sigmoid_bias (no bias here): weights from the sigmoid affinities, normalised to sum 1
    score = 1 / (1 + np.exp(-logits))
    probs = score / score.sum(-1, keepdims=True)
  h = -np.sum(probs * np.log(probs), -1) / math.log(cfg.n_experts)
  uncertain = (h >= cfg.gw_threshold).reshape(b, l)
  rank = np.cumsum(uncertain, axis=1) - 1
  broadcast = (uncertain & ((rank < cfg.gw_slots) if cfg.gw_slots else True)).reshape(-1)
  top = np.argsort(-score, axis=-1, kind="stable")[:, : cfg.top_k]
  w_sparse = np.zeros_like(probs)
  np.put_along_axis(w_sparse, top, np.take_along_axis(score, top, -1), -1)
  w_sparse /= w_sparse.sum(-1, keepdims=True)  # renormalize over the k chosen
  w = np.where(broadcast[:, None], probs, w_sparse) * cfg.route_scale
  y = np.einsum("te,etd->td", w, _swiglu_all(p, x))
  return y.reshape(b, l, d), broadcast.reshape(b, l)


def gw_cfg(router="softmax_topk", threshold=0.7, slots=0, mode="dropless"):
  """Capacity mode with room for every assignment (factor 4: C = L), so that nothing drops."""
  return with_moe(router=router, gw_threshold=threshold, gw_slots=slots, route_scale=1.5, mode=mode, capacity_factor=4.0)


CAUSAL = gw_cfg(slots=2, mode="capacity")  # (one compiled layer for both tests)


@pytest.mark.parametrize(
    "router, threshold, slots, mode",
    [
        ("softmax_topk", 0.7, 0, "dropless"),
        pytest.param("softmax_topk", 0.7, 2, "capacity", marks=pytest.mark.slow),  # make test-all: one more compile each
        pytest.param("sigmoid_bias", 0.93, 0, "dropless", marks=pytest.mark.slow),
    ],
)
def test_training_path_equals_dense_combine_for_broadcast_tokens(params, router, threshold, slots, mode):
  cfg = gw_cfg(router, threshold, slots, mode)
  want, broadcast = _by_hand(params, X, cfg.moe)
  assert 0 < broadcast.sum() < broadcast.size  # both kinds of token are in the batch
  y, aux = moe_jit(params, X, cfg)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(aux["metrics"]["moe_gw_broadcast_fraction"]), broadcast.mean(), rtol=1e-6)
  if slots or router != "softmax_topk":
    return
  # The router's losses and metrics are those of its top-k choice: as without GW.
  _, plain_aux = moe_jit(params, X, with_moe(route_scale=1.5, capacity_factor=4.0))
  for k in ("moe_load_balance", "moe_router_z"):
    np.testing.assert_array_equal(aux["losses"][k], plain_aux["losses"][k])
  np.testing.assert_array_equal(aux["metrics"]["moe_expert_load"], plain_aux["metrics"]["moe_expert_load"])


# -- inference --------------------------------------------------------------------------------------


def test_inference_equals_the_plain_moe_bitwise(params):
  """model.eval() (deterministic): the GW-MoE layer is the plain MoE on the same weights, bit for
  bit; in training it broadcasts (and reports the fraction); evaluation has no broadcast metric."""
  layer = nnx.eval_shape(lambda: MoE(gw_cfg(), rngs=nnx.Rngs(0)))  # (no init to compile)
  for v, k in ((layer.router, "router"), (layer.experts.w_gate, "w_gate"), (layer.experts.w_up, "w_up"), (layer.experts.w_down, "w_down")):
    v.set_value(params[k])

  @nnx.jit
  def train_and_eval(m, x):
    train = m(x)
    m.eval()
    out = train, m(x)
    m.train()
    return out

  (y_train, aux_train), (y_eval, aux_eval) = train_and_eval(layer, X)
  y_plain, _ = moe_jit(params, X, with_moe(route_scale=1.5, capacity_factor=4.0))
  np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y_plain))
  np.testing.assert_allclose(np.asarray(y_train), np.asarray(moe_jit(params, X, gw_cfg())[0]), rtol=1e-6, atol=1e-6)
  assert float(aux_train["metrics"]["moe_gw_broadcast_fraction"]) > 0.1
  assert float(jnp.max(jnp.abs(y_train - y_plain))) > 1e-3
  assert "moe_gw_broadcast_fraction" not in aux_eval["metrics"]


# -- causality and expert parallelism ---------------------------------------------------------------


def test_causal(params):
  """Perturbing token j (to zeros: a flat router, so it joins the workspace and may push a later
  token out of the capped slots) leaves every earlier token's output unchanged."""
  cfg = CAUSAL
  j = 1
  y, _ = moe_jit(params, X, cfg)
  y2, _ = moe_jit(params, X.at[:, j].set(0.0), cfg)
  np.testing.assert_allclose(np.asarray(y2[:, :j]), np.asarray(y[:, :j]), rtol=0, atol=1e-6)
  assert float(jnp.max(jnp.abs(y2[:, j] - y[:, j]))) > 1e-3
  _, b1 = _by_hand(params, X, cfg.moe)
  _, b2 = _by_hand(params, X.at[:, j].set(0.0), cfg.moe)
  assert b2[:, j].all() and (b1[:, j + 1 :] != b2[:, j + 1 :]).any()  # it took a slot a later token held


@pytest.mark.slow  # make test-all: the 8-device compile; test_training_path_* checks the same combine on one device
def test_expert_parallel_equals_one_device(params):
  """8 devices: experts split over expert=4 (the slots all-gathered, the partial combinations
  reduce-scattered; the sparse part's padded all-to-all), hidden units over tensor=2: the same
  outputs and broadcast fraction as the one-device hand computation."""
  cfg = gw_cfg(slots=3)
  want, broadcast = _by_hand(params, X, cfg.moe)
  with jax.set_mesh(sharding.make_mesh(MeshConfig(expert=4, tensor=2, fsdp=1))):
    y, aux = moe_jit(params, X, cfg)
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(float(aux["metrics"]["moe_gw_broadcast_fraction"]), broadcast.mean(), rtol=1e-6)


def test_router_learns_from_the_broadcast_weights(params):
  """Top-1 renormalised: the plain layer's weight is 1, so the router gets no gradient from the
  output; with GW-MoE the broadcast tokens' output depends on all E probabilities."""
  cfg = with_moe(gw_threshold=0.7, top_k=1)
  loss = lambda r: jnp.sum(moe(dict(params, router=r), X, cfg)[0] * jnp.cos(jnp.arange(D)))
  assert float(jnp.max(jnp.abs(jax.jit(jax.grad(loss))(params["router"])))) > 1e-3


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.moe.gw_threshold=1.0"], "model.moe.gw_threshold is a fraction of the largest router entropy log E: must be in (0, 1)"),
        (["model.moe.gw_threshold=-0.2"], "model.moe.gw_threshold is a fraction"),
        (["model.moe.gw_threshold=0.8", "model.moe.gw_slots=-1"], "model.moe.gw_slots must be >= 0"),
        (["model.moe.router=expert_choice", "model.moe.allow_noncausal_routing=true", "model.moe.gw_threshold=0.8"], "it needs router softmax_topk or sigmoid_bias, not 'expert_choice'"),
    ],
)
def test_bad_input_is_one_line_exit_2(sets, message, tmp_path, capsys):
  run_dir = tmp_path / "run"
  argv = ["train", "moe_quickstart:smoke", "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and message in err, err
  assert "\n" not in err and "Traceback" not in err
  assert not run_dir.exists()
