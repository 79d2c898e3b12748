"""End-of-run pictures, written as PNGs into the run directory.

`PLOTS` maps a name to `fn(run_dir, history) -> Path | None`, where `history` is the list of
metric records of the run (as in metrics.jsonl). Every registered plot runs at the end of
training and skips itself (returns None) when the run has nothing for it. Layers register
their own pictures (e.g. expert-load heatmaps) next to their code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from jaxlm.registry import Registry

PlotFn = Callable[[Path, list[dict[str, Any]]], "Path | None"]
PLOTS: Registry = Registry("plot")


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


@PLOTS.register("loss_curve")
def loss_curve(run_dir: Path, history: list[dict[str, Any]]) -> Path | None:
  """Training loss (and its moving average) with the evaluation losses per source."""
  train = [(r["step"], r["loss"]) for r in history if "loss" in r and r.get("loss") is not None]
  evals = [r for r in history if "eval_loss" in r]
  if not train and not evals:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
  if train:
    steps, losses = zip(*train)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train loss (logged steps)")
    k = max(2, len(losses) // 10)
    if len(losses) >= 2 * k:
      smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
      ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train loss (mean of last {k})")
  if evals:
    steps = [r["step"] for r in evals]
    ax.plot(steps, [r["eval_loss"] for r in evals], "o-", color="black", lw=2, label="eval loss")
    sources = sorted({k[len("eval_loss/") :] for r in evals for k in r if k.startswith("eval_loss/")})
    for s in sources:
      pts = [(r["step"], r[f"eval_loss/{s}"]) for r in evals if f"eval_loss/{s}" in r]
      ax.plot(*zip(*pts), "s--", lw=1, label=f"eval {s}")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(run_dir.name)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = run_dir / "loss_curve.png"
  fig.savefig(path)
  plt.close(fig)
  return path


def write_all(run_dir: Path, history: list[dict[str, Any]]) -> list[Path]:
  out = []
  for name in PLOTS.keys():
    path = PLOTS.get(name)(run_dir, history)
    if path is not None:
      out.append(path)
  return out
