"""Where metrics go: `metrics.jsonl` (one JSON object per line), TensorBoard events, a progress bar.

Only process 0 writes. Scalars go everywhere; small arrays (per-layer expert loads, routing
weights) go to the JSONL file as nested lists for the end-of-run plots.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm


def to_python(value: Any) -> Any:
  arr = np.asarray(value)
  if arr.ndim == 0:
    v = arr.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v
  return arr.tolist()


class MetricsWriter:
  """Appends metric records to metrics.jsonl and TensorBoard, and drives the progress bar."""

  def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = run_dir / "metrics.jsonl"
    self.history: list[dict[str, Any]] = []
    self._file = None
    self._tb = None
    self.interactive = sys.stderr.isatty()
    if not self.enabled:
      self.bar = None
      return
    if self.path.exists():
      self.history = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
      # A resumed run continues after its checkpoint: drop what was logged past it.
      self.history = [r for r in self.history if r.get("step", 0) <= start_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
    self._file = self.path.open("a")
    self._tb = _summary_writer()(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not self.interactive, file=sys.stderr)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    rec = {k: to_python(v) for k, v in record.items()}
    self.history.append(rec)
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    step = rec["step"]
    for k, v in rec.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.add_scalar(k, v, step)

  def advance(self, steps: int, **postfix: Any) -> None:
    if self.bar is not None:
      self.bar.update(steps)
      if postfix:
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False)

  def print(self, line: str) -> None:
    if self.enabled:
      if self.bar is not None and not self.bar.disable:
        self.bar.write(line)
      else:
        print(line, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _summary_writer() -> type:
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it
  is installed (the `hf` extra installs it) only to accept torch tensors, which costs every run
  4-6 s of start-up; jaxlm logs Python floats."""
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter

