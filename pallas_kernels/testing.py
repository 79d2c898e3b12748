"""What the kernel tests and `benchmarks/kernels.py` share: tolerances, named shapes, inputs.

Tolerances come from one table. Two correct implementations of a float32-accumulated
reduction differ by summation order (an error that grows with the number of terms) and, for
16-bit outputs, by one rounding of the result; so `tolerance(dtype, reduction)` is a relative
tolerance for the output dtype plus an absolute one that grows like sqrt(reduction) for
O(1)-sized inputs.

Named shapes: "tiny" shapes are what the CPU tests run in interpret mode (deliberately not
multiples of any block size); "cpu" shapes are what the benchmark times on a CPU; the rest
are per-device shapes of real models for accelerators.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import gmm
from pallas_kernels import merge
from pallas_kernels import routing

# dtype -> (rtol, atol per sqrt(reduction size)).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (2e-5, 4e-6),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}


def tolerance(dtype: Any, reduction: int = 1) -> dict[str, float]:
  """`np.testing.assert_allclose` kwargs for an output of `dtype` summed over `reduction` terms."""
  rtol, atol = TOLERANCES[jnp.dtype(dtype).name]
  return dict(rtol=rtol, atol=atol * math.sqrt(max(1, reduction)))


def assert_close(actual: Any, expected: Any, dtype: Any, reduction: int = 1, err_msg: str = ""):
  """assert_allclose in float32 with the table's tolerance for `dtype` and `reduction`."""
  np.testing.assert_allclose(
      np.asarray(jnp.asarray(actual, jnp.float32)),
      np.asarray(jnp.asarray(expected, jnp.float32)),
      err_msg=err_msg,
      **tolerance(dtype, reduction),
  )


# XLA:CPU options for tests: interpret-mode kernels are big programs, and at test sizes
# compiling them dominates; without LLVM's expensive passes it is 3-4x faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn: Any, **kwargs: Any) -> Any:
  """`jax.jit` with `FAST_COMPILE`: what the kernel tests compile with."""
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


@dataclasses.dataclass(frozen=True)
class RoutingShape:
  """Router logits [tokens, experts], top-k, and the model's routing mode."""

  tokens: int
  experts: int
  k: int
  mode: str = "softmax_topk"


@dataclasses.dataclass(frozen=True)
class GmmShape:
  """Grouped matmul [m, k] x [experts, k, n] (m = routed token copies on one device)."""

  m: int
  k: int
  n: int
  experts: int


@dataclasses.dataclass(frozen=True)
class MergeShape:
  """Merge [segments, experts] x [experts, d, f]; merged_matmul adds [segments, length, d]."""

  segments: int
  experts: int
  d: int
  f: int
  length: int


ROUTING_SHAPES: dict[str, RoutingShape] = {
    "tiny": RoutingShape(tokens=300, experts=20, k=3),
    "cpu": RoutingShape(tokens=4096, experts=64, k=8),
    "mixtral_8x7b": RoutingShape(tokens=16384, experts=8, k=2, mode="topk_softmax"),
    "qwen1.5_moe_a2.7b": RoutingShape(tokens=16384, experts=60, k=4),
    "olmoe_1b_7b": RoutingShape(tokens=16384, experts=64, k=8),
    "deepseek_v3": RoutingShape(tokens=16384, experts=256, k=8, mode="sigmoid"),
}

GMM_SHAPES: dict[str, GmmShape] = {
    "tiny": GmmShape(m=300, k=200, n=160, experts=5),
    "cpu": GmmShape(m=2048, k=512, n=1024, experts=8),
    "mixtral_8x7b_w1": GmmShape(m=8192, k=4096, n=14336, experts=8),
    "mixtral_8x7b_w2": GmmShape(m=8192, k=14336, n=4096, experts=8),
    "olmoe_1b_7b_w1": GmmShape(m=32768, k=2048, n=1024, experts=64),
    "qwen3_30b_a3b_w1": GmmShape(m=32768, k=2048, n=768, experts=128),
    "deepseek_v3_ep32_w1": GmmShape(m=16384, k=7168, n=2048, experts=8),
}

MERGE_SHAPES: dict[str, MergeShape] = {
    "tiny": MergeShape(segments=5, experts=3, d=40, f=300, length=37),
    "cpu": MergeShape(segments=8, experts=8, d=256, f=1024, length=128),
    "lory_0.3b": MergeShape(segments=32, experts=8, d=1024, f=4096, length=256),
    "lory_1.5b": MergeShape(segments=16, experts=16, d=2048, f=5632, length=256),
    "smear_7b_ffn": MergeShape(segments=8, experts=8, d=4096, f=11008, length=512),
}


