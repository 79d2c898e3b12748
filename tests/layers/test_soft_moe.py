"""The soft-merged MoE layer: dense equivalence, one-hot merges, gradients, causality, packing."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig, SoftMoEConfig
from jaxlm.layers import MLP, SoftMergedMoE, swiglu
from jaxlm.layers.soft_moe import ExpertWeights, apply_merged, packed_layout, soft_moe
from jaxlm.layers.soft_moe.merge import MERGE
from jaxlm.models import Transformer

T = 4
CFG = ModelConfig(
    vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=24, dtype="float32", ffn="soft_moe",
    soft_moe=SoftMoEConfig(n_experts=4, segment_len=T),
)


def with_soft(cfg=CFG, **kw):
  return dataclasses.replace(cfg, soft_moe=dataclasses.replace(cfg.soft_moe, **kw))


def randn(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def params_of(layer):
  return layer.params()


@nnx.jit
def call(layer, x, segment_ids=None, positions=None):
  """The layer, jitted (eager dispatch of the scan and checkpoint is slow)."""
  return layer(x, segment_ids=segment_ids, positions=positions)


@nnx.jit
def call_dense(mlp, x):
  return mlp(x)[0]


def packed(lengths, total):
  """segment_ids / positions of documents of `lengths` packed into one row of `total` tokens."""
  seg, pos = [], []
  for i, n in enumerate(lengths):
    seg += [i + 1] * n
    pos += list(range(n))
  seg += [0] * (total - len(seg))
  pos += [0] * (total - len(pos))
  return jnp.asarray([seg], jnp.int32), jnp.asarray([pos], jnp.int32)


@pytest.mark.parametrize("granularity, packed_rows", [("segment", False), ("segment", True), ("sequence", True)])
def test_one_expert_equals_dense(granularity, packed_rows):
  cfg = with_soft(n_experts=1, granularity=granularity, allow_noncausal_routing=True)
  layer = SoftMergedMoE(cfg, rngs=nnx.Rngs(0))
  dense = MLP(cfg, rngs=nnx.Rngs(1))
  dense.w_gate[...], dense.w_up[...], dense.w_down[...] = layer.experts.w_gate[0], layer.experts.w_up[0], layer.experts.w_down[0]
  x = randn((2, 16, cfg.d_model))
  kw = {}
  if packed_rows:
    seg, pos = packed([5, 11], 16)
    kw = dict(segment_ids=jnp.concatenate([seg, jnp.ones_like(seg)]), positions=jnp.concatenate([pos, jnp.arange(16)[None]]))
  y, aux = call(layer, x, **kw)
  np.testing.assert_allclose(y, call_dense(dense, x), atol=1e-6)
  assert float(aux["metrics"]["soft_moe_entropy"]) == 0.0


def test_one_hot_weights_reproduce_the_chosen_expert():
  e, g, t, d, f = 4, 3, 5, 8, 12
  experts = ExpertWeights(randn((e, d, f), 1), randn((e, d, f), 2), randn((e, f, d), 3))
  choice = jnp.array([2, 0, 3])
  w_ge = jax.nn.one_hot(choice, e)
  assert MERGE.get("auto") is MERGE.get("einsum")  # "auto" is an alias: one merge to check
  merged = MERGE.get("einsum")(w_ge, experts.w_gate, mlp_axis=1)
  np.testing.assert_array_equal(merged, experts.w_gate[choice])  # 1 * w + 0 * others, bit for bit
  x = randn((1, g, t, d), 4)
  y = jax.jit(lambda x, w, ex: apply_merged(x, w, ex, merge=MERGE.get("einsum"), chunk=1))(x, w_ge[None], experts)
  for i, k in enumerate(choice.tolist()):
    np.testing.assert_allclose(y[0, i], swiglu(x[0, i][None], experts.w_gate[k], experts.w_up[k], experts.w_down[k])[0], rtol=1e-6, atol=1e-6)


def test_chunked_scan_equals_one_shot_and_gradients_agree():
  experts = ExpertWeights(randn((4, 8, 12), 1), randn((4, 8, 12), 2), randn((4, 12, 8), 3))
  x = randn((2, 6, 5, 8), 4)
  w = jax.nn.softmax(randn((2, 6, 4), 5))

  @partial(jax.jit, static_argnums=3)
  def loss_and_grad(x, w, ex, chunk):
    return jax.value_and_grad(lambda *a: jnp.sum(apply_merged(*a, merge=MERGE.get("einsum"), chunk=chunk) ** 2), argnums=(0, 1, 2))(x, w, ex)

  ref_loss, ref = loss_and_grad(x, w, experts, 0)
  for chunk in (1, 3):
    got_loss, got = loss_and_grad(x, w, experts, chunk)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _router_grad(cfg, positions_slice, x):
  cfg = dataclasses.replace(cfg, init_std=0.5)  # gradients well above float32 noise
  layer = SoftMergedMoE(cfg, rngs=nnx.Rngs(0))
  p = params_of(layer)

  @jax.jit
  def grad(router):
    return jax.grad(lambda r: jnp.sum(soft_moe({**p, "router": r}, x, cfg)[0][:, positions_slice] ** 2))(router)

  return grad(p["router"])


def test_router_gradient_from_segment_one_is_zero_in_paper_mode():
  x = randn((2, 16, CFG.d_model), 7)
  g1 = _router_grad(CFG, slice(0, T), x)
  assert float(jnp.max(jnp.abs(g1))) == 0.0
  g2 = _router_grad(CFG, slice(T, 2 * T), x)
  assert float(jnp.max(jnp.abs(g2))) > 1e-3  # segment 2 trains the router through segment 1's mean
  smear = with_soft(granularity="sequence", allow_noncausal_routing=True)
  assert float(jnp.max(jnp.abs(_router_grad(smear, slice(0, T), x)))) > 1e-3


@pytest.mark.parametrize("first_segment, packed_rows", [("paper", False), ("uniform", True)])
def test_causality_by_perturbation(first_segment, packed_rows):
  """Changing token t never changes the logits at positions < t, except (paper mode) inside segment 1."""
  cfg = with_soft(first_segment=first_segment)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  L = 16
  toks = jax.random.randint(jax.random.key(0), (1, L), 3, cfg.vocab_size)
  kw = {}
  if packed_rows:
    kw = dict(segment_ids=jnp.ones((1, L), jnp.int32), positions=jnp.arange(L)[None])
  fwd = nnx.jit(lambda m, x: m(x, **kw)[0])
  base = fwd(model, toks)
  for t in (1, 3, 5, 9, 14):
    other = toks.at[0, t].set((toks[0, t] + 7) % cfg.vocab_size)
    changed = np.abs(np.asarray(fwd(model, other) - base)).max(-1)[0] > 1e-6
    allowed = np.arange(L) >= t
    if first_segment == "paper" and t < T:
      allowed |= np.arange(L) < T  # segment 1 routes on its own mean (forward only)
    assert not np.any(changed & ~allowed), (t, np.nonzero(changed & ~allowed))
    assert changed[t:].any()


def test_packed_documents_do_not_influence_each_other():
  cfg = with_soft(first_segment="paper")
  layer = SoftMergedMoE(cfg, rngs=nnx.Rngs(0))
  L, a, b = 16, 6, 10
  xa, xb = randn((1, a, cfg.d_model), 1), randn((1, b, cfg.d_model), 2)
  seg, pos = packed([a, b], L)
  y_packed, _ = call(layer, jnp.concatenate([xa, xb], 1), seg, pos)
  seg_b, pos_b = packed([b], L)
  y_alone, _ = call(layer, jnp.concatenate([xb, randn((1, L - b, cfg.d_model), 3)], 1), seg_b, pos_b)
  np.testing.assert_allclose(y_packed[:, a:], y_alone[:, :b], atol=1e-6)  # B as if it were alone in its row
  y_other_a, _ = call(layer, jnp.concatenate([5 * randn((1, a, cfg.d_model), 9), xb], 1), seg, pos)
  np.testing.assert_allclose(y_other_a[:, a:], y_packed[:, a:], atol=1e-6)


def test_layout_groups_follow_documents_and_overflow_is_counted():
  seg, pos = packed([5, 3, 8], 16)  # T=4: groups [4, 1 | 3 | 4, 4] = 5 groups
  lay = jax.jit(packed_layout, static_argnums=(2, 3))(seg, pos, T, 5)
  np.testing.assert_array_equal(lay.mask_bgt.sum(-1)[0], [4, 1, 3, 4, 4])
  np.testing.assert_array_equal(lay.continues_bg[0], [False, True, False, False, True])
  assert bool(lay.keep_bl.all())
  lay4 = jax.jit(packed_layout, static_argnums=(2, 3))(seg, pos, T, 4)
  assert int((~lay4.keep_bl).sum()) == 4  # the last group has no slot
  layer = SoftMergedMoE(with_soft(extra_segments=0), rngs=nnx.Rngs(0))
  y, aux = call(layer, randn((1, 16, CFG.d_model)), seg, pos)
  assert float(aux["metrics"]["soft_moe_dropped"]) == pytest.approx(4 / 16)
  np.testing.assert_array_equal(y[0, 12:], 0)


def test_routing_metrics_and_segment_rule():
  """Segment k is merged with the router's softmax of segment k-1's mean."""
  cfg = with_soft(first_segment="uniform")
  layer = SoftMergedMoE(cfg, rngs=nnx.Rngs(0))
  p = params_of(layer)
  x = randn((1, 8, cfg.d_model), 3)
  y, aux = call(layer, x)
  w1 = jax.nn.softmax(x[0, :T].mean(0) @ p["router"])
  merged = [jnp.einsum("e,exy->xy", w1, p[k]) for k in ("w_gate", "w_up", "w_down")]
  np.testing.assert_allclose(y[0, T:], swiglu(x[:, T:], *merged)[0], atol=1e-5)
  e = cfg.soft_moe.n_experts
  ent = 0.5 * np.log(e) + 0.5 * float(-(w1 * jnp.log(w1)).sum())
  assert float(aux["metrics"]["soft_moe_entropy"]) == pytest.approx(ent, rel=1e-5)
  np.testing.assert_allclose(aux["metrics"]["soft_moe_routing"], 0.5 / e + 0.5 * w1, rtol=1e-5)


def test_expert_dropout_only_in_training():
  cfg = with_soft(granularity="sequence", allow_noncausal_routing=True, expert_dropout=0.5)
  layer = SoftMergedMoE(cfg, rngs=nnx.Rngs(0))
  x = randn((4, 8, cfg.d_model), 3)
  w_train = [call(layer, x)[1]["metrics"]["soft_moe_routing"] for _ in range(2)]
  assert not np.allclose(w_train[0], w_train[1])  # a fresh dropout mask every call
  layer.eval()
  w_eval = [call(layer, x)[1]["metrics"]["soft_moe_routing"] for _ in range(2)]
  np.testing.assert_array_equal(w_eval[0], w_eval[1])


def test_dense_flag_routes_everything_to_expert_zero():
  cfg = with_soft(dense_warmup=0.2)
  layer = SoftMergedMoE(cfg, rngs=nnx.Rngs(0))
  x = randn((2, 8, cfg.d_model), 3)
  y, _ = call(layer, x)
  np.testing.assert_allclose(y, swiglu(x, layer.experts.w_gate[0], layer.experts.w_up[0], layer.experts.w_down[0]), atol=1e-6)
  layer.dense[...] = jnp.zeros((1,), bool)
  assert not np.allclose(call(layer, x)[0], y, atol=1e-6)


def test_sharded_equals_single_device():
  """Experts split along F over `tensor` (and D over `fsdp`), batch over `fsdp`: same values."""
  from jaxlm.config import MeshConfig
  from jaxlm.sharding import make_mesh, state_shardings

  cfg = dataclasses.replace(CFG, d_ff=32)
  layer = SoftMergedMoE(cfg, rngs=nnx.Rngs(0))
  x = randn((2, 16, cfg.d_model), 5)
  seg, pos = packed([6, 10], 16)
  seg, pos = jnp.concatenate([seg, jnp.ones_like(seg)]), jnp.concatenate([pos, jnp.arange(16)[None]])

  @nnx.jit
  def loss_and_grads(layer, x):
    def loss(layer):
      y, aux = layer(x, segment_ids=seg, positions=pos)
      return jnp.sum(y**2), y

    return nnx.value_and_grad(loss, has_aux=True)(layer)

  (_, y1), g1 = loss_and_grads(layer, x)
  mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
  graphdef, state = nnx.split(layer)
  shardings = state_shardings(state, mesh)
  assert shardings["experts"]["w_gate"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  with jax.set_mesh(mesh):
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    (_, y2), g2 = loss_and_grads(sharded, x)
  np.testing.assert_allclose(y2, y1, atol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(g2)), jax.tree.leaves(nnx.state(g1))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_merged_weights_are_not_kept_for_the_backward_pass():
  """Temporary memory of forward+backward: the dense FFN's plus the merged weights of one scan
  step (a quarter of the segments), never all segments' (a plain merge keeps all of them)."""
  d, f, t, b, length = 128, 256, 32, 4, 256
  cfg = ModelConfig(d_model=d, d_ff=f, n_layers=1, n_heads=2, n_kv_heads=2, dtype="float32", ffn="soft_moe", soft_moe=SoftMoEConfig(n_experts=4, segment_len=t))
  p = params_of(SoftMergedMoE(cfg, rngs=nnx.Rngs(0)))
  dense = {k: v[0] for k, v in p.items() if k != "router"}
  x = jax.ShapeDtypeStruct((b, length, d), jnp.float32)

  def temp(fn, params):
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) ** 2), argnums=(0, 1)))
    return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes

  ref = temp(lambda p, x: swiglu(x, p["w_gate"], p["w_up"], p["w_down"]), dense)
  soft = temp(lambda p, x: soft_moe(p, x, cfg)[0], p)
  one_step = with_soft(cfg, merge_chunk=length // t)
  no_scan = temp(lambda p, x: soft_moe(p, x, one_step)[0], p)
  merged_all = b * (length // t) * 3 * d * f * 4
  assert soft - ref < 0.4 * merged_all < no_scan - ref, (soft, no_scan, ref, merged_all)


def test_pallas_merge_matches_einsum_with_and_without_a_mesh():
  """The `pallas` merge (pallas_kernels.merge; XLA reference on CPU) inside its shard_map."""
  from jaxlm.config import MeshConfig
  from jaxlm.sharding import make_mesh, state_shardings

  layer = SoftMergedMoE(with_soft(merge="pallas"), rngs=nnx.Rngs(0))
  x = randn((2, 16, CFG.d_model), 5)
  ref = SoftMergedMoE(CFG, rngs=nnx.Rngs(0))
  y_ref, _ = call(ref, x)
  np.testing.assert_allclose(call(layer, x)[0], y_ref, atol=1e-6)
  mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
  graphdef, state = nnx.split(layer)
  with jax.set_mesh(mesh):
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    y, _ = call(sharded, x)
  np.testing.assert_allclose(y, y_ref, atol=1e-6)


def test_sequence_granularity_routes_each_document_on_its_own_mean():
  """SMEAR: one merge per document from the mean of its layer input (all of it)."""
  cfg = with_soft(granularity="sequence", allow_noncausal_routing=True)
  layer = SoftMergedMoE(cfg, rngs=nnx.Rngs(0))
  p = params_of(layer)
  x = randn((1, 16, cfg.d_model), 3)
  seg, pos = packed([6, 10], 16)
  y, _ = call(layer, x, seg, pos)
  for lo, hi in ((0, 6), (6, 16)):
    w = jax.nn.softmax(x[0, lo:hi].mean(0) @ p["router"])
    merged = [jnp.einsum("e,exy->xy", w, p[k]) for k in ("w_gate", "w_up", "w_down")]
    np.testing.assert_allclose(y[0, lo:hi], swiglu(x[:, lo:hi], *merged)[0], atol=1e-5)
