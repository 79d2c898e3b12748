"""Every kernel lowers for real TPU (Mosaic) and CUDA (Triton) backends, from a CPU-only host.

`jax.export` with `platforms=[...]` lowers the branch of `dispatch.select` for that platform,
so these checks see the compiled kernels, not the CPU fallbacks. Counting the kernel custom
calls also checks that each VJP runs on kernels rather than falling back to XLA.
"""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk

S = jax.ShapeDtypeStruct
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32

# The custom call each platform's Pallas kernels lower to.
KERNEL_CALL = {"tpu": "@tpu_custom_call", "cuda": "@__gpu$xla.gpu.triton"}
# Triton custom calls carry no serialization-compatibility guarantee, so `jax.export` refuses
# them unless this check is disabled; it does not affect lowering itself.
DISABLED_CHECKS = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _routing(logits):
  return pk.topk_route(logits, 8, mode="sigmoid", bias_e=jnp.zeros(64), implementation="pallas")


def _gmm(x, w, gs):
  return pk.grouped_matmul(x, w, gs, implementation="pallas")


def _merged_matmul(x, w, e):
  return pk.merged_matmul(x, w, e, implementation="pallas")


def _grad(fn, argnums):
  return jax.grad(lambda *a: jnp.sum(jnp.square(fn(*a).astype(jnp.float32))), argnums)


GMM_ARGS = (S((512, 256), BF16), S((8, 256, 384), BF16), S((8,), I32))
MERGE_ARGS = (S((8, 8), F32), S((8, 256, 512), BF16))
FUSED_ARGS = (S((4, 128, 256), BF16), S((4, 8), F32), S((8, 256, 512), BF16))

# name -> (function, operand structs, kernel launches it must contain)
CASES = {
    "routing": (lambda x: _routing(x).weights, (S((1024, 64), BF16),), 1),
    "routing_vjp": (_grad(lambda x: _routing(x).weights, 0), (S((1024, 64), BF16),), 1),
    "gmm": (_gmm, GMM_ARGS, 1),
    "gmm_vjp": (_grad(_gmm, (0, 1)), GMM_ARGS, 3),
    "tgmm": (
        lambda x, dy, gs: pk.transposed_grouped_matmul(x, dy, gs, implementation="pallas"),
        (S((512, 256), BF16), S((512, 384), BF16), S((8,), I32)),
        1,
    ),
    "merge": (lambda w, e: pk.merge_experts(w, e, implementation="pallas"), MERGE_ARGS, 1),
    "merge_vjp": (
        _grad(lambda w, e: pk.merge_experts(w, e, implementation="pallas"), (0, 1)),
        MERGE_ARGS,
        3,
    ),
    "merged_matmul": (_merged_matmul, FUSED_ARGS, 1),
    "merged_matmul_vjp": (_grad(_merged_matmul, (0, 1, 2)), FUSED_ARGS, 4),
}


def _export(fn, args, platform):
  return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED_CHECKS)(
      *args
  )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_lower_for_platform(case, platform):
  fn, args, launches = CASES[case]
  text = _export(fn, args, platform).mlir_module()
  assert text.count(KERNEL_CALL[platform]) == launches
  other = KERNEL_CALL["cuda" if platform == "tpu" else "tpu"]
  assert other not in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_auto_picks_the_kernel_on_accelerators(platform):
  fn = lambda x, w, gs: pk.grouped_matmul(x, w, gs)
  assert KERNEL_CALL[platform] in _export(fn, GMM_ARGS, platform).mlir_module()


def test_auto_uses_xla_on_cpu_and_pallas_interprets():
  auto = jax.jit(lambda x, w, gs: pk.grouped_matmul(x, w, gs)).lower(*GMM_ARGS)
  text = auto.as_text(debug_info=True)
  assert "pallas_call" not in text and "ragged_dot_general" in text
  interp = jax.jit(_gmm).lower(*GMM_ARGS)
  assert "pallas_call" in interp.as_text(debug_info=True)
