"""`jaxlm inspect`: parameters, FLOPs, memory per device and the sharding of every parameter.

Nothing is allocated: the model is built with `eval_shape` and laid out on an abstract mesh of
the size the experiment is written for (`mesh.devices`, else the devices present), so a TPU
pod experiment can be inspected on a laptop.

Activation memory is an estimate (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", Sec. 4): a block keeps about L*B*D*(34 + 5*H*L/D) bytes of 16-bit
activations without recomputation, about 2*L*B*D bytes (its input) with full recomputation,
and in between for the `dots` policies; divided over the devices that split batch and heads.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlm import peft, sharding
from jaxlm.config import Experiment
from jaxlm.models import param_counts
from jaxlm.train import flops
from jaxlm.train.run import initial_model
from jaxlm.train.step import is_parameter


def _human(n: float, unit: str = "") -> str:
  for s, d in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= d:
      return f"{n / d:.2f}{s}{unit}"
  return f"{n:.0f}{unit}"


def _bytes(n: float) -> str:
  for s, d in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= d:
      return f"{n / d:.2f} {s}"
  return f"{n:.0f} B"


def _path(keys) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def report(exp: Experiment, n_devices: int | None = None) -> dict[str, Any]:
  """The numbers `jaxlm inspect` prints, as a dict."""
  n = n_devices or exp.mesh.devices or jax.device_count()
  mesh_shape = exp.mesh.shape(n)
  rules = sharding.make_rules(exp.mesh.rules)
  cfg = exp.model
  model = initial_model(exp, None, rules, abstract=True)  # with the PEFT method's adapters
  is_trainable = peft.trainable(exp.peft)
  rows, param_bytes, moment_bytes, grad_bytes, n_trainable = [], 0.0, 0.0, 0.0, 0
  for keys, var in nnx.to_flat_state(nnx.state(model, is_parameter)):
    spec = sharding.spec(sharding.logical_axes_of(var), var.shape, mesh_shape, rules)
    split = math.prod(mesh_shape[a] for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry))
    per_dev = var.size * np.dtype(var.dtype).itemsize / split
    param_bytes += per_dev
    trainable = is_trainable(keys, var)
    if trainable:
      moment_bytes += 2 * per_dev * 4 / np.dtype(var.dtype).itemsize  # AdamW: two float32 moments
      grad_bytes += per_dev
      n_trainable += var.size
    name = ".".join(str(k) for k in keys)
    rows.append({"name": name, "shape": tuple(var.shape), "axes": sharding.logical_axes_of(var), "spec": str(spec), "bytes_per_device": per_dev, "trainable": trainable})
  counts = param_counts(cfg)
  seq, batch = exp.data.seq_len, exp.data.batch_size // exp.train.grad_accum
  batch_shards = math.prod(mesh_shape[a] for a in rules["batch"])
  tensor = mesh_shape["tensor"]
  per_layer = {
      "none": seq * batch * cfg.d_model * (34 + 5 * cfg.n_heads * seq / cfg.d_model),
      "dots": seq * batch * cfg.d_model * 14,
      "dots_no_batch": seq * batch * cfg.d_model * 18,
      "full": 2 * seq * batch * cfg.d_model,
  }[cfg.remat]
  acts = (per_layer * cfg.n_layers + seq * batch * cfg.vocab_size * 4 * 2) / (batch_shards * tensor)
  fpt = flops.train_flops_per_token(cfg, seq, frozen_base=exp.peft.method != "none")
  return {
      "devices": n,
      "mesh": mesh_shape,
      "params_total": counts["total"],
      "params_active": counts["active"],
      "params_embedding": counts["embedding"],
      "params_trainable": n_trainable,
      "train_flops_per_token": fpt,
      "memory_per_device": {
          "params": param_bytes,
          "optimizer": moment_bytes,
          "gradients": grad_bytes,
          "activations (estimate)": acts,
      },
      "parameters": rows,
  }


def format_report(exp: Experiment, r: dict[str, Any]) -> str:
  lines = [
      f"experiment  {exp.name}" + (f": {exp.description}" if exp.description else ""),
      f"mesh        {r['devices']} devices  " + "  ".join(f"{a}={s}" for a, s in r["mesh"].items()),
      f"parameters  {_human(r['params_total'])} total, {_human(r['params_active'])} active per token, {_human(r['params_embedding'])} in the embedding"
      + (f"; {_human(r['params_trainable'])} trained ({exp.peft.method})" if exp.peft.method != "none" else ""),
      f"FLOPs       {_human(r['train_flops_per_token'], 'FLOP')} per token (train: {'2' if exp.peft.method != 'none' else '3'} x forward, attention included); "
      f"{_human(r['train_flops_per_token'] * exp.data.seq_len * exp.data.batch_size, 'FLOP')} per step",
      "memory per device:",
  ]
  mem = r["memory_per_device"]
  for k, v in mem.items():
    lines.append(f"  {k:<24}{_bytes(v):>12}")
  lines.append(f"  {'total':<24}{_bytes(sum(mem.values())):>12}")
  if "compiled" in r:
    c = r["compiled"]
    lines.append(f"compiled for {c['topology']} ({c['devices']} x {c['device_kind']}), per device:")
    for k in ("arguments", "outputs", "temporaries", "aliased", "peak_estimate"):
      lines.append(f"  {k:<24}{_bytes(c[k]):>12}")
    lines.append(f"  {'XLA FLOPs per step':<24}{_human(c['flops'], 'FLOP'):>12}")
  width = max(len(p["name"]) for p in r["parameters"])
  lines.append("parameters (logical axes -> mesh sharding):")
  for p in r["parameters"]:
    axes = ",".join(a or "-" for a in p["axes"])
    lines.append(f"  {p['name']:<{width}}  {str(list(p['shape'])):<22} {axes:<34} {p['spec']:<34} {_bytes(p['bytes_per_device']):>11}/device")
  return "\n".join(lines)
