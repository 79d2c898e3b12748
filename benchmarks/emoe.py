"""EMoE against sparse upcycling and the dense model they come from (experiments/emoe_quickstart.py).

Runs the experiment end to end in a temporary directory: the dense source run, `jaxlm convert
emoe` and `jaxlm convert upcycle` of it, and the three fine-tunes (EMoE, upcycled, dense
continued) on the same data, steps and optimizer. Then:

  loss          eval loss (code) of each fine-tune at every evaluation (0, 40, 80 steps) and the
                differences at equal steps: EMoE - upcycled, EMoE - dense.
  time_ratio    train step time EMoE / dense, compiled steps timed in alternation with the
                upcycled one on one device, from the fine-tuned weights (routing as trained).
                The baseline is the dense model: EMoE is that model with the last FFNs split and
                3/4 of their units skipped per token (the same parameters, fewer FLOPs), so what
                it must not cost is time over the dense step it replaces. Goal <= 1.1. The ratio
                to the upcycled MoE (same E and layers, top-1 of 8 full-width copies) is recorded
                too: the cost of the other way to turn the same dense run into an MoE.

CPU figures: a 2-core machine's times are noisy (ratios come from interleaved runs); the losses
are from 80 fine-tuning steps of a small model, evaluated on 4 batches of code.
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
from jaxlm.cli import main as cli
from jaxlm.config import Experiment, MeshConfig
from jaxlm.models.build import param_counts
from jaxlm.train import aot, loop
from jaxlm.train.run import resolve_init

EXPERIMENT = "emoe_quickstart"
GOALS = {"time_ratio": 1.1}
RUNS = {"emoe": "", "upcycled": ":upcycled", "dense": ":dense_continued"}


def _evals(run_dir: Path) -> dict[int, float]:
  lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r}


def run_experiment(root: Path, overrides: list[str]) -> dict[str, Path]:
  """The experiment's commands (its docstring), in `root`: {name: fine-tuned run directory}."""
  sets = [x for o in overrides for x in ("--set", o)]
  dense = root / "source"
  assert cli(["train", f"{EXPERIMENT}:dense", "--run-dir", str(dense)] + sets) == 0
  runs = {name: root / name for name in RUNS}
  assert cli(["convert", "emoe", str(dense), EXPERIMENT, "--run-dir", str(runs["emoe"])] + sets) == 0
  assert cli(["convert", "upcycle", str(dense), f"{EXPERIMENT}:upcycled", "--run-dir", str(runs["upcycled"])] + sets) == 0
  for name, variant in RUNS.items():
    extra = ["--set", f"init_from={dense}"] if name == "dense" else []
    assert cli(["train", EXPERIMENT + variant, "--run-dir", str(runs[name])] + sets + extra) == 0
  return runs


def step_fn(exp: Experiment, weights: Path):
  """One compiled train step (blocking) on one device from `weights`' latest checkpoint, and its
  compiled FLOPs."""
  exp = dataclasses.replace(exp, mesh=MeshConfig(fsdp=1, devices=1), init_from=str(weights))
  setup = loop.prepare(exp, jax.devices()[:1], init=resolve_init(exp, None))
  with jax.set_mesh(setup.mesh):
    batch = loop.to_global(synthetic_batch(exp.data.batch_size, exp.data.seq_len, exp.model.vocab_size), setup.batch_sharding)
    compiled = setup.train_step.lower(setup.state, batch).compile()
  box = {"state": setup.state}

  def run():
    with jax.set_mesh(setup.mesh):
      box["state"], m = compiled(box["state"], batch)
      jax.block_until_ready(m)

  return run, aot.summary(compiled)["flops"]


def main(argv: list[str]) -> None:
  quick = "--quick" in argv
  overrides = ["train.steps=20", "train.eval_every=10"] if quick else []  # --quick: a smoke run of the pipeline
  out: dict[str, Any] = {"goals": GOALS, "experiment": EXPERIMENT, "baseline": "dense (the model EMoE is cut from: same parameters, so EMoE must not cost step time over it)"}
  with tempfile.TemporaryDirectory(prefix="jaxlm-bench-emoe-") as tmp:
    runs = run_experiment(Path(tmp), overrides)
    exps = {name: experiments.load(EXPERIMENT + variant, overrides) for name, variant in RUNS.items()}
    evals = {name: _evals(d) for name, d in runs.items()}
    steps = sorted(set.intersection(*(set(e) for e in evals.values())))
    out["eval_loss"] = {name: {str(s): e[s] for s in steps} for name, e in evals.items()}
    last = str(steps[-1])
    out["loss_diff"] = {
        "emoe_minus_upcycled": {str(s): evals["emoe"][s] - evals["upcycled"][s] for s in steps},
        "emoe_minus_dense": {str(s): evals["emoe"][s] - evals["dense"][s] for s in steps},
        "upcycled_minus_dense": {str(s): evals["upcycled"][s] - evals["dense"][s] for s in steps},
    }
    out["params"] = {name: param_counts(e.model) for name, e in exps.items()}
    fns = {name: step_fn(e, runs[name]) for name, e in exps.items()}
  times = interleaved_times({k: v[0] for k, v in fns.items()}, warmup=2, rounds=5 if quick else 8)
  flops = {k: v[1] for k, v in fns.items()}
  out["step_seconds"], out["compiled_flops"] = times, flops
  out["time_ratio"] = times["emoe"] / times["dense"]
  out["time_ratio_emoe_upcycled"] = times["emoe"] / times["upcycled"]
  out["time_ratio_upcycled_dense"] = times["upcycled"] / times["dense"]
  out["flops_ratio_emoe_dense"] = flops["emoe"] / flops["dense"]
  out["met"] = {k: out[k] <= g for k, g in GOALS.items()}
  out["machine_note"] = "CPU: times are noisy; ratios from interleaved runs"
  for name in RUNS:
    p = out["params"][name]
    print(f"{name:>9}: eval loss " + "  ".join(f"{s}: {evals[name][s]:.4f}" for s in steps) + f"  | {times[name] * 1e3:.0f} ms/step, params {p['total']:,} ({p['active']:,} active)")
  d = out["loss_diff"]
  print(f"at step {last}: EMoE - upcycled {d['emoe_minus_upcycled'][last]:+.4f}, EMoE - dense {d['emoe_minus_dense'][last]:+.4f}")
  print(f"step time EMoE / dense {out['time_ratio']:.3f} (goal <= {GOALS['time_ratio']}), EMoE / upcycled {out['time_ratio_emoe_upcycled']:.3f}, FLOPs EMoE / dense {out['flops_ratio_emoe_dense']:.3f}")
  write_result("emoe", out)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
