"""What every benchmark shares: machine description, timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
  """The machine a figure was measured on: absolute times mean something only with this."""
  import jax

  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "host": platform.node(),
      "jax": jax.__version__,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
  }


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> float:
  """Median seconds per call of `fn` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def interleaved_times(fns: dict[str, Callable[[], Any]], *, warmup: int = 2, rounds: int = 10) -> dict[str, float]:
  """Median seconds per call for several functions timed in alternation.

  Alternating the candidates inside one run is what makes their ratio meaningful on a shared,
  noisy machine: a slow spell hits all of them alike.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  samples: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      samples[name].append(time.perf_counter() - t0)
  return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def write_result(name: str, payload: dict[str, Any]) -> Path:
  """Write benchmarks/results/<name>.json with the machine description attached."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}.json"
  data = {"benchmark": name, "machine": machine(), **payload}
  path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
  print(f"wrote {path}")
  return path
