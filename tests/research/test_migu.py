"""MIGU (jaxlm.train.migu, Du et al. 2024): the forward pass reports every linear layer's output
magnitudes, the update touches only the weights feeding its top outputs and leaves every other
weight, and its AdamW moments, bitwise unchanged; scanned layers, experts and LoRA included."""

from __future__ import annotations

import dataclasses
import fractions
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import peft
from jaxlm.cli import main
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, PeftConfig, TrainConfig
from jaxlm.layers import linear
from jaxlm.models import Transformer
from jaxlm.peft.targets import get_node
from jaxlm.train import migu, optimizer
from jaxlm.train.step import TrainState, guarded_optimizer, make_train_step, split_model

TINY = ModelConfig(vocab_size=384, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, dtype="float32", tie_embeddings=False)
EXP = Experiment(
    name="migu_test",
    mesh=MeshConfig(data=1, fsdp=1),
    model=TINY,
    data=DataConfig(seq_len=8, batch_size=2),
    optim=OptimConfig(lr=1e-2, warmup_steps=0, migu_ratio=0.3),
    train=TrainConfig(steps=4),
)


def batch(seed: int = 0, b: int = 2, l: int = 8) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, 384, (b, l + 1)).astype(np.int32)
  ones = np.ones((b, l), np.int32)
  pos = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy()
  return {k: jnp.asarray(v) for k, v in {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": ones, "positions": pos, "loss_mask": ones}.items()}


def test_kept_count_is_the_authors_quantile_rule():
  """Their mask: magnitude >= torch.quantile(magnitudes, ini_threshold = 1 - ratio), linearly
  interpolated (numpy's default too). Computed exactly: in floats 1 - 0.7 = 0.30000000000000004
  and numpy's quantile of 11 values lands just above the 4th, which is then dropped."""
  rng = np.random.default_rng(0)
  for n in (1, 2, 4, 5, 8, 11, 16, 21, 384):
    a = rng.permutation(n).astype(np.float64)
    s = np.sort(a)
    for ratio in (0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
      pos = (1 - fractions.Fraction(str(ratio))) * (n - 1)
      lo = math.floor(pos)
      q = s[lo] + float(pos - lo) * (s[min(lo + 1, n - 1)] - s[lo])
      assert migu.kept(n, ratio) == int(np.sum(a >= q)), (n, ratio)
      if pos != lo:  # away from the integer positions floats agree
        assert migu.kept(n, ratio) == int(np.sum(a >= np.quantile(a, 1 - ratio))), (n, ratio)
  assert migu.kept(384, 0.3) == 115 and migu.kept(11, 0.7) == 8


# -- a hand-computed layer -------------------------------------------------------------------------

X = jnp.asarray([[[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]])  # [B=1, L=2, D=3]
W = jnp.asarray([[1.0, -0.0, 0.0, 2.0], [0.0, 1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 1.0]])  # [D=3, F=4]; W[0, 1] = -0.0
# y = x W: token 1 (1, 0, 2, 4), token 2 (0, -1, 1, 2); sum over tokens of |y| per output:
MAGNITUDES = np.asarray([1.0, 1.0, 3.0, 6.0])


def test_tap_reports_the_output_magnitudes_and_leaves_the_gradient_alone():
  c = jnp.asarray([0.5, -1.0, 2.0, 0.25])

  def loss(w, probe):
    w = migu.Tapped(w, probe, 1, 1) if probe is not None else w
    return jnp.sum(linear.project("bld,df->blf", X, w) * c)

  g_w, g_probe = jax.jit(jax.grad(loss, argnums=(0, 1)))(W, jnp.zeros(4))
  np.testing.assert_array_equal(np.asarray(g_probe), MAGNITUDES)
  np.testing.assert_array_equal(np.asarray(g_w), np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(W, None)))
  # L1-normalised (the paper's measure) the order is the same: ratio 0.5 keeps 2 of 4 outputs.
  np.testing.assert_array_equal(np.asarray(migu.output_mask(g_probe, 1, 0.5)), [False, False, True, True])


def test_update_touches_only_the_top_outputs_and_keeps_the_rest_bitwise():
  """Two AdamW steps (weight decay and clipping on): step 1 selects outputs 0, 1, step 2 outputs
  2, 3. After step 2 the columns of outputs 0, 1 and their moments are bitwise those of step 1
  (W[0, 1] = -0.0 included); the selected columns moved."""
  tx, _ = optimizer.make(OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.1, clip_norm=1.0, migu_ratio=0.5), 10)
  params = {"w": W}
  state = tx.init(params)
  grads = {"w": jnp.full_like(W, 0.3)}
  stats = lambda mags: {"w": migu.Probe(jnp.asarray(mags, jnp.float32), ("w",), 1, 1)}
  update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, migu_stats=st))
  u1, state1 = update(grads, state, params, stats(MAGNITUDES[::-1]))
  p1 = optax.apply_updates(params, u1)
  u2, state2 = update(grads, state1, p1, stats(MAGNITUDES))
  p2 = optax.apply_updates(p1, u2)
  bits = lambda a: np.asarray(a).view(np.uint32)
  np.testing.assert_array_equal(bits(p1["w"][:, 2:]), bits(W[:, 2:]))  # step 1 left outputs 2, 3
  assert np.all(np.asarray(p1["w"][:, :2]) != np.asarray(W[:, :2]))
  np.testing.assert_array_equal(bits(p2["w"][:, :2]), bits(p1["w"][:, :2]))  # step 2 left outputs 0, 1
  assert np.all(np.asarray(p2["w"][:, 2:]) != np.asarray(p1["w"][:, 2:]))
  mu = lambda s: [x for x in jax.tree.leaves(s) if getattr(x, "shape", ()) == W.shape]
  for m1, m2 in zip(mu(state1), mu(state2)):  # AdamW's mu and nu
    np.testing.assert_array_equal(bits(m2[:, :2]), bits(m1[:, :2]))
    assert np.all(np.asarray(m2[:, 2:]) != np.asarray(m1[:, 2:]))
  assert np.signbit(np.asarray(p2["w"])[0, 1])  # -0.0 stays -0.0 (a masked update is -0.0, not +0.0)


