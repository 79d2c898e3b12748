"""Routing over a library of LoRA adapters: Arrow's prototypes are the top singular vectors of the
dense deltas, tokens along a prototype / gate route to its adapter, routed models with top-1
routing equal the chosen adapter alone, PHATGOOSE's gate training trains only the gates."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import peft
from jaxlm.config import ModelConfig, PeftConfig
from jaxlm.errors import ConfigError
from jaxlm.models import abstract_model
from jaxlm.peft.library import arrow_prototypes
from jaxlm.peft.weights import Router

BASE = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, dtype="float32")
SCANNED = dataclasses.replace(BASE, scan_layers=True)
LORA = PeftConfig(method="lora", rank=2, targets=(r".*attn/w_(q|v)",))
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
HALF = 8  # adapter 0 reads input features [0, 8), adapter 1 features [8, 16)
LOGITS = nnx.jit(lambda m, t: m(t)[0])


def numpy_model(cfg: ModelConfig, seed: int = 0):
  """A Transformer with numpy-drawn weights (norm scales 1): built from the abstract model, so
  without the many small compilations of an eager init (this file stays fast on its own)."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(abstract_model(cfg))
  fill = lambda path, x: jnp.ones(x.shape, x.dtype) if path[-2].key == "scale" else jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def logits(model) -> np.ndarray:
  return np.asarray(LOGITS(model, TOKENS))


def make_adapter(base, cfg, directory, *, seed, model_cfg=BASE, support=None):
  """Apply `cfg` to a copy of `base`, give A and B random values (with `support`, a slice of the
  input features of one-axis fan-ins: A's other rows zero) and save the adapter into `directory`."""
  model = peft.apply(nnx.clone(base), cfg)
  rng = np.random.default_rng(seed)
  for _, mod in peft.adapted_modules(model):
    a = 0.5 * rng.standard_normal(mod.a.shape)
    if support is not None:  # A [*stack, D, R]: rows are the input features
      keep = np.zeros(mod.a.shape[-2], bool)
      keep[support] = True
      a = a * keep[:, None]
    mod.a.set_value(jnp.asarray(a, jnp.float32))
    mod.b.set_value(jnp.asarray(0.5 * rng.standard_normal(mod.b.shape), jnp.float32))
  return peft.save_adapter(model, directory, cfg, model_cfg=model_cfg)


@pytest.fixture(scope="module")
def base():
  return numpy_model(BASE)


@pytest.fixture(scope="module")
def library(base, tmp_path_factory):
  """Two LoRA adapters of ranks 2 and 3 reading disjoint halves of the input features."""
  root = tmp_path_factory.mktemp("library")
  return (
      str(make_adapter(base, LORA, root / "half0", seed=10, support=slice(0, HALF))),
      str(make_adapter(base, dataclasses.replace(LORA, rank=3), root / "half1", seed=11, support=slice(HALF, None))),
  )


def arrow(model, library, top_k=1):
  return peft.apply(nnx.clone(model), PeftConfig(method="arrow", library=tuple(library), library_top_k=top_k))


def dense_delta(values, path, n_in):
  """A B of a saved adapter as [*stack, prod(fan_in), prod(fan_out)] (numpy)."""
  a, b = values[f"{path}/a"].astype(np.float64), values[f"{path}/b"].astype(np.float64)
  stack = a.shape[: a.ndim - n_in - 1]
  a = a.reshape(stack + (-1, a.shape[-1]))
  b = b.reshape(stack + (b.shape[len(stack)], -1))
  return a @ b


def assert_top_singular_vector(proto, delta):
  """proto [prod(fan_in)] == the top left singular vector of delta, up to sign."""
  u = np.linalg.svd(delta)[0][:, 0]
  np.testing.assert_allclose(np.linalg.norm(proto), 1.0, rtol=1e-5)
  np.testing.assert_allclose(proto * np.sign(proto @ u), u, atol=2e-5)


# -- Arrow --------------------------------------------------------------------------------------


def test_arrow_prototypes_are_the_top_singular_vectors(base, library):
  model = arrow(base, library)
  saved = [peft.read_adapter(d)[1] for d in library]
  mods = peft.adapted_modules(model)
  assert [peft.targets.path_str(p) for p, _ in mods] == ["blocks/0/attn/w_q", "blocks/0/attn/w_v", "blocks/1/attn/w_q", "blocks/1/attn/w_v"]
  for path, mod in mods:
    p = peft.targets.path_str(path)
    protos = np.asarray(mod.router[...])  # [N, D]
    assert protos.shape == (2, 16) and mod.router_kind == "arrow" and mod.top_k == 1
    for n, values in enumerate(saved):
      assert_top_singular_vector(protos[n], dense_delta(values, p, n_in=1))
    # the prototypes live where their adapters read: disjoint halves of the features
    assert np.abs(protos[0, HALF:]).max() < 1e-6 and np.abs(protos[1, :HALF]).max() < 1e-6
  assert peft.trainable_fraction(model, PeftConfig(method="arrow", library=tuple(library)))[0] == 0


