"""Train-step throughput and compiled-vs-analytical FLOPs for the quickstart and a ~100M model.

FLOPs ratio = XLA's `cost_analysis` of the whole compiled train step (forward, backward,
optimizer) / the analytical model FLOPs of `jaxlm.train.flops` (6N + attention, per token, x
tokens per step). Layers are unrolled and the loss is computed in one piece (train.loss_chunk=0)
for this count: XLA counts a `scan` body only once (the loss's chunks add one forward matmul of
the head, 2 x D x V FLOPs per token: benchmarks/loss_memory.py).
Goal: <= 1.10 (no wasted compute). Throughput is measured on whatever backend is present;
on a CPU it only says how long `make train` takes, on an accelerator the MFU is meaningful.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from benchmarks.common import write_result
from jaxlm import experiments
from jaxlm.config import MeshConfig
from jaxlm.report import report
from jaxlm.train import aot, flops, loop

CASES = {
    # name: (experiment, overrides for the timed run: the ~100M step is far too slow on a CPU at full batch)
    "quickstart": ("quickstart", {}),
    "dense_100m": ("dense_100m", {"batch_size": 2}),
}


def synthetic_batch(b: int, l: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, vocab, (b, l + 1)).astype(np.int32)
  seg = np.ones((b, l), np.int32)
  pos = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy()
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos, "loss_mask": seg}


def one_device(exp):
  """`exp` on one device with its layers unrolled (cost analysis counts a scanned body once)."""
  return dataclasses.replace(exp, mesh=MeshConfig(fsdp=1, devices=1), model=dataclasses.replace(exp.model, scan_layers=False))


class CompiledStep:
  """`exp`'s train step compiled for a synthetic batch on the first device: `step()` runs one
  (blocking, on the state the previous call left: the step donates it), `flops` its compiled FLOPs."""

  def __init__(self, exp):
    self.setup = setup = loop.prepare(exp, jax.devices()[:1])
    with jax.set_mesh(setup.mesh):
      self.batch = loop.to_global(synthetic_batch(exp.data.batch_size, exp.data.seq_len, exp.model.vocab_size), setup.batch_sharding)
      self.train = setup.train_step.lower(setup.state, self.batch).compile()
    self.state = setup.state
    self.flops = aot.summary(self.train)["flops"]

  def step(self) -> None:
    with jax.set_mesh(self.setup.mesh):
      self.state, m = self.train(self.state, self.batch)
      jax.block_until_ready(m)


def seconds_per_step(exp, *, steps: int) -> float:
  """Mean seconds of `steps` compiled train steps on a synthetic batch, after one warm-up."""
  b, l = exp.data.batch_size, exp.data.seq_len
  setup = loop.prepare(exp)
  with jax.set_mesh(setup.mesh):
    batch = loop.to_global(synthetic_batch(b, l, exp.model.vocab_size), setup.batch_sharding)
    compiled = setup.train_step.lower(setup.state, batch).compile()
    state, m = compiled(setup.state, batch)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
  return (time.perf_counter() - t0) / steps


def measure(name: str, overrides: dict, *, steps: int) -> dict:
  base = experiments.load(name)
  exp = dataclasses.replace(base, mesh=MeshConfig(fsdp=-1), model=dataclasses.replace(base.model, scan_layers=False))
  cpu = jax.default_backend() == "cpu"
  if cpu:
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, dtype="float32"))  # CPUs have no fast bf16
  b, l = exp.data.batch_size, exp.data.seq_len
  # The FLOPs ratio at the full batch, from an abstract state (nothing allocated).
  one_piece = dataclasses.replace(exp, train=dataclasses.replace(exp.train, loss_chunk=0))
  compiled_flops = aot.summary(aot.compile_train_step(one_piece, jax.devices()))["flops"]
  analytical = flops.train_flops_per_token(exp.model, l) * b * l
  result = {
      "experiment": name,
      "params": report(exp, jax.device_count())["params_total"],
      "tokens_per_step": b * l,
      "compiled_flops": compiled_flops,
      "analytical_flops": float(analytical),
      "flops_ratio": compiled_flops / analytical,
  }
  # Throughput, at a smaller batch where asked.
  exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, **overrides))
  b = exp.data.batch_size
  dt = seconds_per_step(exp, steps=steps)
  tok_s = b * l / dt
  result.update(
      {
          "timed_batch": [b, l],
          "timed_dtype": exp.model.dtype,
          "seconds_per_step": dt,
          "tokens_per_sec": tok_s,
          "model_tflops_per_sec_per_device": tok_s * flops.train_flops_per_token(exp.model, l) / jax.device_count() / 1e12,
      }
  )
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  if peak:
    result["mfu"] = result["model_tflops_per_sec_per_device"] * 1e12 / peak
  return result


def main(argv: list[str]) -> None:
  quick = "--quick" in argv
  rows = {}
  for case, (name, overrides) in CASES.items():
    rows[case] = measure(name, overrides, steps=2 if quick else 5)
    r = rows[case]
    print(f"{case:>12}: {r['params'] / 1e6:.1f}M params, FLOPs compiled/analytical = {r['flops_ratio']:.3f}, {r['tokens_per_sec']:,.0f} tokens/s ({r['timed_dtype']})")
  write_result("train_step", {"goal": "flops_ratio <= 1.10", "cases": rows})


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