def test_expert_weights_are_ranked_per_expert():
  """Grouped matmul rows of 2 experts: each expert's magnitudes are summed over its own rows and
  its outputs ranked on their own (rows past the groups belong to no expert)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(7, 3)).astype(np.float32)
  w = rng.normal(size=(2, 3, 5)).astype(np.float32)
  sizes = jnp.asarray([4, 2], jnp.int32)  # rows 0-3: expert 0, rows 4-5: expert 1, row 6: none
  mm = lambda a, b: jax.lax.ragged_dot(a, b, sizes)
  rows = linear.Rows(sizes, 2)
  f = lambda probe: jnp.sum(linear.grouped(jnp.asarray(x), migu.Tapped(jnp.asarray(w), probe, 1, 1), mm, rows))
  stat = np.asarray(jax.jit(jax.grad(f))(jnp.zeros((2, 5))))
  expect = np.stack([np.abs(x[:4] @ w[0]).sum(0), np.abs(x[4:6] @ w[1]).sum(0)])
  np.testing.assert_allclose(stat, expect, rtol=1e-6)
  mask = np.asarray(migu.output_mask(jnp.asarray(stat), 1, 0.4))  # kept(5, 0.4) = 2 per expert
  for e in range(2):
    assert set(np.flatnonzero(mask[e])) == set(np.argsort(-expect[e])[:2])


# -- the train step --------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
  """Tiny models, so XLA's optimisations only cost compile time here (the results are the same)."""
  was = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", was)