def test_arrow_prototypes_per_layer_of_a_scanned_model(tmp_path):
  """Scanned layers: prototypes [L, N, *fan_in], one per layer; w_o's fan-in is two axes [H, K]."""
  scanned = numpy_model(SCANNED)
  cfg = PeftConfig(method="lora", rank=2, targets=(r".*attn/w_o",))
  dirs = tuple(str(make_adapter(scanned, cfg, tmp_path / f"s{i}", seed=20 + i, model_cfg=SCANNED)) for i in range(2))
  model = peft.apply(scanned, PeftConfig(method="arrow", library=dirs))
  ((path, mod),) = peft.adapted_modules(model)
  assert peft.targets.path_str(path) == "units/blocks/0/attn/w_o"
  protos = np.asarray(mod.router[...])
  assert protos.shape == (2, 2, 2, 8)  # [L, N, H, K]
  for n, d in enumerate(dirs):
    delta = dense_delta(peft.read_adapter(d)[1], "units/blocks/0/attn/w_o", n_in=2)  # [L, H K, D]
    for layer in range(2):
      assert_top_singular_vector(protos[layer, n].reshape(-1), delta[layer])


def test_arrow_prototypes_without_forming_the_delta_match_numpy():
  """Against numpy's SVD of the formed delta: a stack of 3 with a two-axis fan-out, and a two-axis fan-in."""
  rng = np.random.default_rng(5)
  a, b = rng.standard_normal((3, 12, 4)), rng.standard_normal((3, 4, 5, 7))
  protos = arrow_prototypes(a, b, n_in=1)
  for s in range(3):
    assert_top_singular_vector(protos[s], a[s] @ b[s].reshape(4, -1))
  # two fan-in axes, no stack, rank 3 > the fan-out 2
  a, b = rng.standard_normal((2, 6, 3)), rng.standard_normal((3, 2))
  assert_top_singular_vector(arrow_prototypes(a, b, n_in=2).reshape(-1), a.reshape(12, 3) @ b)


def test_arrow_router_sends_a_token_along_a_prototype_to_its_adapter(base, library):
  model = arrow(base, library)
  protos = model.blocks[0].attn.w_q.router[...]
  router = model.blocks[0].attn.w_q.adapted().router
  # along p_0 (any sign, any length) -> adapter 0 only; along p_1 -> adapter 1 only
  x = jnp.stack([3.0 * protos[0], -0.5 * protos[0], 2.0 * protos[1], -7.0 * protos[1]])
  np.testing.assert_array_equal(router.gates(x, 1), [[1, 0], [1, 0], [0, 1], [0, 1]])
  # with top_k=2: softmax over |<x, p_n>| (an Arrow router of all adapters)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 16)), jnp.float32)
  want = jax.nn.softmax(jnp.abs(x @ protos.T), axis=-1)
  np.testing.assert_allclose(Router(protos, "arrow", 2).gates(x, 1), want, rtol=1e-6)
  # a prototype's sign does not matter
  np.testing.assert_allclose(Router(protos * jnp.array([[-1.0], [1.0]]), "arrow", 2).gates(x, 1), want, rtol=1e-6)


def masked_inputs(base, keep):
  """`base` with every attention input confined to the features `keep` (the pre-attention norm's
  scale zero elsewhere): routing on those inputs is then known."""
  model = nnx.clone(base)
  mask = np.zeros(16, np.float32)
  mask[keep] = 1.0
  for block in model.blocks:
    block.attn_norm.scale.set_value(block.attn_norm.scale[...] * mask)
  return model


@pytest.mark.parametrize("n", [0, 1])
def test_arrow_top1_routing_equals_the_chosen_adapter_alone(base, library, n):
  """Inputs in adapter n's half of the features: |<x, p_m>| ~ 0 for the other adapter, so top-1
  routing picks n for every token of every layer, and the model is exactly adapter n's."""
  base_n = masked_inputs(base, slice(0, HALF) if n == 0 else slice(HALF, None))
  routed = logits(arrow(base_n, library, top_k=1))
  alone = logits(peft.load_adapter(nnx.clone(base_n), library[n]))
  other = logits(peft.load_adapter(nnx.clone(base_n), library[1 - n]))
  np.testing.assert_allclose(routed, alone, rtol=1e-5, atol=1e-5)
  assert not np.allclose(alone, logits(base_n), atol=1e-3)  # the adapter does something ...
  np.testing.assert_allclose(other, logits(base_n), rtol=1e-6, atol=1e-6)  # ... the other, nothing here


