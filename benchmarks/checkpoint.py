"""Checkpoints: what an asynchronous save costs the train loop, and host memory during a save.

  stall_ratio      one save's stall / one step's time. Goal <= 0.05. The stall is measured as the
                   loop sees it: rounds of K steps dispatched back to back, with a save started
                   after the first step or without one, timed interleaved; stall = median round
                   with a save - median round without. K is large enough for the background write
                   to end inside the round (write_s: one save's call plus write, on its own). It holds the time inside
                   `Checkpointer.save` (per-array digests on the devices, Orbax copying the arrays
                   to host memory, its bookkeeping), the bubble of waiting for the step to finish
                   before copying, and the rest of the write, waited for at the end of the round
                   (on a CPU the background write competes with the steps for the same cores).
  amortised_ratio  stall / (checkpoint_every x step time): the share of a run's time its checkpoints
                   cost at the experiment's own checkpoint_every.
  blocking_s       time inside `Checkpointer.save`, called once the step is done (the loop's next
                   step waits for this: blocking_ratio = blocking_s / step time is the least stall a
                   save can cost); digest_s is the digests' part of it.
  save_cpu_ratio   CPU seconds of one save (all threads, from the call to the end of the write) /
                   CPU seconds of one step: on a CPU backend, where the write and the step share
                   the cores, the stall cannot be below this, however asynchronous the save.
  host_rss_ratio   peak rise of this process's resident memory (VmRSS, sampled every millisecond)
                   from the start of a save to the end of its write / the state's bytes on this
                   process. On a CPU backend the "device" arrays live in that same memory, so this
                   is the extra host copy Orbax makes (plus its write buffers).

On a CPU the step is slow and the copy is a memcpy, so the ratio is far below what an accelerator
would see: there the copy crosses PCIe (H100: ~25 GB/s) while the step is ~100x faster.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import resource
import tempfile
import threading
import time
from pathlib import Path

import jax

from benchmarks.common import interleaved_times, write_result
from benchmarks.train_step import synthetic_batch
from jaxlm import experiments
from jaxlm.config import CheckpointConfig, MeshConfig
from jaxlm.train import checkpoint, loop

CASES = {
    # name: (experiment, data overrides: dense_100m's full batch takes minutes a step on a CPU)
    "quickstart": ("quickstart", {}),
    "dense_100m": ("dense_100m", {"batch_size": 8, "seq_len": 64}),
}
GOAL = 0.05


def rss_bytes() -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
  return 0


class PeakRSS:
  """Samples VmRSS every millisecond in a thread; `peak` is the highest seen."""

  def __enter__(self) -> "PeakRSS":
    self.start = self.peak = rss_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self) -> None:
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      time.sleep(0.001)

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def measure(name: str, overrides: dict, *, min_k: int, rounds: int) -> dict:
  base = experiments.load(name)
  exp = dataclasses.replace(base, mesh=MeshConfig(fsdp=-1), data=dataclasses.replace(base.data, **overrides))
  if jax.default_backend() == "cpu":
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, dtype="float32"))  # CPUs have no fast bf16
  setup = loop.prepare(exp)
  with jax.set_mesh(setup.mesh):
    batch = loop.to_global(synthetic_batch(exp.data.batch_size, exp.data.seq_len, exp.model.vocab_size), setup.batch_sharding)
    compiled = setup.train_step.lower(setup.state, batch).compile()
  holder = {"state": setup.state, "step": 0}
  directory = Path(tempfile.mkdtemp(prefix="jaxlm-bench-ckpt-"))
  ckpt = checkpoint.Checkpointer(directory, CheckpointConfig(max_to_keep=1, async_save=True))
  blocking: list[float] = []

  def save(state) -> None:
    holder["step"] += 1
    t0 = time.perf_counter()
    ckpt.save(holder["step"], params=state.params, rest=state.rest, opt_state=state.opt_state, data_iterator=None, config={})
    blocking.append(time.perf_counter() - t0)

  def step() -> None:
    with jax.set_mesh(setup.mesh):
      holder["state"], metrics = compiled(holder["state"], batch)
      jax.block_until_ready(metrics)

  # One save on its own: CPU work, host memory, how long the background write takes.
  step()
  state = holder["state"]
  save(state)  # compiles the digests
  ckpt.wait()
  c0 = cpu_seconds()
  step()
  step_cpu = cpu_seconds() - c0
  state = holder["state"]
  trees = (state.params, state.rest, state.opt_state)
  state_bytes = sum(s.data.nbytes for x in jax.tree.leaves(trees) for s in x.addressable_shards)
  ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed pages back: the rise is then new memory, not reuse
  c0, t0 = cpu_seconds(), time.perf_counter()
  with PeakRSS() as rss:
    save(state)
    ckpt.wait()
  save_cpu, write_s = cpu_seconds() - c0, time.perf_counter() - t0
  with jax.set_mesh(setup.mesh):
    checkpoint.digests(trees)  # compiled for this tree
    t0 = time.perf_counter()
    for _ in range(3):
      checkpoint.digests(trees)
    digest_s = (time.perf_counter() - t0) / 3
  t0 = time.perf_counter()
  step()
  k = max(min_k, math.ceil(write_s / (time.perf_counter() - t0)) + 2)  # the write ends inside the round

  def run_round(with_save: bool):
    def fn():
      state = holder["state"]
      with jax.set_mesh(setup.mesh):
        for i in range(k):
          state, metrics = compiled(state, batch)
          if with_save and i == 0:
            jax.block_until_ready(state)  # the loop reads the step's metrics before it saves
            save(state)
        jax.block_until_ready(metrics)
      ckpt.wait()
      holder["state"] = state

    return fn

  times = interleaved_times({"plain": run_round(False), "save": run_round(True)}, warmup=1, rounds=rounds)
  ckpt.close()
  step_s = times["plain"] / k
  stall = max(times["save"] - times["plain"], 0.0)
  return {
      "experiment": name,
      "overrides": overrides,
      "state_bytes": state_bytes,
      "step_s": step_s,
      "steps_per_round": k,
      "write_s": write_s,
      "stall_s": stall,
      "stall_ratio": stall / step_s,
      "checkpoint_every": exp.train.checkpoint_every,
      "amortised_ratio": stall / (exp.train.checkpoint_every * step_s),
      "blocking_s": sorted(blocking)[len(blocking) // 2],
      "blocking_ratio": sorted(blocking)[len(blocking) // 2] / step_s,
      "digest_s": digest_s,
      "save_cpu_s": save_cpu,
      "step_cpu_s": step_cpu,
      "save_cpu_ratio": save_cpu / step_cpu,
      "host_rss_rise_bytes": rss.peak - rss.start,
      "host_rss_ratio": (rss.peak - rss.start) / state_bytes,
  }


def main(argv: list[str]) -> None:
  import absl.logging

  absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax reports every wait at WARNING
  quick = "--quick" in argv
  rows = {}
  for case, (name, overrides) in CASES.items():
    rows[case] = r = measure(name, overrides, min_k=4, rounds=2 if quick else 4)
    print(
        f"{case:>12}: state {r['state_bytes'] / 2**20:,.1f} MiB, step {r['step_s'] * 1e3:,.0f} ms, save stall {r['stall_s'] * 1e3:,.1f} ms "
        f"= {r['stall_ratio']:.3f} of a step ({r['amortised_ratio']:.5f} at checkpoint_every={r['checkpoint_every']}); "
        f"blocking {r['blocking_s'] * 1e3:,.1f} ms = {r['blocking_ratio']:.3f} of a step (digests {r['digest_s'] * 1e3:,.1f} ms); save CPU {r['save_cpu_ratio']:.2f} x a step's; host RSS +{r['host_rss_ratio']:.2f} x state"
    )
  write_result("checkpoint", {"goal": f"stall_ratio <= {GOAL}", "cases": rows})


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
