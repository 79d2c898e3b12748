"""merge_experts / merged_matmul against their references (kernels in interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import merge
from pallas_kernels import testing
from pallas_kernels.merge import gpu as merge_gpu
from pallas_kernels.merge import tpu as merge_tpu

IMPLS = ["xla", "pallas_tpu", "pallas_gpu"]
SHAPE = testing.MERGE_SHAPES["tiny"]  # S=5, E=3, D=40, F=300, L=37


def _operands(dtype, shape=SHAPE):
  kw, ke, kx, kg = jax.random.split(jax.random.key(0), 4)
  weights = jax.nn.softmax(testing.normal(kw, (shape.segments, shape.experts), jnp.float32), -1)
  experts = testing.normal(ke, (shape.experts, shape.d, shape.f), dtype)
  x = testing.normal(kx, (shape.segments, shape.length, shape.d), dtype)
  return weights, experts, x, kg


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_merge_forward_and_vjp(impl, dtype):
  weights, experts, _, kg = _operands(dtype)
  cot = testing.normal(kg, (SHAPE.segments, SHAPE.d, SHAPE.f), jnp.float32)

  def loss(fn):
    return lambda w, e: jnp.sum(fn(w, e).astype(jnp.float32) * cot)

  ours = lambda w, e: merge.merge_experts(w, e, implementation=impl)
  got = testing.jit(ours)(weights, experts)
  assert got.dtype == dtype
  testing.assert_close(
      got, merge.merge_experts_reference(weights, experts), dtype, reduction=SHAPE.experts
  )
  dw, de = testing.jit(jax.grad(loss(ours), (0, 1)))(weights, experts)
  want_dw, want_de = testing.jit(jax.grad(loss(merge.merge_experts_reference), (0, 1)))(
      weights, experts
  )
  assert dw.dtype == jnp.float32 and de.dtype == dtype
  # d_weights sums D*F products of O(1) values; relative error is what stays fixed.
  testing.assert_close(dw, want_dw, jnp.float32, reduction=SHAPE.d * SHAPE.f)
  testing.assert_close(de, want_de, dtype, reduction=SHAPE.segments)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_hot_weights_pick_an_expert_exactly(impl):
  """Soft merging with one-hot weights is the sparse expert itself, bit for bit."""
  _, experts, _, _ = _operands(jnp.bfloat16)
  weights = jax.nn.one_hot(jnp.array([2, 0, 1, 2, 1]), SHAPE.experts)
  got = testing.jit(lambda w, e: merge.merge_experts(w, e, implementation=impl))(weights, experts)
  np.testing.assert_array_equal(got, experts[jnp.array([2, 0, 1, 2, 1])])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_merged_matmul_forward_and_vjp(impl, dtype):
  weights, experts, x, kg = _operands(dtype)
  cot = testing.normal(kg, (SHAPE.segments, SHAPE.length, SHAPE.f), jnp.float32)

  def loss(fn):
    return lambda x, w, e: jnp.sum(fn(x, w, e).astype(jnp.float32) * cot)

  ours = lambda x, w, e: merge.merged_matmul(x, w, e, implementation=impl)
  got = testing.jit(ours)(x, weights, experts)
  want = merge.merged_matmul_reference(x, weights, experts)
  testing.assert_close(got, want, dtype, reduction=SHAPE.d)
  grads = testing.jit(jax.grad(loss(ours), (0, 1, 2)))(x, weights, experts)
  want_grads = testing.jit(jax.grad(loss(merge.merged_matmul_reference), (0, 1, 2)))(
      x, weights, experts
  )
  for name, g, w, n in zip(
      ("dx", "dweights", "dexperts"), grads, want_grads,
      (SHAPE.f, SHAPE.length * SHAPE.d * SHAPE.f, SHAPE.length * SHAPE.segments),
  ):
    testing.assert_close(g, w, g.dtype, reduction=n, err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernels_with_small_blocks(backend, dtype):
  """Several blocks along every tiled dim, each with a partial edge block."""
  weights, experts, x, kg = _operands(dtype)
  g = testing.normal(kg, (SHAPE.segments, SHAPE.d, SHAPE.f), dtype)
  if backend == "tpu":
    small = dict(block_f=128, block_d=16)
    fused = dict(block_s=2, block_l=16, block_d=128, block_f=128)
    kernels = merge_tpu
  else:
    small = dict(block_n=512)
    fused = dict(block_l=16, block_d=16, block_f=64)
    kernels = merge_gpu
  run = testing.jit(
      lambda w, e, x, g: (
          kernels.merge(w, e, interpret=True, **small),
          kernels.merge_weights_grad(g, e, interpret=True, **small),
          kernels.merged_matmul(x, w, e, interpret=True, **fused),
      )
  )
  merged, dw, y = run(weights, experts, x, g)
  testing.assert_close(
      merged, merge.merge_experts_reference(weights, experts), dtype, reduction=SHAPE.experts
  )
  want_dw = jnp.einsum("sdf,edf->se", g, experts, preferred_element_type=jnp.float32)
  testing.assert_close(dw, want_dw, jnp.float32, reduction=SHAPE.d * SHAPE.f)
  testing.assert_close(
      y, merge.merged_matmul_reference(x, weights, experts), dtype, reduction=SHAPE.d
  )


def test_tpu_merged_matmul_partial_d_block():
  """D=300 with 128-wide D blocks: the kernel must mask the garbage past D in both operands."""
  shape = testing.MergeShape(segments=3, experts=2, d=300, f=128, length=16)
  weights, experts, x, _ = _operands(jnp.float32, shape)
  got = testing.jit(
      lambda x, w, e: merge_tpu.merged_matmul(x, w, e, block_d=128, interpret=True)
  )(x, weights, experts)
  testing.assert_close(
      got, merge.merged_matmul_reference(x, weights, experts), jnp.float32, reduction=shape.d
  )


def test_tpu_merge_tiles_many_segments():
  """S=300 > 256 segments: the TPU merge kernels tile S too (one partial S block)."""
  shape = testing.MergeShape(segments=300, experts=3, d=16, f=128, length=1)
  weights, experts, _, kg = _operands(jnp.float32, shape)
  g = testing.normal(kg, (300, 16, 128), jnp.float32)
  merged, dw = testing.jit(
      lambda w, e, g: (
          merge_tpu.merge(w, e, interpret=True),
          merge_tpu.merge_weights_grad(g, e, interpret=True),
      )
  )(weights, experts, g)
  testing.assert_close(merged, merge.merge_experts_reference(weights, experts), jnp.float32, 3)
  want_dw = jnp.einsum("sdf,edf->se", g, experts, precision="highest")
  testing.assert_close(dw, want_dw, jnp.float32, reduction=16 * 128)


W, E_, X = jnp.zeros((4, 3)), jnp.zeros((3, 8, 16)), jnp.zeros((4, 5, 8))


@pytest.mark.parametrize(
    "fn, args, match",
    [
        (merge.merge_experts, (jnp.zeros((4, 2)), E_), "disagree on E"),
        (merge.merge_experts, (W, jnp.zeros((3, 8))), r"shape \[E,D,F\]"),
        (merge.merge_experts, (W, E_.astype(jnp.int32)), "floating"),
        (merge.merged_matmul, (jnp.zeros((4, 5, 9)), W, E_), "disagree on S or D"),
        (merge.merged_matmul, (jnp.zeros((2, 5, 8)), W, E_), "disagree on S or D"),
        (merge.merged_matmul, (X.astype(jnp.bfloat16), W, E_), "same dtype"),
    ],
)
def test_bad_input_raises_before_launch(fn, args, match):
  with pytest.raises(ValueError, match=match):
    fn(*args, implementation="pallas")


# Interpret mode cannot run under check_vma=True in jax 0.10.2 (its grid loop carries the
# outputs as invariant values); compiled kernels can (tests/pallas_kernels/test_tpu_aot.py).
@pytest.mark.parametrize("impl, check_vma", [("xla", True), ("pallas_tpu", False)])
def test_vjp_through_shard_map_matches_unsharded(impl, check_vma):
  """Experts sharded along F, weights replicated: the weights' cotangent sums over devices."""
  mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  weights, experts, _, kg = _operands(jnp.float32, testing.MergeShape(5, 3, 16, 512, 1))
  cot = testing.normal(kg, (5, 16, 512), jnp.float32)

  def local_loss(w, e, c):
    return jax.lax.psum(jnp.sum(merge.merge_experts(w, e, implementation=impl) * c), "x")

  sharded_loss = jax.shard_map(
      local_loss,
      mesh=mesh,
      in_specs=(P(), P(None, None, "x"), P(None, None, "x")),
      out_specs=P(),
      check_vma=check_vma,
  )
  dw, de = testing.jit(jax.grad(sharded_loss, (0, 1)))(weights, experts, cot)
  want_dw, want_de = jax.grad(
      lambda w, e: jnp.sum(merge.merge_experts_reference(w, e) * cot), (0, 1)
  )(weights, experts)
  testing.assert_close(dw, want_dw, jnp.float32, reduction=16 * 512)
  testing.assert_close(de, want_de, jnp.float32, reduction=5)
