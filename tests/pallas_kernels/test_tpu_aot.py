"""Compile every kernel for a real TPU topology, ahead of time, on this CPU host.

Unlike `test_lowering.py` (which stops at the Mosaic MLIR), this runs libtpu's compiler: Mosaic
layout and VMEM checks included. Each op runs inside `shard_map` (Mosaic kernels must sit in
one) with `check_vma=True`, over a v5p 2x2x1 topology, forward and backward. Needs libtpu
(`pip install "jax[tpu]"`); skipped without it.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk

pytestmark = pytest.mark.tpu_aot

BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
TOPOLOGY = "v5p:2x2x1"


@pytest.fixture(scope="module")
def mesh():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jaxlm[tpu]'); TPU AOT compile needs it")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  topo = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY)
  return topologies.make_mesh(topo, (len(topo.devices),), ("x",))


def _loss(fn):
  return lambda *a: jnp.sum(jnp.square(fn(*a).astype(jnp.float32)))


def _routing(logits, bias):
  return pk.topk_route(logits, 8, mode="sigmoid", bias_e=bias, implementation="pallas").weights


def _gmm(x, w, gs):
  return pk.grouped_matmul(x, w, gs, implementation="pallas")


def _tgmm(x, dy, gs):
  return pk.transposed_grouped_matmul(x, dy, gs, implementation="pallas")


def _merge(w, e):
  return pk.merge_experts(w, e, implementation="pallas")


def _merged_matmul(x, w, e):
  return pk.merged_matmul(x, w, e, implementation="pallas")


# name -> (op, [(global shape, dtype, partition spec)], output spec, differentiable argnums)
CASES = {
    "routing": (_routing, [((4096, 64), BF16, P("x")), ((64,), F32, P())], P("x"), (0,)),
    "gmm": (
        _gmm,
        [((2048, 256), BF16, P("x")), ((32, 256, 384), BF16, P("x")), ((32,), I32, P("x"))],
        P("x"),
        (0, 1),
    ),
    "tgmm": (
        _tgmm,
        [((2048, 256), BF16, P("x")), ((2048, 384), BF16, P("x")), ((32,), I32, P("x"))],
        P("x"),
        (0, 1),
    ),
    # Soft-merged experts are sharded along F (DESIGN.md): each device merges its F slice.
    "merge": (
        _merge,
        [((8, 8), F32, P()), ((8, 256, 2048), BF16, P(None, None, "x"))],
        P(None, None, "x"),
        (0, 1),
    ),
    "merged_matmul": (
        _merged_matmul,
        [((16, 128, 256), BF16, P("x")), ((16, 8), F32, P("x")), ((8, 256, 512), BF16, P())],
        P("x"),
        (0, 1, 2),
    ),
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "vjp"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiles_for_tpu_inside_shard_map(mesh, case, backward):
  op, operands, out_spec, argnums = CASES[case]
  specs = tuple(spec for _, _, spec in operands)
  args = [
      jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
      for shape, dtype, spec in operands
  ]
  if backward:
    body = jax.grad(_loss(op), argnums)
    out_specs = tuple(specs[i] for i in argnums)
  else:
    body, out_specs = op, out_spec
  compiled = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs))
  compiled = compiled.lower(*args).compile()
  text = compiled.as_text()
  assert "tpu_custom_call" in text
  assert compiled.memory_analysis() is not None
