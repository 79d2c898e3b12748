"""Optional: compile the Lory train steps ahead of time for TPU v5p slices (needs libtpu).

libtpu's compiler builds the whole sharded step (soft-merged FFNs, scanned layers, remat) for
the paper-scale experiment files on this CPU host and reports per-chip memory: the 0.3B/8E
model on 8 chips and the 1.5B/32E model (31B parameters) on 64 chips, plus the Pallas merge
inside its shard_map. Skipped without libtpu (pip install 'jaxlm[tpu]').
"""

import dataclasses
import importlib.util

import pytest

from jaxlm.experiments import load

pytestmark = pytest.mark.tpu_aot
V5P_HBM = 95 * 2**30


@pytest.fixture(autouse=True)
def _needs_libtpu():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jaxlm[tpu]'); TPU AOT compile needs it")


@pytest.mark.parametrize("name, topology", [("lory_300m_8e_v5p", "v5p:2x2x2"), ("lory_1p5b_32e_v5p", "v5p:4x4x4")])
def test_paper_configs_fit_their_v5p_slice(name, topology):
  from jaxlm.train import aot

  s = aot.summary(aot.compile_train_step(load(name), aot.topology_devices(topology)))
  print(f"\n{name} on {topology}: per-chip peak {s['peak_estimate'] / 2**30:.1f} GiB (temporaries {s['temporaries'] / 2**30:.1f} GiB), {s['flops'] / 1e12:.0f} TFLOP")
  assert 0 < s["peak_estimate"] < V5P_HBM


def test_pallas_merge_compiles_inside_shard_map():
  from jaxlm.train import aot

  exp = load("lory_300m_8e_v5p")
  exp = dataclasses.replace(
      exp,
      mesh=dataclasses.replace(exp.mesh, fsdp=2, tensor=4),
      model=dataclasses.replace(exp.model, n_layers=2, soft_moe=dataclasses.replace(exp.model.soft_moe, merge="pallas")),
      data=dataclasses.replace(exp.data, batch_size=8),
      train=dataclasses.replace(exp.train, grad_accum=1),
  )
  compiled = aot.compile_train_step(exp, aot.topology_devices("v5p:2x2x2"))
  assert "tpu_custom_call" in compiled.as_text()  # the Mosaic merge kernel, not the XLA fallback