def random_model(cfg: ModelConfig, seed: int, pcfg: PeftConfig | None = None) -> nnx.Module:
  """A Transformer (with `pcfg`'s adapters) holding random host-made values: no init compiles."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  if pcfg is not None:
    model = peft.apply(model, pcfg)
  rng = np.random.default_rng(seed)
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Variable):
      scale = path[-1] == "scale"
      v.set_value(jnp.asarray((1.0 if scale else 0.0) + rng.normal(0, 0.1 if scale else 0.3, v.shape), v.dtype))
  return model


def built(exp: Experiment, model: nnx.Module):
  graphdef, params, frozen, rest = split_model(model, peft.trainable(exp.peft))
  tx, lr = optimizer.make(exp.optim, exp.train.steps)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, rest=rest, opt_state=guarded_optimizer(tx, exp).init(params))
  return graphdef, state, jax.jit(make_train_step(graphdef, tx, lr, exp))


def magnitudes(graphdef, state, b, *, logits: bool = False):
  def f(s, b):
    mags = migu.magnitudes(graphdef, s.params, s.frozen, s.rest, b)
    if not logits:
      return mags
    model = nnx.merge(graphdef, s.params, s.frozen, s.rest)
    return mags, model(b["inputs"], segment_ids=b["segment_ids"], positions=b["positions"])[0]

  return jax.device_get(jax.jit(f)(state, b))


def stacked_copy(plain: nnx.Module, scanned: nnx.Module) -> None:
  """The weights of the unscanned `plain`, stacked into the scanned model's units."""
  for path, v in nnx.iter_graph(scanned.units.blocks[0]):
    if isinstance(v, nnx.Variable):
      v[...] = jnp.stack([get_node(blk, tuple(path))[...] for blk in plain.blocks])
  for name in ("embed", "final_norm", "lm_head"):
    for path, v in nnx.iter_graph(getattr(scanned, name)):
      if isinstance(v, nnx.Variable):
        v[...] = get_node(getattr(plain, name), tuple(path))[...]


def test_scanned_layers_see_the_magnitudes_of_the_unscanned_model():
  """A scanned stack's probe [layers, ...] gets, layer by layer, what the unscanned model's
  layers get; the head's magnitudes are sum |logits| over the batch's tokens."""
  plain = random_model(TINY, 0)
  scanned = random_model(dataclasses.replace(TINY, scan_layers=True), 0)
  stacked_copy(plain, scanned)
  b = batch()
  exp = dataclasses.replace(EXP, model=dataclasses.replace(TINY, scan_layers=True))
  m_plain, logits = magnitudes(*built(EXP, plain)[:2], b, logits=True)
  m_scan = magnitudes(*built(exp, scanned)[:2], b)
  np.testing.assert_allclose(m_plain["lm_head"], np.abs(logits).sum((0, 1)), rtol=1e-5)
  assert {k.replace("units/blocks/0", "blocks/0") for k in m_scan} | {k.replace("units/blocks/0", "blocks/1") for k in m_scan} == set(m_plain)
  for key, v in m_scan.items():
    if key.startswith("units/"):
      per_layer = [m_plain[key.replace("units/blocks/0", f"blocks/{i}")] for i in range(TINY.n_layers)]
      np.testing.assert_allclose(v, np.stack(per_layer), rtol=1e-5)


