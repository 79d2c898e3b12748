"""Compile every kernel for a real TPU topology, ahead of time, on this CPU host.

Unlike `test_lowering.py` (which stops at the Mosaic MLIR), this runs libtpu's compiler: Mosaic
layout and VMEM checks included. Each op runs inside `shard_map` (Mosaic kernels must sit in
one) with `check_vma=True`, over a v5p 2x2x1 topology, forward and backward, and must compile
to the kernel launches `testing.PALLAS_OPS` lists. Needs libtpu (`pip install "jax[tpu]"`);
skipped without it.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import testing

pytestmark = pytest.mark.tpu_aot

BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
TOPOLOGY = "v5p:2x2x1"
# One per kernel launch in the compiled HLO (after XLA's passes, so none was dropped or fused).
KERNEL_CALL = 'custom_call_target="tpu_custom_call"'


@pytest.fixture(scope="module")
def mesh():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jaxlm[tpu]'); TPU AOT compile needs it")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  topo = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY)
  return topologies.make_mesh(topo, (len(topo.devices),), ("x",))


# op name (in testing.PALLAS_OPS) -> ([(global shape, dtype, partition spec)], output spec)
CASES = {
    "routing": ([((4096, 64), BF16, P("x")), ((64,), F32, P())], P("x")),
    "gmm": (
        [((2048, 256), BF16, P("x")), ((32, 256, 384), BF16, P("x")), ((32,), I32, P("x"))],
        P("x"),
    ),
    "tgmm": (
        [((2048, 256), BF16, P("x")), ((2048, 384), BF16, P("x")), ((32,), I32, P("x"))],
        P("x"),
    ),
    # Soft-merged experts are sharded along F (DESIGN.md): each device merges its F slice.
    "merge": (
        [((8, 8), F32, P()), ((8, 256, 2048), BF16, P(None, None, "x"))],
        P(None, None, "x"),
    ),
    "merged_matmul": (
        [((16, 128, 256), BF16, P("x")), ((16, 8), F32, P("x")), ((8, 256, 512), BF16, P())],
        P("x"),
    ),
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "vjp"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiles_for_tpu_inside_shard_map(mesh, case, backward):
  op = testing.PALLAS_OPS[case]
  operands, out_spec = CASES[case]
  specs = tuple(spec for _, _, spec in operands)
  args = [
      jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
      for shape, dtype, spec in operands
  ]
  if backward:
    body, launches = testing.loss_grad(op.fn, op.argnums), op.vjp_launches
    out_specs = tuple(specs[i] for i in op.argnums)
  else:
    body, out_specs, launches = op.fn, out_spec, op.launches
  compiled = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs))
  compiled = compiled.lower(*args).compile()
  text = compiled.as_text()
  assert text.count(KERNEL_CALL) == launches
  assert compiled.memory_analysis() is not None
