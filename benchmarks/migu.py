"""MIGU and key / value tuning: what they cost per step and how much code they forget.

* step_time_ratio     train step with MIGU / plain full fine-tuning (optim.migu_ratio = 0.3), the
                      shapes of experiments/migu_quickstart (16 x 128 tokens, D 128, 2 layers),
                      compiled steps timed interleaved on this machine. Goal <= 1.1. Also the
                      compiled FLOPs ratio (XLA cost analysis).
* keys_time_ratio, values_time_ratio
                      train step tuning only the FFN keys (w_gate, w_up) / only the values
                      (w_down) / full fine-tuning, timed in the same rounds.
* forgetting          the experiment (experiments/migu_quickstart.py): stage 1 trains on code;
                      stage 2 fine-tunes it on prose, plainly, with MIGU, keys only, values only,
                      the same steps and batches. Per arm: code eval loss after stage 2 minus
                      after stage 1 (forgetting; lower is better) and the prose eval loss after
                      stage 2 (learning). `migu_minus_plain`: the differences at equal steps.
* mask_overlap        the paper's premise: the top 30% outputs of each linear weight on a code
                      batch and on a prose batch (stage-1 model), the share of them in common
                      (mean over weights and layers; 0.3 would be chance).

Usage: python -m benchmarks.run migu [--quick] [--runs=DIR]  (DIR keeps the runs; default: a
temporary directory). --quick shortens everything (a smoke test of the benchmark, not a figure).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import interleaved_times, write_result
from benchmarks.train_step import CompiledStep, one_device
from jaxlm.config import Experiment
from jaxlm.experiments import load
from jaxlm.layers import linear
from jaxlm.train import loop, migu

GOALS = {"step_time_ratio": "<= 1.1"}
ARMS = {"plain": "migu_quickstart:plain", "migu": "migu_quickstart", "keys": "migu_quickstart:keys", "values": "migu_quickstart:values"}


def bench_time(rounds: int) -> dict[str, Any]:
  steps, flops = {}, {}
  for name, variant in ARMS.items():
    compiled = CompiledStep(dataclasses.replace(one_device(load(variant)), init_from=""))
    steps[name], flops[name] = compiled.step, compiled.flops
  t = interleaved_times(steps, warmup=2, rounds=rounds)
  return {
      "seconds": t,
      "step_time_ratio": t["migu"] / t["plain"],
      "train_flops_ratio": flops["migu"] / flops["plain"],
      "keys_time_ratio": t["keys"] / t["plain"],
      "values_time_ratio": t["values"] / t["plain"],
  }


def _read(run_dir: Path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _final_eval(run_dir: Path) -> dict[str, float]:
  last = max((r for r in _read(run_dir) if "eval_loss" in r), key=lambda r: r["step"])
  return {"step": last["step"], "code": last["eval_loss/stdlib_code"], "prose": last["eval_loss/stdlib_prose"]}


def _mask_overlap(stage1: Experiment, run_dir: Path, ratio: float) -> float:
  """Share of the top-`ratio` outputs of every linear weight that a code batch and a prose batch
  of the stage-1 model have in common (mean over weights and layers)."""
  setup = loop.prepare(stage1, jax.devices()[:1], init=loop.resolve_init(dataclasses.replace(stage1, init_from=str(run_dir)), None))
  n_out = {"/".join(map(str, p)): -linear.fan_in_of(v)[-1] - 1 for p, v in setup.state.params.flat_state() if linear.fan_in_of(v)}
  tok = loop.tokenizer_for(stage1, None)
  mags = {}
  f = jax.jit(lambda s, b: migu.magnitudes(setup.graphdef, s.params, s.frozen, s.rest, b))
  for source in ("stdlib_code", "stdlib_prose"):
    exp = dataclasses.replace(stage1, data=dataclasses.replace(stage1.data, mixture={source: 1.0}, eval_also=()))
    batch = next(iter(loop.datasets(exp, tok, "validation")))
    with jax.set_mesh(setup.mesh):
      mags[source] = jax.device_get(f(setup.state, loop.to_global(batch, setup.batch_sharding)))
  shares = []
  for key, code in mags["stdlib_code"].items():
    a = np.asarray(migu.output_mask(jnp.asarray(code), n_out[key], ratio)).ravel()
    b = np.asarray(migu.output_mask(jnp.asarray(mags["stdlib_prose"][key]), n_out[key], ratio)).ravel()
    shares.append(np.sum(a & b) / np.sum(a))
  return float(np.mean(shares))


def bench_experiment(root: Path, quick: bool) -> dict[str, Any]:
  shorten = lambda e: dataclasses.replace(e, train=dataclasses.replace(e.train, steps=10, eval_every=0, checkpoint_every=0)) if quick else e
  stage1 = _one_device(shorten(load("migu_quickstart:code")))
  loop.train(stage1, root / "code")  # (a finished run in --runs is kept: "nothing to do")
  before = _final_eval(root / "code")
  out: dict[str, Any] = {"stage1": before, "arms": {}}
  for name, variant in ARMS.items():
    exp = dataclasses.replace(_one_device(shorten(load(variant))), init_from=str(root / "code"))
    loop.train(exp, root / name)
    after = _final_eval(root / name)
    out["arms"][name] = {"code": after["code"], "prose": after["prose"], "forgetting": after["code"] - before["code"], "prose_gain": before["prose"] - after["prose"]}
  a = out["arms"]
  out["migu_minus_plain"] = {"forgetting": a["migu"]["forgetting"] - a["plain"]["forgetting"], "prose_loss": a["migu"]["prose"] - a["plain"]["prose"]}
  out["mask_overlap"] = _mask_overlap(stage1, root / "code", load("migu_quickstart").optim.migu_ratio)
  return out


def main(argv: list[str]) -> None:
  quick = "--quick" in argv
  runs = next((a.split("=", 1)[1] for a in argv if a.startswith("--runs=")), None)
  out: dict[str, Any] = {"goals": GOALS}
  out.update(bench_time(rounds=3 if quick else 10))
  print(
      f"train step MIGU / plain {out['step_time_ratio']:.3f} (FLOPs {out['train_flops_ratio']:.3f}); "
      f"keys / full {out['keys_time_ratio']:.3f}, values / full {out['values_time_ratio']:.3f}"
  )
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(runs or tmp)
    out.update(bench_experiment(root, quick))
  for name, r in out["arms"].items():
    print(f"{name:>7}: code eval {out['stage1']['code']:.4f} -> {r['code']:.4f} (forgetting {r['forgetting']:+.4f}); prose eval {out['stage1']['prose']:.4f} -> {r['prose']:.4f}")
  print(f"top-30% outputs shared by a code and a prose batch: {out['mask_overlap']:.3f} (chance 0.3)")
  out["met"] = {"step_time_ratio": out["step_time_ratio"] <= 1.1}
  write_result("migu", out)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
