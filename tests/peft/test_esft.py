"""ESFT: the selection rule by hand; the scores equal the router's probabilities computed by hand;
the trainer moves exactly the chosen experts (on an expert-parallel mesh) and keeps optimizer
moments for them only; merging is exact; a scanned model with the same weights and deltas gives
the same logits (its padding slot ignored); abstract models get a placeholder choice.

One trainer run (module fixture) provides the base model that the other tests score and compare:
building and compiling dominate this file's time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import peft
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, MoEConfig, OptimConfig, PeftConfig, TrainConfig
from jaxlm.errors import ConfigError
from jaxlm.models import abstract_model
from jaxlm.models.build import load_unrolled_into_scanned
from jaxlm.peft import esft
from jaxlm.train import loop, run

MODEL = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, dtype="float32", ffn="moe", moe=MoEConfig(n_experts=4, top_k=2))
EXP = Experiment(
    name="esft_test",
    mesh=MeshConfig(data=2, fsdp=2, expert=2),
    model=MODEL,
    # A sentencepiece model is named only so that vocab 64 passes validation; no data is read.
    data=DataConfig(seq_len=16, batch_size=8, tokenizer="sentencepiece", sp_model="unused.model"),
    optim=OptimConfig(lr=1e-2, warmup_steps=1),
    train=TrainConfig(steps=10),
    peft=PeftConfig(method="esft", esft_top_p=0.5),
)
SCANNED = dataclasses.replace(EXP, model=dataclasses.replace(MODEL, scan_layers=True))
CHOSEN = [[0, 2], [3]]  # layer 0 trains experts 0 and 2, layer 1 expert 3


def batch(seed, pad=0, b=8, l=16):
  """Packed rows (segments 1..3) of random tokens; the last `pad` positions of odd rows are padding."""
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(1, 4, (b, l)), axis=1).astype(np.int32)
  if pad:
    seg[1::2, l - pad :] = 0
  pos = np.zeros_like(seg)
  for i in range(b):
    for j in range(1, l):
      pos[i, j] = pos[i, j - 1] + 1 if seg[i, j] == seg[i, j - 1] else 0
  toks = rng.integers(0, 64, (b, l + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos, "loss_mask": (seg > 0).astype(np.int32)}


# -- the selection rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, top_p, want",
    [
        ([0.5, 0.3, 0.15, 0.05], 0.6, [0, 1]),
        ([0.5, 0.3, 0.15, 0.05], 0.5, [0]),  # reaching top_p exactly is enough (eq. 8: >=)
        ([0.5, 0.3, 0.15, 0.05], 0.81, [0, 1, 2]),
        ([0.05, 0.15, 0.3, 0.5], 0.6, [2, 3]),  # by score, not by index
        ([10.0, 6.0, 3.0, 1.0], 0.6, [0, 1]),  # unnormalised scores: shares of the row's total
        ([0.4, 0.2, 0.2, 0.2], 0.5, [0, 1]),  # a tie for the last place goes to the lower index
        ([0.2, 0.3, 0.3, 0.2], 0.4, [1, 2]),
        ([0.25, 0.25, 0.25, 0.25], 0.5, [0, 1]),
        ([0.5, 0.3, 0.15, 0.05], 1.0, [0, 1, 2, 3]),
        ([0.7, 0.3, 0.0, 0.0], 1.0, [0, 1, 2, 3]),  # top_p = 1: every expert, unscored ones too
        ([0.05, 0.05, 0.1, 0.8], 0.01, [3]),  # always at least one
    ],
)
def test_select_experts_by_hand(scores, top_p, want):
  assert esft.select_experts([scores], top_p) == [want]


def test_select_experts_per_layer():
  assert esft.select_experts([[0.5, 0.3, 0.15, 0.05], [0.1, 0.1, 0.1, 0.7]], 0.7) == [[0, 1], [3]]


def test_layer_to_parameter_path():
  cfg = ModelConfig(n_layers=7, scan_layers=True, first_k_dense=1, ffn_every=2, ffn="moe")
  assert esft.moe_layers(cfg) == [1, 3, 5]
  assert [esft.expert_bank(cfg, i) for i in (1, 3, 5)] == [(("units", "blocks", 0, "ffn", "experts"), u) for u in range(3)]
  assert esft.expert_bank(dataclasses.replace(cfg, scan_layers=False), 3) == (("blocks", 3, "ffn", "experts"), None)


# -- one trainer run ----------------------------------------------------------------------------


def host(tree):
  return jax.tree.map(np.asarray, tree)


def plain(model):
  """{path: array} of a model's parameters (merge it first)."""
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def trained():
  """(setup, host copy of the initial (params, frozen, rest), state after 3 steps)."""
  setup = loop.prepare(EXP, peft_inputs={"experts": CHOSEN, "gate": [[0.25] * 4] * 2})  # other recorded keys are ignored
  start = host((setup.state.params, setup.state.frozen, setup.state.rest))
  state = setup.state
  with jax.set_mesh(setup.mesh):
    for i in range(3):
      state, _ = setup.train_step(state, loop.to_global(batch(i), setup.batch_sharding))
  return setup, start, state


