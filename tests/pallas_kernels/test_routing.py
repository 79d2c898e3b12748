"""topk_route against its reference, for every implementation (kernels in interpret mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import routing
from pallas_kernels import testing
from pallas_kernels.routing import gpu as routing_gpu
from pallas_kernels.routing import tpu as routing_tpu

IMPLS = ["xla", "pallas_tpu", "pallas_gpu"]
SHAPE = testing.ROUTING_SHAPES["tiny"]  # T=300: not a multiple of either kernel's token block


def _logits(dtype=jnp.float32, shape=SHAPE, seed=0):
  return testing.normal(jax.random.key(seed), (shape.tokens, shape.experts), dtype, scale=2.0)


def _bias(shape=SHAPE):
  return testing.normal(jax.random.key(7), (shape.experts,), jnp.float32, scale=0.3)


def _route(fn, logits, k, mode, **kw):
  bias = _bias() if mode == "sigmoid" else None
  return testing.jit(lambda x: fn(x, k, mode=mode, bias_e=bias, **kw))(logits)


def _assert_dispatch_order(r: routing.Routing, num_experts: int):
  """group_sizes and sort_perm mean what they say, whatever computed them."""
  flat = np.asarray(r.expert_ids).reshape(-1)
  np.testing.assert_array_equal(r.group_sizes, np.bincount(flat, minlength=num_experts))
  perm = np.asarray(r.sort_perm)
  np.testing.assert_array_equal(np.sort(perm), np.arange(flat.size))
  np.testing.assert_array_equal(perm, np.argsort(flat, kind="stable"))


@pytest.mark.parametrize(
    "impl, mode, dtype",
    [(i, m, jnp.float32) for i in IMPLS for m in routing.MODES]
    + [(i, "sigmoid", jnp.bfloat16) for i in IMPLS],
)
def test_forward_matches_reference(impl, mode, dtype):
  logits = _logits(dtype)
  got = _route(functools.partial(routing.topk_route, implementation=impl), logits, 3, mode)
  want = _route(routing.topk_route_reference, logits, 3, mode)
  np.testing.assert_array_equal(got.expert_ids, want.expert_ids)
  np.testing.assert_array_equal(got.group_sizes, want.group_sizes)
  np.testing.assert_array_equal(got.sort_perm, want.sort_perm)
  assert got.weights.dtype == jnp.float32
  testing.assert_close(got.weights, want.weights, jnp.float32, reduction=SHAPE.experts)
  _assert_dispatch_order(got, SHAPE.experts)


@pytest.mark.parametrize("mode", routing.MODES)
def test_reference_semantics(mode):
  """The spec itself: k distinct best experts, weights as documented."""
  logits = _logits()
  r = _route(routing.topk_route_reference, logits, 3, mode)
  x = np.asarray(logits, np.float64)
  ids = np.asarray(r.expert_ids)
  assert all(len(set(row)) == 3 for row in ids)
  if mode == "sigmoid":
    s = 1 / (1 + np.exp(-x))
    select = s + np.asarray(_bias())
    want = np.take_along_axis(s, ids, 1)
    want /= want.sum(1, keepdims=True)
  else:
    select = x
    p = np.exp(x - x.max(1, keepdims=True))
    if mode == "topk_softmax":
      picked = np.take_along_axis(x, ids, 1)
      want = np.exp(picked - picked.max(1, keepdims=True))
    else:
      want = np.take_along_axis(p / p.sum(1, keepdims=True), ids, 1)
    want /= want.sum(1, keepdims=True)
  # The chosen experts are the k best by the selection score, best first.
  np.testing.assert_array_equal(ids, np.argsort(-select, axis=1, kind="stable")[:, :3])
  np.testing.assert_allclose(r.weights, want, rtol=1e-5)


# The backward pass is shared code; each implementation and each mode is covered once.
@pytest.mark.parametrize("impl, mode", list(zip(IMPLS, routing.MODES)))
def test_vjp_matches_reference(impl, mode):
  logits = _logits()
  cot = testing.normal(jax.random.key(3), (SHAPE.tokens, 3), jnp.float32)
  bias = _bias() if mode == "sigmoid" else None

  def loss(fn):
    return lambda x: jnp.sum(fn(x, 3, mode=mode, bias_e=bias).weights * cot)

  ours = functools.partial(routing.topk_route, implementation=impl)
  got = testing.jit(jax.grad(loss(ours)))(logits)
  want = testing.jit(jax.grad(loss(routing.topk_route_reference)))(logits)
  assert float(jnp.abs(want).max()) > 0
  testing.assert_close(got, want, jnp.float32, reduction=SHAPE.experts)


def test_vjp_bf16_logits_and_zero_bias_gradient():
  logits = _logits(jnp.bfloat16)
  bias = _bias()
  cot = testing.normal(jax.random.key(3), (SHAPE.tokens, 3), jnp.float32)

  def loss(x, b):
    r = routing.topk_route(x, 3, mode="sigmoid", bias_e=b, implementation="pallas_tpu")
    return jnp.sum(r.weights * cot)

  d_logits, d_bias = testing.jit(jax.grad(loss, (0, 1)))(logits, bias)
  def ref_loss(x):
    return jnp.sum(routing.topk_route_reference(x, 3, mode="sigmoid", bias_e=bias).weights * cot)

  want = jax.grad(ref_loss)(logits)
  assert d_logits.dtype == jnp.bfloat16
  testing.assert_close(d_logits, want, jnp.bfloat16, reduction=SHAPE.experts)
  np.testing.assert_array_equal(d_bias, np.zeros(SHAPE.experts))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_on_one_expert_and_k_equals_e(impl):
  """A dominant expert takes every token; with k=E every expert gets every token."""
  logits = _logits().at[:, 4].add(100.0)
  r = testing.jit(lambda x: routing.topk_route(x, 2, implementation=impl))(logits)
  assert int(r.group_sizes[4]) == SHAPE.tokens
  np.testing.assert_array_equal(r.expert_ids[:, 0], np.full(SHAPE.tokens, 4))
  _assert_dispatch_order(r, SHAPE.experts)
  small = _logits()[:, :5]
  r = testing.jit(lambda x: routing.topk_route(x, 5, implementation=impl))(small)
  np.testing.assert_array_equal(r.group_sizes, np.full(5, SHAPE.tokens))
  np.testing.assert_allclose(jnp.sum(r.weights, axis=1), np.ones(SHAPE.tokens), rtol=1e-6)
  _assert_dispatch_order(r, 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_steers_selection_not_weights(impl):
  logits = _logits()
  bias = jnp.zeros(SHAPE.experts).at[11].set(10.0)
  r = testing.jit(
      lambda x, b: routing.topk_route(
          x, 2, mode="sigmoid", bias_e=b, renormalize=False, implementation=impl
      )
  )(logits, bias)
  np.testing.assert_array_equal(r.expert_ids[:, 0], np.full(SHAPE.tokens, 11))
  np.testing.assert_allclose(r.weights[:, 0], jax.nn.sigmoid(logits[:, 11]), rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_renormalize_false_keeps_softmax_probabilities(impl):
  logits = _logits()
  r = testing.jit(
      lambda x: routing.topk_route(x, 3, renormalize=False, implementation=impl)
  )(logits)
  probs = jax.nn.softmax(logits, axis=-1)
  np.testing.assert_allclose(
      r.weights, jnp.take_along_axis(probs, r.expert_ids, axis=1), rtol=1e-5
  )
  assert float(jnp.max(jnp.sum(r.weights, axis=1))) < 1.0


@pytest.mark.parametrize(
    "kernel, block_t", [(routing_tpu.topk_route, 32), (routing_gpu.topk_route, 16)]
)
def test_kernel_many_partial_blocks(kernel, block_t):
  """Small token blocks: ten blocks, the last one partial, and -inf logits in the input."""
  logits = _logits().at[5, :].set(-jnp.inf).at[5, 2].set(0.0)
  bias = jnp.zeros(SHAPE.experts)
  got = testing.jit(
      lambda x, b: kernel(
          x, b, k=3, mode="topk_softmax", renormalize=True, block_t=block_t, interpret=True
      )
  )(logits, bias)
  want = routing.topk_route_reference(logits, 3, mode="topk_softmax")
  np.testing.assert_array_equal(got.expert_ids, want.expert_ids)
  np.testing.assert_array_equal(got.sort_perm, want.sort_perm)
  testing.assert_close(got.weights, want.weights, jnp.float32, reduction=SHAPE.experts)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((jnp.zeros((4, 8)), 9), {}, "k must be"),
        ((jnp.zeros((4, 8)), 0), {}, "k must be"),
        ((jnp.zeros((4, 8)), 2), {"mode": "softmax"}, "mode must be"),
        ((jnp.zeros((4, 8)), 2), {"bias_e": jnp.zeros(8)}, "only used in 'sigmoid'"),
        ((jnp.zeros((4, 8)), 2), {"mode": "sigmoid", "bias_e": jnp.zeros(7)}, r"shape \[E\]"),
        ((jnp.zeros((8,)), 2), {}, r"shape \[T,E\]"),
        ((jnp.zeros((4, 8), jnp.int32), 2), {}, "floating"),
        ((jnp.zeros((4, 8)), 2), {"implementation": "triton"}, "implementation must be"),
    ],
)
def test_bad_input_raises_before_launch(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    routing.topk_route(*args, **kwargs)


@pytest.mark.parametrize("impl", [None, "xla"])
def test_route_inside_shard_map_with_vma_checks(impl):
  """Tokens sharded over 4 devices, check_vma=True: each shard routes as the reference does.

  `None` traces both the XLA and the kernel branch of the platform switch, whose outputs must
  vary over the same mesh axes (argsort's constant iota once made `sort_perm` invariant).
  """
  mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  logits = _logits(shape=testing.RoutingShape(64, 8, 2))
  route = jax.shard_map(
      lambda x: tuple(routing.topk_route(x, 2, implementation=impl)),
      mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=True,
  )
  got = testing.jit(route)(logits)
  for shard in range(4):
    want = routing.topk_route_reference(logits[16 * shard:16 * (shard + 1)], 2)
    for g, w in zip(got, want):
      n = w.shape[0]
      np.testing.assert_allclose(np.asarray(g)[n * shard:n * (shard + 1)], w, rtol=1e-6)