@pytest.mark.slow  # make test-all: a whole train step compile; the masks and magnitudes have fast tests above
def test_train_step_with_scanned_lora_masks_b_by_the_adapted_layers_outputs():
  """Scanned layers with LoRA: the layer's output is x (W + s A B); one train step changes, per
  layer, the B columns of its top half of outputs (those of layer 0's w_q computed by hand) and
  leaves the others bitwise equal; A trains in full; the frozen base stays bitwise equal."""
  cfg = dataclasses.replace(TINY, scan_layers=True)
  pcfg = PeftConfig(method="lora", rank=2, alpha=4.0, targets=(r".*attn/w_q", r".*ffn/w_down"))  # outputs [H, K] and [D]
  exp = dataclasses.replace(EXP, model=cfg, peft=pcfg, optim=dataclasses.replace(EXP.optim, migu_ratio=0.5))
  model = random_model(cfg, 1, pcfg)  # B random too: the adapted output differs from the base's
  b = batch(3)
  graphdef, state, step = built(exp, model)
  assert {p[-2:] for p, _ in state.params.flat_state()} == {("w_q", "a"), ("w_q", "b"), ("w_down", "a"), ("w_down", "b")}
  new, metrics = step(state, b)
  assert np.isfinite(float(metrics["loss"]))
  after = dict(new.params.flat_state())
  for path, v in state.params.flat_state():
    a0, a1 = np.asarray(v.get_value()), np.asarray(after[path].get_value())
    if path[-1] != "b":
      assert np.all(a0 != a1), path  # A: trained in full
      continue
    # B [layers, R, *fan_out]: per layer, whole output columns change or stay bitwise equal.
    cols0, cols1 = a0.reshape(a0.shape[0], a0.shape[1], -1), a1.reshape(a1.shape[0], a1.shape[1], -1)
    changed = np.all(cols0 != cols1, axis=1)
    np.testing.assert_array_equal(changed, np.any(cols0.view(np.uint32) != cols1.view(np.uint32), axis=1))
    np.testing.assert_array_equal(changed.sum(-1), migu.kept(changed.shape[-1], 0.5))
  # Layer 0's w_q by hand: x = rms_norm(embed(tokens)) * scale; y = x (W + 2 A B) (scale alpha / r).
  x = np.asarray(model.embed.w_vd[...])[np.asarray(b["inputs"])]
  x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + TINY.norm_eps) * np.asarray(model.units.blocks[0].attn_norm.scale[...])[0]
  wq = model.units.blocks[0].attn.w_q
  w0 = np.asarray(wq.base[...])[0] + 2.0 * np.einsum("dr,rhk->dhk", np.asarray(wq.a[...])[0], np.asarray(wq.b[...])[0])
  mags = np.abs(np.einsum("bld,dhk->blhk", x, w0)).sum((0, 1)).ravel()
  top = np.zeros(mags.shape, bool)
  top[np.argsort(-mags)[: migu.kept(mags.size, 0.5)]] = True
  b_path = ("units", "blocks", 0, "attn", "w_q", "b")
  b0, b1 = (np.asarray(t[b_path].get_value())[0].reshape(2, -1) for t in (dict(state.params.flat_state()), after))
  np.testing.assert_array_equal(np.all(b0 != b1, axis=0), top)
  moments = [np.asarray(m)[0].reshape(2, -1) for m in jax.tree.leaves(new.opt_state) if np.shape(m) == wq.b.shape]
  assert len(moments) == 2  # AdamW's mu and nu of this B: zero at the start, still zero where masked
  for m in moments:
    np.testing.assert_array_equal(np.any(m != 0, axis=0), top)
  for x0, x1 in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(new.frozen)):
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(x1))


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, message",
    [
        (["optim.migu_ratio=1.5"], "optim.migu_ratio is the share of each linear layer's outputs MIGU updates: must be in (0, 1]"),
        (["optim.migu_ratio=-0.1"], "optim.migu_ratio is the share of each linear layer's outputs MIGU updates: must be in (0, 1]"),
        (["optim.migu_ratio=0.3", "peft.method=ia3"], "peft.method must be one of none, lora, dora, subset, not 'ia3'"),
        (["data.eval_also=('nosuch_source',)"], "nosuch_source"),  # the experiment measures forgetting with data.eval_also
    ],
)
def test_bad_migu_input_is_one_line_exit_2(sets, message, tmp_path, capsys):
  run_dir = tmp_path / "run"
  argv = ["train", "quickstart:smoke", "--run-dir", str(run_dir)] + [x for s in sets for x in ("--set", s)]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and message in err, err
  assert "\n" not in err and "Traceback" not in err
  assert not Path(run_dir).exists()
