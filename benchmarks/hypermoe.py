"""HyperMoE against the plain sparse MoE it extends (issue 13, item 5), every figure from one run.

  time    one compiled train step of `hypermoe_quickstart` / one of `hypermoe_quickstart:moe`
          (forward, backward, optimizer; 16 x 128 tokens, synthetic batch), timed in
          alternation. Goal <= 1.3.
  params  total and active parameters of both models (the hypernetworks are active for every
          token), and the overhead hypermoe / moe - 1.
  loss    final eval loss of both experiments trained for the same steps on the same data
          (experiments/hypermoe_quickstart.py), and the difference hypermoe - moe; also of the
          control `:matched` (the MoE with wider experts: HyperMoE's active parameters and FLOPs
          per token) and hypermoe - matched.

Usage: python -m benchmarks.run hypermoe [--quick]   (--quick: 40 training steps, fewer rounds)
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import jax

from benchmarks.common import interleaved_times, write_result
from benchmarks.train_step import synthetic_batch
from jaxlm import experiments
from jaxlm.models import param_counts
from jaxlm.train import flops, loop

VARIANTS = {"moe": "hypermoe_quickstart:moe", "hypermoe": "hypermoe_quickstart"}  # timed against each other
CONTROL = {"matched": "hypermoe_quickstart:matched"}  # trained only


def step_times(exps: dict, rounds: int) -> dict[str, float]:
  """Median seconds per train step of each experiment, the steps called in alternation."""
  runners = {}
  for name, exp in exps.items():
    setup = loop.prepare(exp)
    b, l = exp.data.batch_size, exp.data.seq_len
    with jax.set_mesh(setup.mesh):
      batch = loop.to_global(synthetic_batch(b, l, exp.model.vocab_size), setup.batch_sharding)
      compiled = setup.train_step.lower(setup.state, batch).compile()
    holder = {"state": setup.state}

    def one(compiled=compiled, batch=batch, holder=holder, mesh=setup.mesh):
      with jax.set_mesh(mesh):
        holder["state"], m = compiled(holder["state"], batch)  # the state is donated: carry it on
        jax.block_until_ready(m)

    runners[name] = one
  return interleaved_times(runners, warmup=3, rounds=rounds)


def final_eval_loss(exp, steps: int | None) -> dict:
  train = dataclasses.replace(exp.train, sample_tokens=0, **({"steps": steps, "eval_every": 0} if steps else {}))
  with tempfile.TemporaryDirectory(prefix="jaxlm-bench-hypermoe-") as d:
    summary = loop.train(dataclasses.replace(exp, train=train), Path(d) / exp.name)
  return {"steps": train.steps, "final_eval_loss": summary["final_eval_loss"], "tokens_per_sec": summary["tokens_per_sec"], "minutes": summary["minutes"]}


def main(argv: list[str]) -> None:
  quick = "--quick" in argv
  exps = {name: experiments.load(ref) for name, ref in VARIANTS.items()}
  times = step_times(exps, rounds=5 if quick else 12)
  exps.update({name: experiments.load(ref) for name, ref in CONTROL.items()})
  counts = {name: param_counts(exp.model) for name, exp in exps.items()}
  seq = exps["moe"].data.seq_len
  fpt = {name: flops.train_flops_per_token(exp.model, seq) for name, exp in exps.items()}
  losses = {name: final_eval_loss(exp, 40 if quick else None) for name, exp in exps.items()}
  ratio = times["hypermoe"] / times["moe"]
  result = {
      "goal": "step_time_ratio <= 1.3",
      "hypermoe_config": dataclasses.asdict(exps["hypermoe"].model.hypermoe),
      "seconds_per_step": times,
      "step_time_ratio": ratio,
      "train_flops_per_token": fpt,
      "flops_ratio": fpt["hypermoe"] / fpt["moe"],
      "params": counts,
      "param_overhead": {k: counts["hypermoe"][k] / counts["moe"][k] - 1 for k in ("total", "active")},
      "eval": losses,
      "eval_loss_difference": losses["hypermoe"]["final_eval_loss"] - losses["moe"]["final_eval_loss"],
      "eval_loss_difference_vs_matched": losses["hypermoe"]["final_eval_loss"] - losses["matched"]["final_eval_loss"],
      "quick": quick,
  }
  print(
      f"hypermoe / moe: step time {ratio:.3f} (goal <= 1.3), FLOPs {result['flops_ratio']:.3f}, params total +{result['param_overhead']['total']:.1%} "
      f"active +{result['param_overhead']['active']:.1%}; eval loss after {losses['moe']['steps']} steps: moe {losses['moe']['final_eval_loss']:.4f}, "
      f"hypermoe {losses['hypermoe']['final_eval_loss']:.4f} (difference {result['eval_loss_difference']:+.4f}); "
      f"matched-compute MoE {losses['matched']['final_eval_loss']:.4f} (hypermoe - matched {result['eval_loss_difference_vs_matched']:+.4f})"
  )
  write_result("hypermoe", result)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
