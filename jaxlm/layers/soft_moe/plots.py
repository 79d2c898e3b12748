"""The per-source routing heatmap (sources x experts, one panel per soft-MoE layer).

Drawn at the end of training from the last evaluation: `eval_metrics/soft_moe_routing/<source>`
is the mean routing weight of every expert in every layer over that source's evaluation
batches. Rows that differ between sources show domain specialisation (Lory, Zhong et al. 2024,
Sec. 5: experts specialise by domain at the segment level).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.plots import PLOTS, pyplot

PREFIX = "eval_metrics/soft_moe_routing/"


@PLOTS.register("soft_moe_routing")
def routing_heatmap(run_dir: Path, history: list[dict[str, Any]]) -> Path | None:
  recs = [r for r in history if any(k.startswith(PREFIX) for k in r)]
  if not recs:
    return None
  rec = recs[-1]
  sources = sorted(k[len(PREFIX) :] for k in rec if k.startswith(PREFIX))
  data = np.stack([np.asarray(rec[PREFIX + s], np.float64).reshape(-1, np.shape(rec[PREFIX + s])[-1]) for s in sources])  # [S, layers, E]
  n_src, n_layers, n_exp = data.shape
  cols = min(n_layers, 4)
  rows = math.ceil(n_layers / cols)
  plt = pyplot()
  fig, axes = plt.subplots(rows, cols, figsize=(1.2 + cols * (1.0 + 0.45 * n_exp), 0.9 + rows * (0.6 + 0.45 * n_src)), dpi=120, squeeze=False, layout="constrained")
  vmax = max(float(data.max()), 2.0 / n_exp)
  im = None
  for i in range(rows * cols):
    ax = axes[i // cols][i % cols]
    if i >= n_layers:
      ax.axis("off")
      continue
    im = ax.imshow(data[:, i, :], cmap="magma", vmin=0, vmax=vmax, aspect="auto")
    if n_src * n_exp <= 128:
      for s in range(n_src):
        for e in range(n_exp):
          ax.text(e, s, f"{data[s, i, e]:.2f}", ha="center", va="center", color="w" if data[s, i, e] < 0.6 * vmax else "k", fontsize=6)
    ax.set_title(f"layer {i}", fontsize=8)
    ax.set_xticks(range(n_exp))
    ax.set_xlabel("expert", fontsize=7)
    ax.set_yticks(range(n_src))
    ax.set_yticklabels(sources if i % cols == 0 else [], fontsize=7)
  fig.colorbar(im, ax=axes.ravel().tolist(), label="mean routing weight")
  fig.suptitle(f"{run_dir.name}: soft-MoE routing per source (step {rec.get('step', '?')}, uniform = {1 / n_exp:.3f})", fontsize=9)
  path = run_dir / "soft_moe_routing.png"
  fig.savefig(path)
  plt.close(fig)
  return path
