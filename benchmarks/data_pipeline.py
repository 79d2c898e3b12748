"""Input-pipeline throughput against the train step's consumption, in tokens/s (goal: >= 5x).

Pipeline: the training pipeline of the experiment (`loop.datasets`: its sources, tokenizer,
mixture and packing), in this one process as `jaxlm train` runs it (no worker processes), timed
over whole batches after the first; the median of several windows.

The pipeline runs in one Python process per host (the GIL makes it one core's work); a host whose
chips consume more than a fifth of that needs its batches built in several processes
(`pipeline_processes_per_host_for_goal`), which jaxlm does not do yet.

Consumption:
  quickstart   measured: the compiled train step on this machine (a CPU here), tokens per step /
               seconds per step, on a synthetic batch.
  dense_100m   a CPU step says nothing about an accelerator, so it is estimated: tokens/s per chip
               = MFU x peak bf16 FLOP/s / train FLOPs per token (jaxlm.train.flops, 6N + attention),
               at MFU 0.40 on an H100 SXM (989 TFLOP/s) and a TPU v5p chip (459 TFLOP/s). The
               ratio is given per chip (one pipeline process per chip) and per host (one process
               feeding 8 H100s or 4 v5p chips).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax

from benchmarks.common import RESULTS, write_result
from benchmarks.train_step import seconds_per_step
from jaxlm import experiments
from jaxlm.data import pipeline, tokenizers
from jaxlm.train import flops, loop

MFU = 0.40
ACCELERATORS = {"H100 SXM": ("H100", 8), "TPU v5p": ("TPU v5p", 4)}  # name: (peak_flops key, chips per host)
GOAL = 5.0


def pipeline_tokens_per_sec(exp, *, seconds: float, windows: int) -> dict:
  tok = tokenizers.load(exp.data)
  it = iter(loop.datasets(exp, tok, "train"))
  t0 = time.perf_counter()
  first = next(it)  # builds the sources (the stdlib corpus once per cache) and fills the packers
  startup = time.perf_counter() - t0
  tokens_per_batch = int(first["loss_mask"].sum())
  rates = []
  for _ in range(windows):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      next(it)
      n += 1
    rates.append(n * tokens_per_batch / (time.perf_counter() - t0))
  rates.sort()
  return {"tokens_per_sec": rates[len(rates) // 2], "windows": rates, "first_batch_seconds": startup, "tokens_per_batch": tokens_per_batch}


def measured_step(exp, *, steps: int) -> dict:
  """Seconds per compiled train step on this machine's devices (float32 on a CPU)."""
  if jax.default_backend() == "cpu":
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, dtype="float32"))
  b, l = exp.data.batch_size, exp.data.seq_len
  dt = seconds_per_step(exp, steps=steps)
  return {"how": f"measured: compiled train step on {jax.device_count()} x {jax.devices()[0].device_kind}, {exp.model.dtype}", "seconds_per_step": dt, "tokens_per_sec": b * l / dt}


def estimated_consumption(exp) -> dict:
  per_token = flops.train_flops_per_token(exp.model, exp.data.seq_len)
  out = {"how": f"estimated: MFU {MFU:.2f} x peak bf16 FLOP/s / {per_token:.4g} train FLOPs per token (6N + attention)", "train_flops_per_token": per_token, "mfu": MFU, "accelerators": {}}
  for name, (kind, chips) in ACCELERATORS.items():
    per_chip = MFU * flops.peak_flops(kind) / per_token
    out["accelerators"][name] = {"peak_flops": flops.peak_flops(kind), "chips_per_host": chips, "tokens_per_sec_per_chip": per_chip, "tokens_per_sec_per_host": per_chip * chips}
  return out


def cpu_reference(case: str) -> dict | None:
  """The CPU step of benchmarks/train_step.py, for reference only (its results file, if any)."""
  path = RESULTS / "train_step.json"
  if not path.is_file():
    return None
  r = json.loads(path.read_text())["cases"].get(case)
  return r and {"timed_batch": r["timed_batch"], "tokens_per_sec": r["tokens_per_sec"], "note": "benchmarks/train_step.py on this CPU: not a consumption figure"}


def main(argv: list[str]) -> None:
  quick = "--quick" in argv
  seconds, windows = (1.0, 3) if quick else (4.0, 5)
  cases = {}

  exp = experiments.load("quickstart")
  pipe = pipeline_tokens_per_sec(exp, seconds=seconds, windows=windows)
  step = measured_step(exp, steps=2 if quick else 4)
  cases["quickstart"] = {"seq_len": exp.data.seq_len, "batch_size": exp.data.batch_size, "pipeline": pipe, "consumption": step, "ratio": pipe["tokens_per_sec"] / step["tokens_per_sec"]}
  print(f"  quickstart: pipeline {pipe['tokens_per_sec']:,.0f} tokens/s, train step {step['tokens_per_sec']:,.0f} tokens/s ({step['how']}): ratio {cases['quickstart']['ratio']:,.0f}x")

  exp = experiments.load("dense_100m")
  pipe = pipeline_tokens_per_sec(exp, seconds=seconds, windows=windows)
  est = estimated_consumption(exp)
  ratios = {}
  for name, acc in est["accelerators"].items():
    ratios[name] = {
        "per_chip": pipe["tokens_per_sec"] / acc["tokens_per_sec_per_chip"],
        "per_host": pipe["tokens_per_sec"] / acc["tokens_per_sec_per_host"],
        "pipeline_processes_per_host_for_goal": math.ceil(GOAL * acc["tokens_per_sec_per_host"] / pipe["tokens_per_sec"]),
    }
    print(
        f"  dense_100m: pipeline {pipe['tokens_per_sec']:,.0f} tokens/s; {name} at MFU {MFU:.0%} consumes {acc['tokens_per_sec_per_chip']:,.0f} tokens/s per chip: "
        f"ratio {ratios[name]['per_chip']:.1f}x per chip, {ratios[name]['per_host']:.2f}x for a host of {acc['chips_per_host']}"
    )
  cases["dense_100m"] = {"seq_len": exp.data.seq_len, "batch_size": exp.data.batch_size, "pipeline": pipe, "consumption": est, "ratio": ratios, "cpu_step_reference": cpu_reference("dense_100m")}
  write_result(
      "data_pipeline",
      {
          "goal": f"pipeline tokens/s >= {GOAL:g} x the train step's consumption",
          "pipeline_process": "the training process itself, one Python thread doing the packing (a few grain read threads per source)",
          "load_average_1min": os.getloadavg()[0],  # a shared 2-core machine: other work slows both sides
          "cases": cases,
      },
  )


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
