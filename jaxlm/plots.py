"""End-of-run pictures: one registry, PNGs written into the run directory.

`PLOTS` maps a name to `fn(run_dir, history) -> Path | None`, where `history` is the list of
metric records of the run (as in metrics.jsonl). Every registered plot runs at the end of
training (`write_all`) and skips itself (returns None) when the run has nothing for it. Layers
and methods register their own pictures next to their code (expert-load and routing heatmaps);
the loss curve lives in `jaxlm.train.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from jaxlm.registry import Registry

PlotFn = Callable[[Path, list[dict[str, Any]]], "Path | None"]
PLOTS: Registry = Registry("plot")


def pyplot():
  """matplotlib.pyplot on the Agg backend (no screen)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def write_all(run_dir: Path, history: list[dict[str, Any]]) -> list[Path]:
  out = []
  for name in PLOTS.keys():
    path = PLOTS.get(name)(run_dir, history)
    if path is not None:
      out.append(path)
  return out
