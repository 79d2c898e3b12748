"""grouped_matmul / transposed_grouped_matmul against their references (kernels interpreted)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gmm
from pallas_kernels import testing
from pallas_kernels.gmm import gpu as gmm_gpu
from pallas_kernels.gmm import tpu as gmm_tpu

IMPLS = ["xla", "pallas_tpu", "pallas_gpu"]
SHAPE = testing.GMM_SHAPES["tiny"]  # M=300, K=200, N=160, E=5: no dim a multiple of a tile


def _operands(dtype, shape=SHAPE, seed=0):
  kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
  x = testing.normal(kx, (shape.m, shape.k), dtype)
  w = testing.normal(kw, (shape.experts, shape.k, shape.n), dtype)
  dy = testing.normal(ky, (shape.m, shape.n), dtype)
  return x, w, dy


# Ragged sizes: empty experts (first, middle, last), all rows on one expert, rows past the end.
GROUP_SIZES = {
    "ragged_with_empty": [0, 117, 0, 161, 0],
    "all_on_one": [0, 0, 300, 0, 0],
    "rows_past_end": [33, 0, 80, 1, 50],
    "all_empty": [0, 0, 0, 0, 0],
}


def _jit_gmm(impl, **kw):
  return testing.jit(lambda x, w, gs: gmm.grouped_matmul(x, w, gs, implementation=impl, **kw))


@pytest.mark.parametrize("case", list(GROUP_SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_group_size_cases(impl, case):
  x, w, _ = _operands(jnp.float32)
  gs = jnp.array(GROUP_SIZES[case], jnp.int32)
  got = _jit_gmm(impl)(x, w, gs)
  want = gmm.grouped_matmul_reference(x, w, gs)
  testing.assert_close(got, want, jnp.float32, reduction=SHAPE.k)
  # Rows past the last group are exactly zero, not merely small.
  np.testing.assert_array_equal(got[int(gs.sum()):], 0.0)
  if case == "all_on_one":
    testing.assert_close(got, x @ w[2], jnp.float32, reduction=SHAPE.k)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_forward_and_f32_output(impl):
  x, w, _ = _operands(jnp.bfloat16)
  gs = testing.random_group_sizes(jax.random.key(1), SHAPE.m, SHAPE.experts, empty=1)
  got = _jit_gmm(impl)(x, w, gs)
  assert got.dtype == jnp.bfloat16
  testing.assert_close(got, gmm.grouped_matmul_reference(x, w, gs), jnp.bfloat16, SHAPE.k)
  got32 = _jit_gmm(impl, preferred_element_type=jnp.float32)(x, w, gs)
  want32 = gmm.grouped_matmul_reference(x, w, gs, preferred_element_type=jnp.float32)
  assert got32.dtype == jnp.float32
  testing.assert_close(got32, want32, jnp.float32, SHAPE.k)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_vjp_matches_reference(impl, dtype):
  x, w, dy = _operands(dtype)
  gs = jnp.array(GROUP_SIZES["rows_past_end"], jnp.int32)

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w, gs).astype(jnp.float32) * dy.astype(jnp.float32))

  ours = lambda x, w, gs: gmm.grouped_matmul(x, w, gs, implementation=impl)
  dx, dw = testing.jit(jax.grad(loss(ours), (0, 1)))(x, w)
  want_dx, want_dw = testing.jit(jax.grad(loss(gmm.grouped_matmul_reference), (0, 1)))(x, w)
  assert dx.dtype == dtype and dw.dtype == dtype
  testing.assert_close(dx, want_dx, dtype, reduction=SHAPE.n)
  testing.assert_close(dw, want_dw, dtype, reduction=SHAPE.m)
  np.testing.assert_array_equal(dx[int(gs.sum()):], 0.0)  # rows in no group get no gradient
  np.testing.assert_array_equal(dw[1], 0.0)  # the empty group's weights get no gradient


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_tgmm_matches_reference(impl, dtype):
  x, _, dy = _operands(dtype)
  gs = jnp.array(GROUP_SIZES["rows_past_end"], jnp.int32)
  got = testing.jit(
      lambda x, dy, gs: gmm.transposed_grouped_matmul(x, dy, gs, implementation=impl)
  )(x, dy, gs)
  want = gmm.transposed_grouped_matmul_reference(x, dy, gs)
  testing.assert_close(got, want, dtype, reduction=SHAPE.m)
  np.testing.assert_array_equal(got[1], 0.0)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_tgmm_vjp(impl):
  x, _, dy = _operands(jnp.float32)
  gs = jnp.array(GROUP_SIZES["ragged_with_empty"], jnp.int32)
  cot = testing.normal(jax.random.key(5), (SHAPE.experts, SHAPE.k, SHAPE.n), jnp.float32)

  def loss(fn):
    return lambda x, dy: jnp.sum(fn(x, dy, gs) * cot)

  ours = lambda x, dy, gs: gmm.transposed_grouped_matmul(x, dy, gs, implementation=impl)
  got = testing.jit(jax.grad(loss(ours), (0, 1)))(x, dy)
  want = testing.jit(jax.grad(loss(gmm.transposed_grouped_matmul_reference), (0, 1)))(x, dy)
  testing.assert_close(got[0], want[0], jnp.float32, reduction=SHAPE.n)
  testing.assert_close(got[1], want[1], jnp.float32, reduction=SHAPE.k)


@pytest.mark.parametrize(
    "kernel, tiling", [(gmm_tpu, (32, 128, 128)), (gmm_gpu, (32, 64, 64))]
)
def test_kernels_with_small_tiles(kernel, tiling):
  """Many row tiles, tiles straddling several groups, partial K and N tiles, rhs transposed."""
  x, w, dy = _operands(jnp.float32)
  gs = jnp.array([3, 0, 40, 1, 200], jnp.int32)
  run = testing.jit(
      lambda x, w, dy, gs: (
          kernel.gmm(x, w, gs, out_dtype=jnp.float32, tiling=tiling, interpret=True),
          kernel.gmm(
              x, w.swapaxes(1, 2), gs, out_dtype=jnp.float32, transpose_rhs=True,
              tiling=tiling, interpret=True,
          ),
          kernel.tgmm(x, dy, gs, out_dtype=jnp.float32, tiling=tiling, interpret=True),
      )
  )
  y, y_t, g = run(x, w, dy, gs)
  want_y = gmm.grouped_matmul_reference(x, w, gs)
  testing.assert_close(y, want_y, jnp.float32, reduction=SHAPE.k)
  testing.assert_close(y_t, want_y, jnp.float32, reduction=SHAPE.k)
  testing.assert_close(
      g, gmm.transposed_grouped_matmul_reference(x, dy, gs), jnp.float32, reduction=SHAPE.m
  )


def test_xla_implementation_is_ragged_dot():
  x, w, _ = _operands(jnp.float32)
  gs = jnp.array(GROUP_SIZES["ragged_with_empty"], jnp.int32)
  np.testing.assert_array_equal(
      gmm.grouped_matmul(x, w, gs, implementation="xla"), jax.lax.ragged_dot(x, w, gs)
  )


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_sizes_past_m_are_truncated(impl):
  """Sizes cannot be checked under jit; every implementation cuts the groups at M alike."""
  x, w, _ = _operands(jnp.float32)
  gs = jnp.array([100, 0, 150, 120, 40], jnp.int32)  # sums to 410 > M=300
  got = _jit_gmm(impl)(x, w, gs)
  want = gmm.grouped_matmul_reference(x, w, jnp.array([100, 0, 150, 50, 0], jnp.int32))
  testing.assert_close(got, want, jnp.float32, reduction=SHAPE.k)


X, W, GS = jnp.zeros((8, 4)), jnp.zeros((2, 4, 3)), jnp.array([3, 5], jnp.int32)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((X, jnp.zeros((2, 5, 3)), GS), {}, "disagree on K"),
        ((X, W.astype(jnp.bfloat16), GS), {}, "same dtype"),
        ((X, W, jnp.array([-1, 5], jnp.int32)), {}, "non-negative"),
        ((X, W, jnp.array([4, 5], jnp.int32)), {}, "more than the 8 rows"),
        ((X, W, jnp.array([8], jnp.int32)), {}, r"shape \[E\]=\[2\]"),
        ((X, W, jnp.array([3.0, 5.0])), {}, "integers"),
        ((X.astype(jnp.int32), W.astype(jnp.int32), GS), {}, "floating"),
        ((X[0], W, GS), {}, r"shape \[M,K\]"),
        ((X, W, GS), {"preferred_element_type": jnp.int32}, "float dtype"),
        ((X, W, GS), {"implementation": "mosaic"}, "implementation must be"),
    ],
)
def test_bad_input_raises_before_launch(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    gmm.grouped_matmul(*args, implementation=kwargs.pop("implementation", "pallas"), **kwargs)


def test_tgmm_bad_input():
  with pytest.raises(ValueError, match="disagree on M"):
    gmm.transposed_grouped_matmul(X, jnp.zeros((7, 3)), GS)
  with pytest.raises(ValueError, match="more than the 8 rows"):
    gmm.transposed_grouped_matmul(X, jnp.zeros((8, 3)), jnp.array([5, 5], jnp.int32))
