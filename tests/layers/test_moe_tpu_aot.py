"""Optional: compile a whole MoE train step ahead of time for a TPU v5p topology (needs libtpu).

The expert-parallel layer with the ragged all-to-all and the Pallas (Mosaic) grouped matmul
only compiles for TPU/GPU; here libtpu's compiler builds the sharded step for 8 v5p chips on
this CPU host and reports per-chip memory. Skipped without libtpu (pip install 'jaxlm[tpu]').
"""

import dataclasses
import importlib.util
import os

import pytest

from jaxlm.experiments import load

pytestmark = pytest.mark.tpu_aot
V5P_HBM = 95 * 2**30


@pytest.fixture(scope="module")
def devices():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jaxlm[tpu]'); TPU AOT compile needs it")
  from jaxlm.train import aot

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU here: other processes may have loaded libtpu too
  return aot.topology_devices("v5p:2x2x2")


@pytest.mark.parametrize("gmm_backend, all_to_all", [("pallas", "ragged"), ("auto", "auto")])
def test_deepseek_v3_layers_compile_for_v5p_with_ragged_all_to_all(devices, gmm_backend, all_to_all):
  """The names "auto" resolve for the TPU slice's devices, not for this CPU host: the Mosaic
  grouped matmul and the ragged all-to-all, as the explicit names do."""
  from jaxlm.train import aot

  exp = load("deepseek_v3_small_v5p:h100x8")  # 1 dense + 1 MoE layer of DeepSeek-V3 width, expert 4 x fsdp 2
  exp = dataclasses.replace(
      exp,
      model=dataclasses.replace(exp.model, attention_impl="xla", moe=dataclasses.replace(exp.model.moe, gmm_backend=gmm_backend, all_to_all=all_to_all)),
      data=dataclasses.replace(exp.data, batch_size=8, seq_len=1024),
  )
  compiled = aot.compile_train_step(exp, devices)
  hlo = compiled.as_text()
  assert "ragged-all-to-all" in hlo or "ragged_all_to_all" in hlo
  assert "tpu_custom_call" in hlo  # the Pallas (Mosaic) grouped matmul, not capacity_einsum
  s = aot.summary(compiled)
  print(f"\n{exp.name} on v5p:2x2x2 ({gmm_backend}): per-chip peak {s['peak_estimate'] / 2**30:.1f} GiB, {s['flops'] / 1e12:.1f} TFLOP")
  assert 0 < s["peak_estimate"] < V5P_HBM


def test_olmoe_compiles_for_v5p(devices):
  from jaxlm.train import aot

  exp = load("olmoe_1b7b_8xh100")
  exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, attention_impl="xla", n_layers=2, moe=dataclasses.replace(exp.model.moe, gmm_backend="ragged_dot", all_to_all="ragged")), data=dataclasses.replace(exp.data, batch_size=8, seq_len=1024))
  s = aot.summary(aot.compile_train_step(exp, devices))
  print(f"\nolmoe (2 layers) on v5p:2x2x2: per-chip peak {s['peak_estimate'] / 2**30:.2f} GiB")
  assert 0 < s["peak_estimate"] < V5P_HBM
