"""Sparse-MoE benchmarks (issue 4): three ratios, each measured in one run.

* time: MoE layer forward+backward / the dense SwiGLU MLP with the same active parameters
  (quickstart shapes: 16 x 256 tokens, D 256, dense F 768 vs top-2 of 8 experts of F 384),
  timed interleaved on this machine. Goal <= 1.3.
* flops: compiled FLOPs (XLA cost analysis; layers unrolled) / analytical active FLOPs, for the
  whole moe_quickstart train step and for one MoE layer's forward pass, dropless and in
  capacity mode, next to the GShard one-hot dispatch (measured here at the layer level, and its
  analytical cf * (1 + 2S / 3F)). Goals: <= 1.10 dropless, <= cf + 0.05 in capacity mode.
* all_to_all: bytes of the expert-parallel all-to-alls of one layer, per device, read from the
  compiled HLO, / the minimum 2 * tokens * k * D * bytes (dispatch + combine of every routed
  row). Padded path on 8 CPU devices (a subprocess with 8 fake devices); the ragged path
  compiled ahead of time for a TPU v5p topology when libtpu is installed. Goals: <= 1.0 ragged,
  <= capacity factor padded (dropless padded chunks must hold every row: ep x).

Usage: python -m benchmarks.run moe [--rounds=N]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np

GOALS = {"time_over_dense": "<= 1.3", "flops_dropless": "<= 1.10", "flops_capacity": "<= capacity_factor + 0.05", "a2a_ragged": "<= 1.0", "a2a_padded_capacity": "<= capacity_factor"}
B, L, D, F_DENSE, E, K = 16, 256, 256, 768, 8, 2
CF = 1.25


def _cfg(**moe_kw):
  from jaxlm.config import ModelConfig, MoEConfig

  return ModelConfig(d_model=D, d_ff=F_DENSE, n_layers=4, dtype="float32", ffn="moe", moe=MoEConfig(n_experts=E, top_k=K, d_ff_expert=F_DENSE // K, **moe_kw))


def _layer_params(cfg, seed=0):
  import jax
  from flax import nnx

  from jaxlm.layers.moe import MoE

  layer = MoE(cfg, rngs=nnx.Rngs(seed))
  p = {"router": layer.router[...], "w_gate": layer.experts.w_gate[...], "w_up": layer.experts.w_up[...], "w_down": layer.experts.w_down[...]}
  p["router"] = jax.random.normal(jax.random.key(seed + 1), p["router"].shape) * 0.5  # a trained-looking router: uneven, confident
  return p


# -- time ----------------------------------------------------------------------------------------


def bench_time(rounds: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  from benchmarks.common import interleaved_times
  from jaxlm.layers.mlp import swiglu
  from jaxlm.layers.moe import moe

  x = jax.random.normal(jax.random.key(0), (B, L, D))
  k = jax.random.split(jax.random.key(1), 3)
  dense_w = tuple(jax.random.normal(kk, s) * 0.02 for kk, s in zip(k, ((D, F_DENSE), (D, F_DENSE), (F_DENSE, D))))
  dense = jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(swiglu(x, *w) ** 2), argnums=(0, 1)))
  fns = {"dense": lambda: jax.block_until_ready(dense(dense_w, x))}
  variants = {
      "moe_dropless": _cfg(),  # auto backend: capacity_einsum on CPU
      f"moe_capacity_{CF}": _cfg(mode="capacity", capacity_factor=CF),
      "moe_capacity_1.0": _cfg(mode="capacity", capacity_factor=1.0),
      "moe_dropless_ragged_dot": _cfg(gmm_backend="ragged_dot"),
  }
  for name, cfg in variants.items():
    p = _layer_params(cfg)
    f = jax.jit(jax.value_and_grad(lambda p, x, cfg=cfg: jnp.sum(moe(p, x, cfg)[0] ** 2), argnums=(0, 1)))
    fns[name] = lambda f=f, p=p: jax.block_until_ready(f(p, x))
  t = interleaved_times(fns, warmup=2, rounds=rounds)
  out = {"shape": {"tokens": B * L, "d_model": D, "dense_d_ff": F_DENSE, "experts": E, "top_k": K, "d_ff_expert": F_DENSE // K}, "dense_ms": 1e3 * t["dense"]}
  out.update({f"{n}_over_dense": t[n] / t["dense"] for n in variants})
  return out


# -- flops ---------------------------------------------------------------------------------------


def _compiled_flops(fn, *args) -> float:
  import jax

  from jaxlm.train import aot

  return aot.summary(jax.jit(fn).lower(*args).compile())["flops"]


def gshard_onehot(p, x_bld, cfg):
  """GShard's dispatch (Lepikhin et al. 2020): one-hot [B, L, E, C] dispatch/combine einsums."""
  import jax
  import jax.numpy as jnp

  from jaxlm.layers.moe.routing import capacity

  m = cfg.moe
  b, l, _ = x_bld.shape
  c = capacity(l, m)
  probs = jax.nn.softmax(jnp.einsum("bld,de->ble", x_bld, p["router"]), -1)
  w, e = jax.lax.top_k(probs, m.top_k)
  w = w / w.sum(-1, keepdims=True)
  onehot = jax.nn.one_hot(e.reshape(b, l * m.top_k), m.n_experts)  # [B, L*K, E], (token, k) priority
  pos = (jnp.cumsum(onehot, axis=1) - 1) * onehot
  slot = jax.nn.one_hot(jnp.sum(pos, -1).astype(jnp.int32), c) * (jnp.sum(pos * onehot, -1, keepdims=True) < c)  # [B, L*K, C]
  combine = jnp.einsum("bne,bnc,bn->bnec", onehot, slot, w.reshape(b, -1)).reshape(b, l, m.top_k, m.n_experts, c).sum(2)
  dispatch = (combine > 0).astype(x_bld.dtype)
  x_becd = jnp.einsum("blec,bld->becd", dispatch, x_bld)
  h = jax.nn.silu(jnp.einsum("becd,edf->becf", x_becd, p["w_gate"])) * jnp.einsum("becd,edf->becf", x_becd, p["w_up"])
  y_becd = jnp.einsum("becf,efd->becd", h, p["w_down"])
  return jnp.einsum("blec,becd->bld", combine, y_becd)


