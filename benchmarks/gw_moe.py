"""GW-MoE (jaxlm/layers/moe/gw.py): what broadcasting the uncertain tokens costs and what it buys.

* step_time_ratio   train step GW-MoE / the plain MoE, the shapes of experiments/gw_moe_quickstart
                    (16 x 128 tokens, D 128, top-2 of 8 experts of width 192, 4 layers, 8 slots
                    per sequence), compiled steps timed interleaved on this machine. Goal <= 1.1.
                    Also the compiled FLOPs ratio (XLA cost analysis, layers unrolled): shapes are
                    static, so the cost does not depend on how many slots fill.
* eval_time_ratio   evaluation forward GW / plain (model.eval(): GW is off, the program is the
                    plain MoE's). Goal 1.0 (it is the same computation; also checked bitwise).
* broadcast_fraction  tokens broadcast per layer and step in the GW fine-tune (mean over logged
                    steps and layers), and the fraction of tokens at or above the threshold before
                    the slot cap (measured on the pretrained model's first fine-tuning batch).
* loss_difference   final code eval loss GW - plain after the experiment: pretrain on prose
                    (gw_moe_quickstart:base), then fine-tune on code, plainly and with GW, the
                    same steps and batches. Negative: GW-MoE helped.

Usage: python -m benchmarks.run gw_moe [--quick] [--runs=DIR]  (DIR keeps the runs; default: a
temporary directory). --quick shortens the runs (a smoke test of the benchmark, not a figure).
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
from jaxlm.train import loop

GOALS = {"step_time_ratio": "<= 1.1", "eval_time_ratio": "== 1.0 (+- timing noise)"}


def _compiled(exp: Experiment):
  """(run one train step, run one eval forward, compiled train FLOPs, the eval program's HLO), each callable blocking."""
  c = CompiledStep(exp)
  with jax.set_mesh(c.setup.mesh):
    lowered = c.setup.eval_step.lower(c.state.params, c.state.frozen, c.state.rest, c.batch)
    evaluate = lowered.compile()

  def forward():  # (on the current state: the train step donates the previous one)
    with jax.set_mesh(c.setup.mesh):
      jax.block_until_ready(evaluate(c.state.params, c.state.frozen, c.state.rest, c.batch))

  return c.step, forward, c.flops, lowered.as_text()


def bench_time(rounds: int) -> dict[str, Any]:
  plain, gw = one_device(load("gw_moe_quickstart:plain")), one_device(load("gw_moe_quickstart"))
  step_p, fwd_p, flops_p, hlo_p = _compiled(dataclasses.replace(plain, init_from=""))
  step_g, fwd_g, flops_g, hlo_g = _compiled(dataclasses.replace(gw, init_from=""))
  t = interleaved_times({"train_plain": step_p, "train_gw": step_g}, warmup=2, rounds=rounds)
  t.update(interleaved_times({"eval_plain": fwd_p, "eval_gw": fwd_g}, warmup=2, rounds=3 * rounds))
  m, b, l = gw.model.moe, gw.data.batch_size, gw.data.seq_len
  return {
      "seconds": t,
      "step_time_ratio": t["train_gw"] / t["train_plain"],
      "eval_time_ratio": t["eval_gw"] / t["eval_plain"],
      "eval_program_identical": hlo_p == hlo_g,  # the lowered (StableHLO) eval steps
      "train_flops_ratio": flops_g / flops_p,
      # Expert rows per layer: plain B L K, GW adds E B S (the workspace) next to them.
      "expert_rows_ratio_analytical": (b * l * m.top_k + m.n_experts * b * min(m.gw_slots or l, l)) / (b * l * m.top_k),
  }


def _read(run_dir: Path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _uncertain_fraction(exp: Experiment) -> float:
  """Fraction of the first fine-tuning batch's tokens (mean over layers) with H / log E >= the
  threshold for the pretrained model, before the slot cap: a training forward without the cap."""
  from flax import nnx

  uncapped = dataclasses.replace(exp, model=dataclasses.replace(exp.model, moe=dataclasses.replace(exp.model.moe, gw_slots=0)))
  setup = loop.prepare(uncapped, jax.devices()[:1], init=loop.resolve_init(uncapped, None))
  batch = next(iter(loop.datasets(uncapped, loop.tokenizer_for(uncapped, None), "train")))
  model = nnx.merge(setup.graphdef, setup.state.params, setup.state.frozen, setup.state.rest)  # training mode: GW on
  fraction = nnx.jit(lambda m, x, seg, pos: m(x, segment_ids=seg, positions=pos)[1]["metrics"]["moe_gw_broadcast_fraction"])
  with jax.set_mesh(setup.mesh):
    per_layer = fraction(model, *(jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions")))
  return float(jnp.mean(per_layer))


def bench_experiment(root: Path, quick: bool) -> dict[str, Any]:
  shorten = lambda e, steps: dataclasses.replace(e, train=dataclasses.replace(e.train, steps=steps, eval_every=0, checkpoint_every=0)) if quick else e
  base = one_device(shorten(load("gw_moe_quickstart:base"), 20))
  runs = {"base": base}
  for name, variant in (("plain", "gw_moe_quickstart:plain"), ("gw", "gw_moe_quickstart")):
    runs[name] = dataclasses.replace(one_device(shorten(load(variant), 10)), init_from=str(root / "base"))
  out: dict[str, Any] = {}
  for name, exp in runs.items():
    loop.train(exp, root / name)  # (a finished run in --runs is kept: "nothing to do")
    evals = [r for r in _read(root / name) if "eval_loss" in r]
    out[f"{name}_eval_loss"] = {r["step"]: r["eval_loss"] for r in evals}
  final = lambda n: out[f"{n}_eval_loss"][max(out[f"{n}_eval_loss"])]
  out["loss_difference"] = final("gw") - final("plain")
  gw_lines = [r for r in _read(root / "gw") if "metrics/moe_gw_broadcast_fraction" in r]
  out["broadcast_fraction"] = float(np.mean([np.mean(r["metrics/moe_gw_broadcast_fraction"]) for r in gw_lines]))
  out["uncertain_fraction_before_cap"] = _uncertain_fraction(runs["gw"])
  return out


def main(argv: list[str]) -> None:
  quick = "--quick" in argv
  runs = next((a.split("=", 1)[1] for a in argv if a.startswith("--runs=")), None)
  out: dict[str, Any] = {"goals": GOALS}
  out.update(bench_time(rounds=3 if quick else 10))
  print(f"train step GW / plain {out['step_time_ratio']:.3f} (FLOPs {out['train_flops_ratio']:.3f}); eval forward {out['eval_time_ratio']:.3f} (same program: {out['eval_program_identical']})")
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(runs or tmp)
    out.update(bench_experiment(root, quick))
  print(f"code eval loss GW - plain {out['loss_difference']:+.4f}; broadcast {out['broadcast_fraction']:.3f} of tokens ({out['uncertain_fraction_before_cap']:.3f} uncertain before the cap)")
  out["met"] = {"step_time_ratio": out["step_time_ratio"] <= 1.1}
  write_result("gw_moe", out)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
