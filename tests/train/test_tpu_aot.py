"""Optional: compile whole train steps ahead of time for TPU v5p slices (needs libtpu).

Run with `pip install "jaxlm[tpu]"` and `pytest -m tpu_aot`; without libtpu these skip.
"""

import pytest

from jaxlm import experiments
from jaxlm.train import aot

pytestmark = pytest.mark.tpu_aot
V5P_HBM = 95 * 2**30


@pytest.fixture(autouse=True)
def _needs_libtpu():
  pytest.importorskip("libtpu", reason="TPU ahead-of-time compiles need libtpu: pip install 'jaxlm[tpu]'")


def test_quickstart_compiles_for_v5p_4_chips():
  compiled = aot.compile_train_step(experiments.load("quickstart", ["model.dtype=bfloat16"]), aot.topology_devices("v5p:2x2x1"))
  s = aot.summary(compiled)
  assert 0 < s["peak_estimate"] < 1 * 2**30
  assert s["flops"] > 0


def test_dense_1b_fits_a_v5p_64_slice():
  exp = experiments.load("dense_1b_v5p64")
  compiled = aot.compile_train_step(exp, aot.topology_devices("v5p:4x4x2"))
  s = aot.summary(compiled)
  print("dense_1b_v5p64 per chip:", {k: f"{v / 2**30:.2f} GiB" for k, v in s.items() if k != "flops"})
  assert s["peak_estimate"] < V5P_HBM