def bench_flops() -> dict[str, Any]:
  import jax

  from jaxlm.experiments import load
  from jaxlm.layers.moe import MoE, moe
  from jaxlm.train import aot, flops

  out: dict[str, Any] = {}
  x = jax.random.normal(jax.random.key(0), (B, L, D))
  # One layer's forward pass.
  ideal_layer = B * L * MoE.forward_flops_per_token(_cfg(), L)
  for name, cfg in {"dropless": _cfg(), f"capacity_{CF}": _cfg(mode="capacity", capacity_factor=CF)}.items():
    p = _layer_params(cfg)
    out[f"layer_{name}"] = _compiled_flops(lambda p, x, cfg=cfg: moe(p, x, cfg)[0], p, x) / ideal_layer
  cfg = _cfg(mode="capacity", capacity_factor=CF)
  out[f"layer_gshard_onehot_{CF}"] = _compiled_flops(lambda p, x: gshard_onehot(p, x, cfg), _layer_params(cfg), x) / ideal_layer
  out[f"gshard_onehot_analytical_{CF}"] = CF * (1 + 2 * L / (3 * (F_DENSE // K)))
  # The whole train step (forward, backward, AdamW), 4 unrolled layers.
  for name, overrides in {"dense_quickstart": None, "dropless": {}, f"capacity_{CF}": {"mode": "capacity", "capacity_factor": CF}}.items():
    exp = load("quickstart") if overrides is None else load("moe_quickstart")
    if overrides:
      exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, moe=dataclasses.replace(exp.model.moe, **overrides)))
    exp = dataclasses.replace(exp, mesh=dataclasses.replace(exp.mesh, fsdp=1))
    b, l = exp.data.batch_size, exp.data.seq_len
    compiled = aot.summary(aot.compile_train_step(exp, jax.devices()[:1]))["flops"]
    out[f"train_step_{name}"] = compiled / (b * l * flops.train_flops_per_token(exp.model, l))
  return out


# -- all-to-all bytes ----------------------------------------------------------------------------

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "pred": 1}


def hlo_collective_bytes(hlo: str, op: str) -> list[int]:
  """Result bytes of every `op` in HLO text (per device, SPMD-partitioned shapes; for an
  all-to-all = its operands; XLA:CPU writes it in tuple form, one array per peer)."""
  sizes = []
  for line in hlo.splitlines():
    m = re.search(rf"= (.*?) {re.escape(op)}\(", line)
    if m:
      arrays = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
      sizes.append(sum(_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in arrays))
  return sizes


def _ep_layer_hlo(mesh, cfg, dtype) -> str:
  import jax
  import jax.numpy as jnp

  from jaxlm import sharding
  from jaxlm.layers.moe import moe

  p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), _layer_params(cfg))
  x = jax.ShapeDtypeStruct((B, L, D), dtype)
  mesh_shape = dict(zip(mesh.axis_names, mesh.devices.shape))
  shard = lambda names, s: jax.sharding.NamedSharding(mesh, sharding.spec(names, s.shape, mesh_shape))
  p_sh = {"router": shard(("embed", None), p["router"]), **{k: shard(("expert", "embed", "mlp") if k != "w_down" else ("expert", "mlp", "embed"), p[k]) for k in ("w_gate", "w_up", "w_down")}}
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda p, x: moe(p, x, cfg)[0], in_shardings=(p_sh, shard(("batch", None, None), x))).lower(p, x)
    return lowered.compile().as_text()