def test_arrow_builds_on_an_abstract_model(library):
  model = peft.apply(abstract_model(BASE), PeftConfig(method="arrow", library=library))
  router = model.blocks[1].attn.w_v.router.get_value()
  assert isinstance(router, jax.ShapeDtypeStruct) and router.shape == (2, 16)
  assert model.blocks[1].attn.w_v.a.shape == (2, 16, 3)  # [N, D, max rank]


# -- PHATGOOSE ------------------------------------------------------------------------------------

GATE_DIMS = (3, 11)  # gate vector of entry n: 4 e_{GATE_DIMS[n]}


@pytest.fixture(scope="module")
def gated(base, library, tmp_path_factory):
  """phatgoose_gates on adapter 0 (the model at init), and two gated library entries."""
  cfg = PeftConfig(method="phatgoose_gates", library=(library[0],))
  model = peft.apply(nnx.clone(base), cfg)
  init = logits(model)
  root = tmp_path_factory.mktemp("gated")
  dirs = []
  for n, lora_dir in enumerate(library):
    cfg_n = PeftConfig(method="phatgoose_gates", library=(lora_dir,))
    g = peft.apply(nnx.clone(base), cfg_n)
    for _, mod in peft.adapted_modules(g):  # stands in for the trained gate: a known direction
      mod.router.set_value(4.0 * jax.nn.one_hot(GATE_DIMS[n], 16)[None])
    dirs.append(str(peft.save_adapter(g, root / f"gated{n}", cfg_n, model_cfg=BASE)))
  return types.SimpleNamespace(cfg=cfg, model=model, init=init, dirs=tuple(dirs))


def test_phatgoose_gates_trains_only_the_gates(base, library, gated):
  graphdef, train, frozen, rest = nnx.split(gated.model, peft.trainable(gated.cfg), nnx.Param, ...)
  leaves = jax.tree_util.tree_leaves_with_path(train)
  assert len(leaves) == 4  # one gate per adapted weight
  for path, leaf in leaves:
    assert path[-2].key == "router" and leaf.shape == (1, 16)
    np.testing.assert_array_equal(leaf, 0.0)  # v = 0 at the start: sigmoid = 1/2
  frozen_names = {str(p[-2].key) for p, _ in jax.tree_util.tree_leaves_with_path(rest)}
  assert {"a", "b"} <= frozen_names  # the adapter itself is frozen
  # at init: y = x W + sigmoid(0) s (x A) B, i.e. the adapter with half its B
  half = peft.load_adapter(nnx.clone(base), library[0])
  for _, mod in peft.adapted_modules(half):
    mod.b.set_value(0.5 * mod.b[...])
  np.testing.assert_allclose(gated.init, logits(half), rtol=1e-5, atol=1e-5)
  # the loss reaches every gate
  loss = lambda t: jnp.mean(jnp.square(nnx.merge(graphdef, t, frozen, rest)(TOKENS)[0]))
  grads = jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(train))
  assert len(grads) == 4 and all(float(jnp.abs(g).max()) > 0 for g in grads)


def test_saved_gated_adapter_holds_a_b_and_the_gate(library, gated):
  meta, values = peft.read_adapter(gated.dirs[1])
  assert meta["peft"]["method"] == "phatgoose_gates"
  assert sorted(k.rsplit("/", 1)[1] for k in values if k.startswith("blocks/0/attn/w_q/")) == ["a", "b", "router"]
  np.testing.assert_array_equal(values["blocks/1/attn/w_v/router"], 4.0 * np.eye(16)[None, GATE_DIMS[1]])
  # the scale folded into B: s B (s = alpha / r = 16 / 3 for adapter 1)
  lora = peft.read_adapter(library[1])[1]
  np.testing.assert_allclose(values["blocks/1/attn/w_v/b"][0], lora["blocks/1/attn/w_v/b"] * 16 / 3, rtol=1e-6)


def phatgoose(model, dirs, top_k=1):
  return peft.apply(nnx.clone(model), PeftConfig(method="phatgoose", library=tuple(dirs), library_top_k=top_k))


