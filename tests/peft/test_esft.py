"""ESFT: the selection rule by hand, the scores equal the router's probabilities computed by hand,
training moves exactly the chosen experts (unrolled and scanned), merging is exact, abstract
models get a placeholder choice."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import peft, sharding
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, MoEConfig, OptimConfig, PeftConfig, TrainConfig
from jaxlm.errors import ConfigError
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
SCANNED = dataclasses.replace(EXP, mesh=MeshConfig(fsdp=-1), model=dataclasses.replace(MODEL, scan_layers=True))  # on one device
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


# -- measuring -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
  """The base model measure() scores, built the same way, on the same mesh."""
  mesh = sharding.make_mesh(EXP.mesh)
  rules = sharding.make_rules(EXP.mesh.rules)
  return run.initial_model(dataclasses.replace(EXP, peft=PeftConfig()), mesh, rules), mesh, rules


@pytest.fixture(scope="module")
def measured():
  return esft.measure(EXP, None, [batch(0), batch(1, pad=5)])


def hand_scores(model, mesh, rules, batches):
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
    with sharding.use_rules(rules), jax.set_mesh(mesh):
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
  gate, token, n = hand_scores(*base, [batch(0), batch(1, pad=5)])
  assert measured["tokens"] == n < 2 * 8 * 16  # padding is not scored
  np.testing.assert_allclose(measured["gate"], gate, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(measured["token"], token, rtol=1e-5, atol=1e-7)
  assert not np.allclose(gate, token, atol=1e-3)  # the two scores really differ
  assert measured["experts"] == esft.select_experts(gate, 0.5)
  assert measured["layers"] == [0, 1] and measured["score"] == "gate"


def test_errors(base):
  model = base[0]
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


# -- training --------------------------------------------------------------------------------


def host(tree):
  return jax.tree.map(np.asarray, tree)


def plain_weights(setup, state):
  """{path: array} of the merged (plain) model's parameters."""
  model = peft.merge(nnx.merge(setup.graphdef, state.params, state.frozen, state.rest))
  return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module", params=["unrolled", "scanned"])
def trained(request):
  exp, devices = (EXP, None) if request.param == "unrolled" else (SCANNED, jax.devices()[:1])
  setup = loop.prepare(exp, devices, peft_inputs={"experts": CHOSEN, "gate": [[0.25] * 4] * 2})
  before = plain_weights(setup, setup.state)
  state = setup.state
  with jax.set_mesh(setup.mesh):
    for i in range(3):
      state, _ = setup.train_step(state, loop.to_global(batch(i), setup.batch_sharding))
  return exp, setup, before, state


def test_only_the_chosen_experts_train(trained):
  exp, setup, before, state = trained
  scanned = exp.model.scan_layers
  after = plain_weights(setup, state)
  assert set(after) == set(before)
  changed = set()
  for path, w0 in before.items():
    w1 = after[path]
    if not path.split("/")[-1] in ("w_gate", "w_up", "w_down"):
      np.testing.assert_array_equal(w1, w0, err_msg=path)  # router, attention, norms, embeddings
      continue
    for layer in range(2):
      if scanned:
        a0, a1 = w0[layer], w1[layer]
      elif path.startswith(f"blocks/{layer}/"):
        a0, a1 = w0, w1
      else:
        continue
      for e in range(4):
        if e in CHOSEN[layer]:
          assert not np.array_equal(a1[e], a0[e]), (path, layer, e)
          changed.add((layer, e))
        else:
          np.testing.assert_array_equal(a1[e], a0[e], err_msg=f"{path} layer {layer} expert {e}")
  assert changed == {(0, 0), (0, 2), (1, 3)}


def test_optimizer_holds_only_the_chosen_experts(trained):
  exp, setup, _, state = trained
  d, f = MODEL.d_model, MODEL.d_ff
  k_max = max(len(c) for c in CHOSEN)
  n_delta = sum(x.size for x in jax.tree.leaves(state.params))
  want = 3 * d * f * (2 * k_max if exp.model.scan_layers else sum(len(c) for c in CHOSEN))  # scanned: padded to K
  assert n_delta == want
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2)
  assert moments == 2 * n_delta  # Adam's two moments, for the deltas only
  chosen = {"/".join(map(str, p[:2])): np.asarray(v.get_value()).tolist() for p, v in nnx.to_flat_state(state.rest) if p[-1] == "chosen"}
  if exp.model.scan_layers:
    assert chosen == {"units/blocks": [[0, 2], [3, 4]]}  # layer 1 padded with E = 4 (dropped)
  else:
    assert chosen == {"blocks/0": [0, 2], "blocks/1": [3]}


def test_merge_reproduces_the_adapted_logits(trained):
  _, setup, _, state = trained
  b = batch(7)
  model = nnx.merge(setup.graphdef, host(state.params), host(state.frozen), host(state.rest))
  fwd = nnx.jit(lambda m, t, s, p: m(t, segment_ids=s, positions=p)[0])  # on one device: host weights, no mesh
  adapted = np.asarray(fwd(model, b["inputs"], b["segment_ids"], b["positions"]))
  merged = np.asarray(fwd(peft.merge(model), b["inputs"], b["segment_ids"], b["positions"]))
  assert not peft.adapted_modules(model)
  np.testing.assert_allclose(merged, adapted, rtol=1e-6, atol=1e-6)


# -- abstract models ----------------------------------------------------------------------------


def test_abstract_prepare_uses_a_placeholder_choice():
  setup = loop.prepare(SCANNED, abstract=True)  # no measurement: the first ceil(0.5 * 4) = 2 experts
  leaves = jax.tree.leaves(setup.state.params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sorted(x.shape for x in leaves) == sorted([(2, 2, 16, 32)] * 2 + [(2, 2, 32, 16)])
  assert sum(x.size for x in leaves) == 3 * 2 * 2 * 16 * 32
  assert esft.placeholder_experts(MODEL, 0.2) == [[0], [0]]