def a2a_padded() -> dict[str, Any]:
  """In a process with 8 (fake) CPU devices: padded all-to-all bytes of one layer / minimum."""
  import jax

  from jaxlm import sharding
  from jaxlm.config import MeshConfig

  ep = 8
  mesh = sharding.make_mesh(MeshConfig(expert=ep, fsdp=1))
  tokens_per_device = B * L // ep
  minimum = 2 * tokens_per_device * K * D * 4  # float32 (XLA:CPU also compiles bf16 all-to-alls as f32)
  out = {"devices": ep, "tokens_per_device": tokens_per_device, "minimum_bytes": minimum}
  for name, cfg in {"dropless_padded": _cfg(all_to_all="padded"), f"capacity_{CF}_padded": _cfg(mode="capacity", capacity_factor=CF, all_to_all="padded")}.items():
    sizes = hlo_collective_bytes(_ep_layer_hlo(mesh, cfg, jax.numpy.float32), "all-to-all")
    out[name] = {"all_to_all_ops": len(sizes), "bytes": sum(sizes), "ratio": sum(sizes) / minimum}
  return out


def a2a_ragged_tpu() -> dict[str, Any]:
  """Compiled for a TPU v5p topology (needs libtpu): bytes of the ragged all-to-alls / minimum."""
  import jax
  from jax.experimental import topologies

  from jaxlm.config import MESH_AXES

  ep = 8
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2")
  devices = np.array(topo.devices).reshape(1, 1, ep, 1)
  mesh = jax.sharding.Mesh(devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  cfg = dataclasses.replace(_cfg(all_to_all="ragged", gmm_backend="ragged_dot"), dtype="bfloat16")
  hlo = _ep_layer_hlo(mesh, cfg, jax.numpy.bfloat16)
  ragged = hlo_collective_bytes(hlo, "ragged-all-to-all")
  small = hlo_collective_bytes(hlo, "all-to-all")
  tokens_per_device = B * L // ep
  n_rows = tokens_per_device * K
  minimum = 2 * n_rows * D * 2
  # A ragged all-to-all sends exactly send_sizes rows: each way, the N routed rows of a device.
  sent = 2 * n_rows * D * 2
  return {
      "topology": "v5p:2x2x2",
      "devices": ep,
      "ragged_all_to_all_ops": len(ragged),
      "ragged_output_buffer_bytes": ragged,  # receive-buffer bounds (worst case), not bytes sent
      "metadata_all_to_all_bytes": sum(small),
      "rows_sent_each_way": n_rows,
      "ratio": (sent + sum(small)) / minimum,
      "note": "rows sent = sum(send_sizes) = the device's routed rows (data-dependent sizes; the HLO shows only buffer bounds); metadata = per-device sizes and offsets",
  }


def _in_child(fn_name: str, env: dict[str, str]) -> dict[str, Any]:
  """Run `benchmarks.moe.<fn_name>()` in a fresh process (its own devices/platform); its JSON result."""
  code = f"import json; from benchmarks.moe import {fn_name}; print('RESULT' + json.dumps({fn_name}()))"
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  return json.loads(lines[-1][6:]) if lines else {"error": proc.stderr.strip().splitlines()[-3:]}


def bench_all_to_all() -> dict[str, Any]:
  out: dict[str, Any] = {}
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out["padded_cpu"] = _in_child("a2a_padded", env)
  import importlib.util

  if importlib.util.find_spec("libtpu") is None:
    out["ragged_tpu"] = {"skipped": "libtpu not installed (pip install 'jaxlm[tpu]'): the ragged path compiles only for TPU/GPU"}
  else:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the TPU plugin describes the topology
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # this process may hold libtpu already
    out["ragged_tpu"] = _in_child("a2a_ragged_tpu", env)
  return out


def main(argv: list[str]) -> None:
  from benchmarks.common import write_result

  rounds = next((int(a.split("=")[1]) for a in argv if a.startswith("--rounds=")), 10)
  result = {"goals": GOALS, "time": bench_time(rounds), "flops": bench_flops(), "all_to_all": bench_all_to_all()}
  print(json.dumps({k: v for k, v in result.items() if k != "goals"}, indent=2))
  write_result("moe", result)


if __name__ == "__main__":
  main(sys.argv[1:])
