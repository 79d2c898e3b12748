"""Compile a train step ahead of time for hardware that is not here (a TPU pod slice).

With libtpu installed (`pip install "jaxlm[tpu]"`), `jax.experimental.topologies` describes a
TPU slice of any shape; the step is lowered with abstract, sharded state and compiled for it,
so per-chip memory and FLOPs are known before a pod is reserved:

  jaxlm inspect dense_1b_v5p64 --topology v5p:4x4x2
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxlm.config import Experiment
from jaxlm.errors import ConfigError
from jaxlm.train import loop


def topology_devices(topology_name: str) -> list:
  """Devices of a TPU topology such as "v5p:4x4x2" (needs libtpu)."""
  try:
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices)
  except Exception as e:  # no libtpu, or an unknown topology name
    raise ConfigError(f"cannot describe TPU topology {topology_name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); is libtpu installed (pip install 'jaxlm[tpu]')?") from None


def compile_train_step(exp: Experiment, devices: list) -> Any:
  """The compiled train step of `exp` for `devices` (which may belong to an absent TPU slice)."""
  exp = dataclasses.replace(exp, mesh=dataclasses.replace(exp.mesh, devices=len(devices)))
  setup = loop.prepare(exp, devices, abstract=True)
  b, l = exp.data.batch_size, exp.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, l), jax.numpy.int32, sharding=setup.batch_sharding) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  with jax.set_mesh(setup.mesh):
    return setup.train_step.lower(setup.state, batch).compile()


def summary(compiled: Any) -> dict[str, float]:
  """Per-device memory (bytes) and FLOPs of a compiled step."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {
      "arguments": mem.argument_size_in_bytes,
      "outputs": mem.output_size_in_bytes,
      "temporaries": mem.temp_size_in_bytes,
      "generated_code": mem.generated_code_size_in_bytes,
      "aliased": mem.alias_size_in_bytes,
      "flops": float(cost.get("flops", 0.0)),
  }
  out["peak_estimate"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out