def test_phatgoose_router_sends_tokens_along_a_gate_to_its_adapter(base, gated):
  model = phatgoose(base, gated.dirs)
  mod = model.blocks[1].attn.w_q
  v = mod.router[...]  # [N, D]
  np.testing.assert_array_equal(v, 4.0 * np.eye(16)[list(GATE_DIMS)])
  router = mod.adapted().router
  noise = 0.1 * np.random.default_rng(3).standard_normal((4, 16))
  x = jnp.stack([2.0 * v[0] + 1.0, 0.3 * v[0] - 5.0, 5.0 * v[1], 0.5 * v[1] + 2.0]) + noise  # layer norm: offsets do not matter
  np.testing.assert_array_equal(router.gates(x, 1), [[1, 0], [1, 0], [0, 1], [0, 1]])
  # top-2: softmax of <LN(x), LN(v_n)> / sqrt(d), LN over the features without affine parameters
  ln = lambda z: (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
  x = np.random.default_rng(4).standard_normal((5, 16)).astype(np.float32)
  want = jax.nn.softmax(ln(x) @ ln(np.asarray(v)).T / 4.0, axis=-1)
  np.testing.assert_allclose(Router(v, "phatgoose", 2).gates(x, 1), want, rtol=1e-5)


def aligned_inputs(base, dim):
  """`base` whose attention inputs are all positive multiples of e_dim: every embedding has
  feature `dim` = 1, the first block writes nothing into it (w_o and w_down's column zero), and
  the pre-attention norms keep only it."""
  model = nnx.clone(base)
  one_hot = np.eye(16, dtype=np.float32)[dim]
  model.embed.w_vd.set_value(model.embed.w_vd[...] * (1 - one_hot) + one_hot)
  first = model.blocks[0]
  first.attn.w_o.set_value(first.attn.w_o[...] * (1 - one_hot))
  first.ffn.w_down.set_value(first.ffn.w_down[...] * (1 - one_hot))
  for block in model.blocks:
    block.attn_norm.scale.set_value(jnp.asarray(one_hot))
  return model


@pytest.mark.parametrize("n", [0, 1])
def test_phatgoose_top1_routing_equals_the_chosen_adapter_alone(base, library, gated, n):
  base_n = aligned_inputs(base, GATE_DIMS[n])  # aligned with entry n's gates, in adapter n's half
  routed = logits(phatgoose(base_n, gated.dirs, top_k=1))
  alone = logits(peft.load_adapter(nnx.clone(base_n), library[n]))
  np.testing.assert_allclose(routed, alone, rtol=1e-5, atol=1e-5)
  assert not np.allclose(alone, logits(base_n), atol=1e-3)  # the chosen adapter changes the model;
  np.testing.assert_allclose(logits(peft.load_adapter(nnx.clone(base_n), library[1 - n])), logits(base_n), rtol=1e-6, atol=1e-6)  # the other cannot here


# -- bad libraries --------------------------------------------------------------------------------


def test_bad_libraries_are_config_errors(base, library, gated, tmp_path):
  ia3 = peft.save_adapter(peft.apply(nnx.clone(base), PeftConfig(method="ia3")), tmp_path / "ia3", PeftConfig(method="ia3"), model_cfg=BASE)
  with pytest.raises(ConfigError, match="needs 'lora' adapters, but library entry .*ia3 is a 'ia3' adapter"):
    arrow(base, (library[0], str(ia3)))
  with pytest.raises(ConfigError, match="is not a saved adapter"):
    arrow(base, (library[0], str(tmp_path)))
  q_only = make_adapter(base, dataclasses.replace(LORA, targets=(r".*attn/w_q",)), tmp_path / "q_only", seed=3)
  with pytest.raises(ConfigError, match="adapts other weights"):
    arrow(base, (library[0], str(q_only)))
  with pytest.raises(ConfigError, match="at least 2 adapter directories"):
    PeftConfig(method="arrow", library=(library[0],))
  with pytest.raises(ConfigError, match="needs 'phatgoose_gates' adapters"):
    phatgoose(base, library)
  with pytest.raises(ConfigError, match="needs 'lora' adapters"):
    peft.apply(nnx.clone(base), PeftConfig(method="phatgoose_gates", library=(gated.dirs[0],)))
  with pytest.raises(ConfigError, match="adapted already"):
    arrow(peft.load_adapter(nnx.clone(base), library[0]), library)
  untouched = nnx.clone(base)  # a library is checked whole before any weight is adapted
  with pytest.raises(ConfigError):
    peft.apply(untouched, PeftConfig(method="arrow", library=(library[0], str(ia3))))
  assert not peft.adapted_modules(untouched)
