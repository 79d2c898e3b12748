"""Every kernel lowers for real TPU (Mosaic) and CUDA (Triton) backends, from a CPU-only host.

`jax.export` with `platforms=[...]` lowers the branch of `dispatch.select` for that platform,
so these checks see the compiled kernels, not the CPU fallbacks. Counting the kernel custom
calls also checks that each VJP runs on kernels rather than falling back to XLA.
"""

import jax
import pytest

import pallas_kernels as pk
from pallas_kernels import dispatch
from pallas_kernels import testing

CASES = testing.lowering_cases()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_lower_for_platform(case, platform):
  fn, args, launches = CASES[case]
  text = testing.export_for(platform, fn, args).mlir_module()
  assert text.count(testing.KERNEL_CALL[platform]) == launches
  other = testing.KERNEL_CALL["cuda" if platform == "tpu" else "tpu"]
  assert other not in text


GMM_ARGS = CASES["gmm"][1]


def _auto_gmm(x, w, gs):
  return pk.grouped_matmul(x, w, gs)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_auto_picks_the_kernel_where_enabled(platform):
  text = testing.export_for(platform, _auto_gmm, GMM_ARGS).mlir_module()
  uses_kernel = testing.KERNEL_CALL[platform] in text
  assert uses_kernel == (platform in dispatch.AUTO_KERNEL_PLATFORMS)


def test_auto_uses_xla_on_cpu_and_pallas_interprets():
  text = jax.jit(_auto_gmm).lower(*GMM_ARGS).as_text(debug_info=True)
  assert "pallas_call" not in text and "ragged_dot_general" in text
  interp = jax.jit(CASES["gmm"][0]).lower(*GMM_ARGS).as_text(debug_info=True)
  assert "pallas_call" in interp
