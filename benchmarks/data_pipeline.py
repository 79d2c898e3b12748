"""Input-pipeline throughput against the train step's consumption, in tokens/s (goal: >= 5x).

Pipeline: the training pipeline of the experiment (`loop.datasets`: its sources, tokenizer,
mixture and packing), timed over whole batches after the first; the median of several windows.
On this shared machine the variants are timed in alternating windows (`_interleaved_rates`) so
that a slow spell hits them alike:
  before      dense_100m read in process as before jaxlm.data.packing: grain's ConcatThenSplit,
              batch and a map to the fields; the same batches as workers=0.
  workers     `data.workers` = 0, 1, 2 processes reading and tokenizing documents
              (jaxlm.data.workers; the same batches for every count), at most one per core here.
  CPU time    every window also records the CPU seconds per batch of the training process (all its
              threads) and of its workers (/proc): less distorted by a busy machine than tokens/s.
              In process, tokens per CPU second is what one free core would give. With workers,
              the training process's packing and mixing bound a host whatever its number of
              workers (its tokens per CPU second: the ceiling), and a worker reads so many tokens
              per CPU second: `workers_for_goal` is the number of workers (a core each) that reach
              the goal, where the ceiling allows it (None where it does not).

Consumption:
  quickstart   measured: the compiled train step on this machine (a CPU here), tokens per step /
               seconds per step, on a synthetic batch.
  dense_100m   a CPU step says nothing about an accelerator, so it is estimated: tokens/s per chip
               = MFU x peak bf16 FLOP/s / train FLOPs per token (jaxlm.train.flops, 6N + attention),
               at MFU 0.40 on an H100 SXM (989 TFLOP/s) and a TPU v5p chip (459 TFLOP/s). The
               ratio is given per chip and per host (8 H100s or 4 v5p chips).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.train_step import seconds_per_step
from jaxlm import experiments
from jaxlm.data import pipeline, tokenizers
from jaxlm.train import flops, loop

MFU = 0.40
ACCELERATORS = {"H100 SXM": ("H100", 8), "TPU v5p": ("TPU v5p", 4)}  # name: (peak_flops key, chips per host)
GOAL = 5.0


def _first(it) -> tuple[float, int]:
  """(seconds to the first batch, its tokens): builds the sources (the stdlib corpus once per
  cache), starts any workers and fills the packers."""
  t0 = time.perf_counter()
  first = next(it)
  return time.perf_counter() - t0, int(first["loss_mask"].sum())


def _interleaved_rates(its: dict, tokens_per_batch: int, *, seconds: float, windows: int, pids: dict | None = None) -> dict[str, dict[str, list[float]]]:
  """Per iterator and window of `seconds` (the iterators taking turns, `windows` rounds): tokens/s,
  and CPU seconds per batch of this process (all its threads) and of the processes `pids[name]()`
  (its workers). CPU time is what a busy shared machine distorts least."""
  pids = pids or {}
  out: dict[str, dict[str, list[float]]] = {k: {"tokens_per_sec": [], "cpu": [], "worker_cpu": []} for k in its}
  for _ in range(windows):
    for name, it in its.items():
      procs = pids.get(name, list)()
      n, t0, c0, w0 = 0, time.perf_counter(), time.process_time(), _cpu_seconds(procs)
      while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
      r = out[name]
      r["tokens_per_sec"].append(n * tokens_per_batch / (time.perf_counter() - t0))
      r["cpu"].append((time.process_time() - c0) / n)
      r["worker_cpu"].append((_cpu_seconds(procs) - w0) / n)
  return out


def _median(xs: list[float]) -> float:
  return sorted(xs)[len(xs) // 2]


def _summary(r: dict[str, list[float]], first_batch_seconds: float, tokens_per_batch: int) -> dict:
  cpu, worker_cpu = _median(r["cpu"]), _median(r["worker_cpu"])
  return {
      "tokens_per_sec": _median(r["tokens_per_sec"]),
      "windows": sorted(r["tokens_per_sec"]),
      "training_process_cpu_seconds_per_batch": cpu,
      "worker_cpu_seconds_per_batch": worker_cpu,
      "training_process_tokens_per_cpu_second": tokens_per_batch / cpu,  # the ceiling: workers cannot take this work
      "tokens_per_cpu_second": tokens_per_batch / (cpu + worker_cpu),  # all processes together
      "first_batch_seconds": first_batch_seconds,
      "tokens_per_batch": tokens_per_batch,
  }


def pipeline_tokens_per_sec(exp, *, seconds: float, windows: int) -> dict:
  tok = tokenizers.load(exp.data)
  it = iter(loop.datasets(exp, tok, "train"))
  startup, tokens = _first(it)
  return _summary(_interleaved_rates({"": it}, tokens, seconds=seconds, windows=windows)[""], startup, tokens)


def _grain_pack(docs, seq_len: int):
  """The packer before jaxlm.data.packing: grain's ConcatThenSplit."""
  from grain import experimental as grain_experimental

  return grain_experimental.ConcatThenSplitIterDataset(docs, length_struct={"inputs": seq_len, "targets": seq_len})


