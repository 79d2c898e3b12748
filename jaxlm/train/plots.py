"""The loss curve, registered with the other end-of-run pictures (`jaxlm.plots`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxlm.plots import PLOTS, pyplot, write_all  # noqa: F401  (write_all: the trainer's entry point)


@PLOTS.register("loss_curve")
def loss_curve(run_dir: Path, history: list[dict[str, Any]]) -> Path | None:
  """Training loss (and its moving average) with the evaluation losses per source."""
  train = [(r["step"], r["loss"]) for r in history if "loss" in r and r.get("loss") is not None]
  evals = [r for r in history if "eval_loss" in r]
  if not train and not evals:
    return None
  plt = pyplot()
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