@pytest.fixture(scope="module")
def base(trained):
  """The base model (the initial state merged: its deltas are zero), on host arrays."""
  setup, start, _ = trained
  return peft.merge(nnx.merge(setup.graphdef, *start))


@pytest.fixture(scope="module")
def adapted(trained):
  """The trained adapted model, on host arrays."""
  setup, _, state = trained
  return nnx.merge(setup.graphdef, *host((state.params, state.frozen, state.rest)))


fwd = nnx.jit(lambda m, b: m(b["inputs"], segment_ids=b["segment_ids"], positions=b["positions"])[0])


def test_only_the_chosen_experts_train(base, adapted):
  before, after = plain(base), plain(peft.merge(nnx.clone(adapted)))
  assert set(after) == set(before)
  changed = set()
  for path, w0 in before.items():
    w1 = after[path]
    if path.split("/")[-1] not in ("w_gate", "w_up", "w_down"):
      np.testing.assert_array_equal(w1, w0, err_msg=path)  # router, attention, norms, embeddings
      continue
    layer = int(path.split("/")[1])
    for e in range(4):
      if e in CHOSEN[layer]:
        assert not np.array_equal(w1[e], w0[e]), (path, e)
        changed.add((layer, e))
      else:
        np.testing.assert_array_equal(w1[e], w0[e], err_msg=f"{path} expert {e}")
  assert changed == {(0, 0), (0, 2), (1, 3)}


def test_optimizer_holds_only_the_chosen_experts(trained):
  setup, _, state = trained
  n_delta = sum(x.size for x in jax.tree.leaves(state.params))
  assert n_delta == 3 * MODEL.d_model * MODEL.d_ff * sum(len(c) for c in CHOSEN)
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2) == 2 * n_delta  # Adam's two moments
  chosen = {"/".join(map(str, p[:-1])): np.asarray(v.get_value()).tolist() for p, v in nnx.to_flat_state(state.rest) if p[-1] == "chosen"}
  assert chosen == {f"blocks/{i}/ffn/experts/{w}": CHOSEN[i] for i in range(2) for w in ("w_gate", "w_up", "w_down")}
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.frozen) if x.ndim == 3}
  assert any("expert" in s for s in specs)  # the expert banks really are split over the expert axis


def test_merge_reproduces_the_adapted_logits(adapted):
  b = batch(7)
  want = np.asarray(fwd(adapted, b))
  merged = peft.merge(nnx.clone(adapted))
  assert not peft.adapted_modules(merged)  # a plain model again
  np.testing.assert_allclose(np.asarray(fwd(merged, b)), want, rtol=1e-6, atol=1e-6)


def test_adapter_file_round_trip(base, adapted, tmp_path):
  """The adapter alone (the deltas) with the measured experts: loaded onto the base, same logits."""
  b = batch(7)
  peft.save_adapter(adapted, tmp_path, EXP.peft, model_cfg=MODEL, inputs={"experts": CHOSEN})
  loaded = peft.load_adapter(nnx.clone(base), tmp_path)
  np.testing.assert_allclose(np.asarray(fwd(loaded, b)), np.asarray(fwd(adapted, b)), rtol=1e-6, atol=1e-6)


def test_scanned_equals_unrolled(base, adapted):
  """The same weights and deltas in a scanned model: the same logits; layer 1's padding slot
  (index E) holds garbage that must not matter; merging places every delta like the unrolled."""
  scanned = abstract_model(SCANNED.model)
  load_unrolled_into_scanned(base, scanned)
  peft.apply(scanned, SCANNED.peft, experts=CHOSEN)
  for name in ("w_gate", "w_up", "w_down"):
    mod = getattr(scanned.units.blocks[0].ffn.experts, name)
    np.testing.assert_array_equal(mod.chosen[...], [[0, 2], [3, 4]])  # layer 1 padded with E = 4
    d0, d1 = (np.asarray(getattr(adapted.blocks[i].ffn.experts, name).delta[...]) for i in range(2))
    mod.delta.set_value(np.stack([d0, np.concatenate([d1, np.full_like(d1, 7.0)])]))
  b = batch(7)
  np.testing.assert_allclose(np.asarray(fwd(scanned, b)), np.asarray(fwd(adapted, b)), rtol=1e-5, atol=1e-5)
  got, want = plain(peft.merge(scanned)), plain(peft.merge(nnx.clone(adapted)))
  for name in ("w_gate", "w_up", "w_down"):
    stacked = got[f"units/blocks/0/ffn/experts/{name}"]
    for i in range(2):
      np.testing.assert_array_equal(stacked[i], want[f"blocks/{i}/ffn/experts/{name}"])