def random_group_sizes(
    key: jax.Array, m: int, experts: int, *, filled: int | None = None, empty: int = 0
) -> jax.Array:
  """[experts] int32 sizes summing to `filled` (default m), `empty` of them zero.

  Sizes are drawn from a Dirichlet-like split of `filled` rows over the non-empty experts,
  whose positions are random; used for ragged, empty-expert and skewed test cases.
  """
  filled = m if filled is None else filled
  k_perm, k_split = jax.random.split(key)
  live = experts - empty
  order = np.asarray(jax.random.permutation(k_perm, experts))
  frac = np.asarray(jax.random.uniform(k_split, (live,), minval=0.05, maxval=1.0))
  sizes_live = np.floor(frac / frac.sum() * filled).astype(np.int64)
  sizes_live[0] += filled - sizes_live.sum()
  sizes = np.zeros(experts, np.int64)
  sizes[order[:live]] = sizes_live
  return jnp.asarray(sizes, jnp.int32)


def normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> jax.Array:
  """N(0, scale^2) samples rounded to dtype."""
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Lowering checks without hardware (shared by tests/pallas_kernels/test_lowering.py,
# tests/pallas_kernels/test_tpu_aot.py and the benchmark's report): each public op under
# implementation="pallas", forward and VJP.

# The custom call each platform's Pallas kernels lower to.
KERNEL_CALL = {"tpu": "@tpu_custom_call", "cuda": "@__gpu$xla.gpu.triton"}


def _routing(logits_te: jax.Array, bias_e: jax.Array) -> jax.Array:
  return routing.topk_route(
      logits_te, 8, mode="sigmoid", bias_e=bias_e, implementation="pallas"
  ).weights


def _gmm(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
  return gmm.grouped_matmul(x_mk, w_ekn, group_sizes_e, implementation="pallas")


def _tgmm(x_mk: jax.Array, dy_mn: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
  return gmm.transposed_grouped_matmul(x_mk, dy_mn, group_sizes_e, implementation="pallas")


def _merge(w_se: jax.Array, x_edf: jax.Array) -> jax.Array:
  return merge.merge_experts(w_se, x_edf, implementation="pallas")


def _merged_matmul(x_sld: jax.Array, w_se: jax.Array, x_edf: jax.Array) -> jax.Array:
  return merge.merged_matmul(x_sld, w_se, x_edf, implementation="pallas")


@dataclasses.dataclass(frozen=True)
class PallasOp:
  """A public op with implementation="pallas", as a function of arrays only.

  Attributes:
    fn: the op; every operand is an array (routing's bias included).
    argnums: the float operands its VJP is taken with respect to.
    launches: kernel launches `fn` lowers to.
    vjp_launches: kernel launches `loss_grad(fn, argnums)` lowers to (forward included).
  """

  fn: Callable[..., jax.Array]
  argnums: tuple[int, ...]
  launches: int
  vjp_launches: int


PALLAS_OPS: dict[str, PallasOp] = {
    "routing": PallasOp(_routing, (0,), 1, 1),  # the VJP is XLA
    "gmm": PallasOp(_gmm, (0, 1), 1, 3),  # gmm, gmm with w^T, tgmm
    "tgmm": PallasOp(_tgmm, (0, 1), 1, 3),  # tgmm, two gmm
    "merge": PallasOp(_merge, (0, 1), 1, 3),  # merge, merge with w^T, dw
    "merged_matmul": PallasOp(_merged_matmul, (0, 1, 2), 1, 4),
}


def loss_grad(fn: Callable[..., jax.Array], argnums: int | tuple[int, ...]) -> Callable[..., Any]:
  """`jax.grad` of sum(fn(...)**2): a loss that needs fn's output, so its kernel is not dead."""
  return jax.grad(lambda *a: jnp.sum(jnp.square(fn(*a).astype(jnp.float32))), argnums)


def export_for(platform: str, fn: Any, args: tuple[Any, ...]) -> Any:
  """`jax.export` of jit(fn) for one platform.

  Triton custom calls carry no serialization-compatibility guarantee, so `jax.export`
  refuses them unless that safety check is disabled; lowering itself is unaffected.
  """
  disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args)


def lowering_cases() -> dict[str, tuple[Any, tuple[Any, ...], int]]:
  """name -> (function, operand structs, kernel launches it must lower to).

  Each op of `PALLAS_OPS` as "<op>" (forward) and "<op>_vjp" (`loss_grad`), on small
  unsharded operands.
  """
  s = jax.ShapeDtypeStruct
  bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
  operands = {
      "routing": (s((1024, 64), bf16), s((64,), f32)),
      "gmm": (s((512, 256), bf16), s((8, 256, 384), bf16), s((8,), i32)),
      "tgmm": (s((512, 256), bf16), s((512, 384), bf16), s((8,), i32)),
      "merge": (s((8, 8), f32), s((8, 256, 512), bf16)),
      "merged_matmul": (s((4, 128, 256), bf16), s((4, 8), f32), s((8, 256, 512), bf16)),
  }
  cases = {}
  for name, op in PALLAS_OPS.items():
    cases[name] = (op.fn, operands[name], op.launches)
    cases[f"{name}_vjp"] = (loss_grad(op.fn, op.argnums), operands[name], op.vjp_launches)
  return cases