def _grain_batches(rows, batch_size: int):
  """The batching before pipeline.Batches: grain's batch, then a map to the batch's fields."""

  def finalize(packed):
    seg = packed["targets_segment_ids"].astype(np.int32)
    fields = {"inputs": packed["inputs"], "targets": packed["targets"], "positions": packed["inputs_positions"], "source": packed["source"]}
    return {**{k: v.astype(np.int32) for k, v in fields.items()}, "segment_ids": seg, "loss_mask": (seg > 0).astype(np.int32)}

  return rows.batch(batch_size, drop_remainder=True).map(finalize)


def _pool_of(ds):
  """The worker pool inside a pipeline (jaxlm.data.workers.Pool), found through its parents."""
  from jaxlm.data.workers import PooledDocuments

  todo = [ds]
  while todo:
    d = todo.pop()
    if isinstance(d, PooledDocuments):
      return d.pool
    todo.extend(getattr(d, "parents", ()))
  return None


def _cpu_seconds(pids: list[int]) -> float:
  """User + system CPU seconds of processes (Linux /proc)."""
  total = 0
  for pid in pids:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
  return total / os.sysconf("SC_CLK_TCK")


def dense_pipeline(exp, *, seconds: float, windows: int, max_workers: int) -> dict:
  """The packer before/after and the worker counts, timed in alternating windows, and the CPU
  time per batch of the training process and of the workers."""
  tok = tokenizers.load(exp.data)
  with_workers = lambda w: dataclasses.replace(exp, data=dataclasses.replace(exp.data, workers=w))  # noqa: E731
  old = pipeline._pack, pipeline.Batches
  pipeline._pack, pipeline.Batches = _grain_pack, _grain_batches  # the pipeline as it was
  try:
    before = loop.datasets(exp, tok, "train")
  finally:
    pipeline._pack, pipeline.Batches = old
  datasets = {"before": before, **{f"workers={w}": loop.datasets(with_workers(w), tok, "train") for w in range(max_workers + 1)}}
  its, firsts = {}, {}
  for name, ds in datasets.items():
    its[name] = iter(ds)
    firsts[name], tokens = _first(its[name])
  pids = {name: pool.pids for name, ds in datasets.items() if (pool := _pool_of(ds)) is not None}
  rates = _interleaved_rates(its, tokens, seconds=seconds, windows=windows, pids=pids)
  out = {name: _summary(r, firsts[name], tokens) for name, r in rates.items()}
  for it in its.values():
    if hasattr(it, "close"):
      it.close()
  w = out[f"workers={max_workers}"]
  cpu = {
      "from": f"workers={max_workers}",
      "training_process_tokens_per_cpu_second": w["training_process_tokens_per_cpu_second"],
      "worker_tokens_per_cpu_second": tokens / w["worker_cpu_seconds_per_batch"],
  }
  speedup = {k: out["workers=0"][k] / out["before"][k] for k in ("tokens_per_sec", "tokens_per_cpu_second")}
  return {"variants": out, "cpu": cpu, "speedup_in_process": speedup}


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
  seconds, windows = (1.0, 3) if quick else (3.0, 7)
  cases = {}

  exp = experiments.load("quickstart")
  pipe = pipeline_tokens_per_sec(exp, seconds=seconds, windows=windows)
  step = measured_step(exp, steps=2 if quick else 4)
  cases["quickstart"] = {"seq_len": exp.data.seq_len, "batch_size": exp.data.batch_size, "pipeline": pipe, "consumption": step, "ratio": pipe["tokens_per_sec"] / step["tokens_per_sec"]}
  print(f"  quickstart: pipeline {pipe['tokens_per_sec']:,.0f} tokens/s, train step {step['tokens_per_sec']:,.0f} tokens/s ({step['how']}): ratio {cases['quickstart']['ratio']:,.0f}x")

  exp = experiments.load("dense_100m")
  dense = dense_pipeline(exp, seconds=seconds, windows=windows, max_workers=max(1, min(2, (os.cpu_count() or 1))))
  est = estimated_consumption(exp)
  variants, cpu = dense["variants"], dense["cpu"]
  for name, v in variants.items():
    print(
        f"  dense_100m pipeline, {name}: {v['tokens_per_sec']:,.0f} tokens/s; CPU per batch: training process {v['training_process_cpu_seconds_per_batch'] * 1e3:.2f} ms, "
        f"workers {v['worker_cpu_seconds_per_batch'] * 1e3:.2f} ms ({v['tokens_per_cpu_second']:,.0f} tokens per CPU second); first batch {v['first_batch_seconds']:.1f} s"
    )
  sp = dense["speedup_in_process"]
  print(f"  in process vs before (grain's ConcatThenSplit, batch and map): {sp['tokens_per_sec']:.2f}x tokens/s, {sp['tokens_per_cpu_second']:.2f}x tokens per CPU second")
  print(f"  the training process's ceiling ({cpu['from']}): {cpu['training_process_tokens_per_cpu_second']:,.0f} tokens/s; a worker: {cpu['worker_tokens_per_cpu_second']:,.0f} tokens per CPU second")
  ratios = {}
  for name, acc in est["accelerators"].items():
    per_host = acc["tokens_per_sec_per_host"]
    need = GOAL * per_host
    ratios[name] = {
        "per_host": {v: variants[v]["tokens_per_sec"] / per_host for v in variants},
        "per_chip": {v: variants[v]["tokens_per_sec"] / acc["tokens_per_sec_per_chip"] for v in variants},
        "per_host_by_cpu_time": {v: variants[v]["tokens_per_cpu_second"] / per_host for v in ("before", "workers=0")},  # one busy core's rate, less distorted by the load
        "training_process_ceiling_per_host": cpu["training_process_tokens_per_cpu_second"] / per_host,
        "workers_for_goal": math.ceil(need / cpu["worker_tokens_per_cpu_second"]) if cpu["training_process_tokens_per_cpu_second"] >= need else None,
    }
    r = ratios[name]
    print(
        f"  dense_100m on {name} (MFU {MFU:.0%}: {per_host:,.0f} tokens/s per host of {acc['chips_per_host']}): ratio per host "
        + ", ".join(f"{v} {x:.2f}x" for v, x in r["per_host"].items())
        + "; by CPU time in process: "
        + ", ".join(f"{v} {x:.2f}x" for v, x in r["per_host_by_cpu_time"].items())
        + f"; training-process ceiling {r['training_process_ceiling_per_host']:.1f}x; workers for {GOAL:g}x: {r['workers_for_goal']}"
    )
  cases["dense_100m"] = {"seq_len": exp.data.seq_len, "batch_size": exp.data.batch_size, "pipeline": variants["workers=0"], "pipeline_variants": variants, "cpu": cpu, "speedup_in_process": dense["speedup_in_process"], "consumption": est, "ratio": ratios, "cpu_step_reference": cpu_reference("dense_100m")}
  write_result(
      "data_pipeline",
      {
          "goal": f"pipeline tokens/s >= {GOAL:g} x the train step's consumption",
          "pipeline_process": "workers=0: the training process (one Python thread packing and mixing, a few grain read threads per source); workers=W: W processes read and tokenize documents, the training process packs and mixes",
          "noise": "a shared 2-core machine: other work slows every variant; the variants alternate in windows of a few seconds and the median window is reported",
          "load_average_1min": os.getloadavg()[0],
          "cases": cases,
      },
  )


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