# -- measuring -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(base):
  return esft.measure(EXP, None, [batch(0), batch(1, pad=5)], model=nnx.clone(base))


def hand_scores(model, batches):
  """Gate scores and selection ratios from the router weights and the MoE inputs, in numpy."""

  @nnx.jit
  def router_inputs(model, tokens, seg, pos):
    x, out = model.embed(tokens), []
    for block in model.blocks:
      h, _ = block.attn(block.attn_norm(x), positions=pos, segment_ids=seg)
      out.append(block.ffn_norm(x + h))
      x, _, _ = block(x, positions=pos, segment_ids=seg)
    return out

  k, e = MODEL.moe.top_k, MODEL.moe.n_experts
  gate, count = np.zeros((2, e)), np.zeros((2, e))
  for b in batches:
    us = router_inputs(model, b["inputs"], b["segment_ids"], b["positions"])
    valid = b["segment_ids"].reshape(-1) > 0
    for layer, (u, block) in enumerate(zip(us, model.blocks)):
      logits = np.asarray(u, np.float64).reshape(-1, MODEL.d_model) @ np.asarray(block.ffn.router[...], np.float64)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      chosen = np.zeros_like(p, bool)
      np.put_along_axis(chosen, np.argsort(-p, axis=-1)[:, :k], True, axis=-1)
      gate[layer] += (p * chosen)[valid].sum(0)  # eq. 6: g = s where chosen, else 0
      count[layer] += chosen[valid].sum(0) / k  # eq. 7
  return gate / gate.sum(-1, keepdims=True), count / count.sum(-1, keepdims=True), int(sum((b["segment_ids"] > 0).sum() for b in batches))


def test_measure_equals_router_by_hand(base, measured):
  gate, token, n = hand_scores(base, [batch(0), batch(1, pad=5)])
  assert measured["tokens"] == n < 2 * 8 * 16  # padding is not scored
  np.testing.assert_allclose(measured["gate"], gate, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(measured["token"], token, rtol=1e-5, atol=1e-7)
  assert not np.allclose(gate, token, atol=1e-3)  # the two scores really differ
  assert measured["experts"] == esft.select_experts(gate, 0.5)
  assert measured["layers"] == [0, 1] and measured["score"] == "gate"


def test_errors(base):
  model = nnx.clone(base)
  with pytest.raises(ConfigError, match="measured experts"):
    peft.apply(model, EXP.peft)  # a real model needs a measurement
  with pytest.raises(ConfigError, match="cover 1 MoE layers"):
    peft.apply(model, EXP.peft, experts=[[0]])
  with pytest.raises(ConfigError, match="distinct indices"):
    peft.apply(model, EXP.peft, experts=[[0, 4], [1]])
  with pytest.raises(ConfigError, match="no sparse MoE"):
    loop.prepare(dataclasses.replace(EXP, model=dataclasses.replace(MODEL, ffn="dense")), abstract=True)


def test_heatmap(tmp_path, measured):
  assert esft.experts_heatmap(tmp_path, []) is None  # no measurement in this run
  run.record(tmp_path, run.PEFT_INPUTS_FILE, measured)
  path = esft.experts_heatmap(tmp_path, [])
  assert path.is_file() and path.stat().st_size > 1000


def test_bf16_bank_adds_in_float32_and_leaves_other_experts_bitwise():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((4, 3, 5)).astype(jnp.bfloat16)
  mod = esft.ExpertDelta(nnx.Param(w, fan_in=(-2,)), np.array([2, 4]))  # expert 2, and a padding slot
  assert mod.delta.shape == (2, 3, 5) and mod.delta[...].dtype == np.float32
  delta = (rng.standard_normal((2, 3, 5)) * 1e-2).astype(np.float32)
  mod.delta.set_value(delta)
  got = np.asarray(mod[...])
  assert got.dtype == w.dtype
  np.testing.assert_array_equal(got[[0, 1, 3]], w[[0, 1, 3]])  # bitwise; the padding slot is dropped
  np.testing.assert_array_equal(got[2], (w[2].astype(np.float32) + delta[0]).astype(jnp.bfloat16))  # rounded once


# -- abstract models ----------------------------------------------------------------------------


def test_abstract_prepare_uses_a_placeholder_choice():
  setup = loop.prepare(SCANNED, abstract=True)  # no measurement: the first ceil(0.5 * 4) = 2 experts
  leaves = jax.tree.leaves(setup.state.params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sorted(x.shape for x in leaves) == sorted([(2, 2, 16, 32)] * 2 + [(2, 2, 32, 16)])
  assert esft.placeholder_experts(MODEL, 0.2) == [[0], [0]]
