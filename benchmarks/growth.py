"""Model growth (G_stack, Du et al. 2024): grown-and-continued against scratch, measured in one run.

Runs experiments/grow_quickstart.py's four stages in a temporary directory through the library
(`jaxlm.train.loop.train`): the 2-layer model for SMALL_STEPS steps, the 4-layer model grown
from it by G_stack on load (`init_from` + `grow.operator=stack`) for GROWN_STEPS steps, and the
4-layer model from scratch for the same total FLOPs and for the same total tokens (= steps).

  loss_diff_equal_flops   final eval loss, grown - scratch at equal training FLOPs (< 0: growth helps)
  loss_diff_equal_steps   final eval loss, grown - scratch at equal tokens / steps (small + grown steps)
  step_time_ratio         step time of the grown 4-layer model / the scratch 4-layer model, timed
                          interleaved: 1.0 by construction (growth changes the initial weights,
                          never the architecture or the compiled step), measured as a check.
  curves                  eval loss against cumulative training FLOPs and tokens for every run.

CPU figures are small-model, few-step and noisy; the paper's gains are at 0.4-7B parameters and
10-300B tokens. About 4 minutes on a quiet 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import jax

from benchmarks.common import interleaved_times, write_result
from benchmarks.train_step import synthetic_batch
from jaxlm import experiments
from jaxlm.config import Experiment
from jaxlm.train import flops, loop
from jaxlm.train.run import INIT_FILE, read_record


def _quiet(exp: Experiment, run_dir: Path | None = None, **train: Any) -> Experiment:
  """No samples, no checkpoints but the final one (the grown run starts from it)."""
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, sample_tokens=0, checkpoint_every=0, **train))
  return dataclasses.replace(exp, init_from=str(run_dir)) if run_dir is not None else exp


def _evals(run_dir: Path) -> list[dict[str, float]]:
  lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
  return [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in lines if "eval_loss" in r]


def _step_fn(exp: Experiment, init: dict | None):
  """One compiled train step of `exp` (its model from `init`), run blocking; state carried along."""
  setup = loop.prepare(exp, jax.devices()[:1], init=init)
  b, l = exp.data.batch_size, exp.data.seq_len
  with jax.set_mesh(setup.mesh):
    batch = loop.to_global(synthetic_batch(b, l, exp.model.vocab_size), setup.batch_sharding)
    compiled = setup.train_step.lower(setup.state, batch).compile()
  box = {"state": setup.state}

  def run():
    with jax.set_mesh(setup.mesh):
      box["state"], m = compiled(box["state"], batch)
      jax.block_until_ready(m)

  return run


def main(argv: list[str]) -> None:
  small, grown, scratch, scratch_tokens = (experiments.load(f"grow_quickstart:{v}") for v in ("small", "experiment", "scratch", "scratch_tokens"))
  seq, tokens_per_step = small.data.seq_len, small.data.batch_size * small.data.seq_len
  f_small, f_large = (flops.train_flops_per_token(e.model, seq) * tokens_per_step for e in (small, grown))
  result: dict[str, Any] = {
      "small": {"n_layers": small.model.n_layers, "steps": small.train.steps},
      "grown": {"n_layers": grown.model.n_layers, "steps": grown.train.steps, "operator": grown.grow.operator, "factor": grown.grow.factor},
      "scratch_equal_flops": {"steps": scratch.train.steps},
      "scratch_equal_tokens": {"steps": scratch_tokens.train.steps},
      "small_step_cost": f_small / f_large,
      "tokens_per_step": tokens_per_step,
  }
  with tempfile.TemporaryDirectory(prefix="jaxlm-growth-") as tmp:
    tmp = Path(tmp)
    loop.train(_quiet(small), tmp / "small")
    grown = _quiet(grown, tmp / "small")
    loop.train(grown, tmp / "grown")
    loop.train(_quiet(scratch), tmp / "scratch")
    loop.train(_quiet(scratch_tokens), tmp / "scratch_tokens")

    def curve(name: str, step_flops: float, offset_flops: float = 0.0, offset_steps: int = 0) -> list[dict[str, float]]:
      return [{**e, "train_flops": offset_flops + e["step"] * step_flops, "tokens": (offset_steps + e["step"]) * tokens_per_step} for e in _evals(tmp / name)]

    curves = {
        "small": curve("small", f_small),
        "grown": curve("grown", f_large, small.train.steps * f_small, small.train.steps),
        "scratch_equal_flops": curve("scratch", f_large),
        "scratch_equal_tokens": curve("scratch_tokens", f_large),
    }
    final = {k: v[-1] for k, v in curves.items()}
    result["curves"] = curves
    result["final"] = final
    result["grown"]["eval_loss_at_growth"] = curves["grown"][0]["eval_loss"]  # step 0 of the grown run: the stacked model, untrained
    result["loss_diff_equal_flops"] = final["grown"]["eval_loss"] - final["scratch_equal_flops"]["eval_loss"]
    result["loss_diff_equal_steps"] = final["grown"]["eval_loss"] - final["scratch_equal_tokens"]["eval_loss"]
    result["flops_ratio_grown_over_scratch"] = final["grown"]["train_flops"] / final["scratch_equal_flops"]["train_flops"]

    # Step time: the grown model's compiled step against the same-size model from scratch.
    times = interleaved_times({"grown": _step_fn(grown, read_record(tmp / "grown", INIT_FILE)), "scratch": _step_fn(scratch, None)}, warmup=2, rounds=15)
  result["step_seconds"] = times
  result["step_time_ratio"] = times["grown"] / times["scratch"]
  result["step_time_note"] = "1.0 by construction: the grown and the scratch model share architecture and compiled step; growth only sets the initial weights"
  print(
      f"growth: eval loss grown {final['grown']['eval_loss']:.4f} vs scratch {final['scratch_equal_flops']['eval_loss']:.4f} at equal FLOPs "
      f"(diff {result['loss_diff_equal_flops']:+.4f}), vs {final['scratch_equal_tokens']['eval_loss']:.4f} at equal steps "
      f"(diff {result['loss_diff_equal_steps']:+.4f}); step time ratio {result['step_time_ratio']:.3f}"
  )
  write_result("growth", result)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
