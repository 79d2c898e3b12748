"""The expert-load heatmap (MoE layers x experts), written at the end of training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.plots import PLOTS, pyplot

KEY = "metrics/moe_expert_load"


@PLOTS.register("moe_expert_load")
def expert_load_heatmap(run_dir: Path, history: list[dict[str, Any]]) -> Path | None:
  """Load of every expert in every MoE layer, times E (1 = perfectly balanced), averaged over
  the last quarter of the logged training steps; a second panel shows the first logged step."""
  recs = [r for r in history if KEY in r and r[KEY] is not None]
  if not recs:
    return None
  loads = [np.asarray(r[KEY], np.float64) for r in recs]
  loads = [a[None] if a.ndim == 1 else a for a in loads]
  tail = np.mean(loads[-max(1, len(loads) // 4) :], axis=0)
  n_layers, n_experts = tail.shape
  plt = pyplot()
  width = min(16.0, 2.5 + 1.2 * n_experts)
  fig, axes = plt.subplots(1, 2, figsize=(width, 2.0 + 0.45 * n_layers), dpi=120, squeeze=False, layout="constrained")
  vmax = max(2.0, float(np.max(tail * n_experts)), float(np.max(loads[0] * n_experts)))
  panels = ((loads[0], f"step {recs[0]['step']}"), (tail, f"steps {recs[-max(1, len(loads) // 4)]['step']}-{recs[-1]['step']} (mean)"))
  for ax, (load, title) in zip(axes[0], panels):
    im = ax.imshow(load * n_experts, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    if n_experts * n_layers <= 256:
      for i in range(n_layers):
        for j in range(n_experts):
          ax.text(j, i, f"{load[i, j] * n_experts:.2f}", ha="center", va="center", color="w", fontsize=6)
    ax.set_xticks(range(0, n_experts, max(1, n_experts // 16)))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=axes[0].tolist(), label="load x E (1 = balanced)", shrink=0.9)
  fig.suptitle(f"{run_dir.name}: expert load", fontsize=10)
  path = run_dir / "moe_expert_load.png"
  fig.savefig(path)
  plt.close(fig)
  return path
