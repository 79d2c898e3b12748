"""PEFT: what adapters save in a train step, as ratios measured in one run.

  memory_ratio       compiled train-step memory (XLA memory analysis: arguments + outputs +
                     temporaries - aliased, per device) with rank-8 LoRA on every linear weight /
                     full fine-tuning, for the ~100M config (dense_100m; batch 2 x 1024). Goal <= 0.45.
  time_ratio         step time LoRA / full fine-tuning (the frozen weights' gradients are never
                     formed: ~2/3 of the FLOPs). Goal <= 0.8. Timed interleaved.
  dora_time_ratio    step time DoRA / LoRA (DoRA's column norm from A^T W and A^T A, never the
                     adapted weight). Goal <= 1.3.
  expert_memory_ratio  moe_quickstart: compiled memory with LoRA on the routed experts only /
                     fine-tuning the routed experts fully (everything else frozen). Goal <= 0.5.

CPU times say little in absolute terms (and `dense_100m` is far too slow to time on a CPU: the
time ratios use a 12-layer, 512-wide model at batch 4 x 256); the ratios are what carry over.
"""

from __future__ import annotations

import dataclasses

import jax

from benchmarks.common import interleaved_times, write_result
from benchmarks.train_step import synthetic_batch
from jaxlm import experiments
from jaxlm.config import Experiment, MeshConfig, PeftConfig
from jaxlm.train import aot, loop

LORA = PeftConfig(method="lora", rank=8, alpha=16.0, targets=("all-linear",))
DORA = dataclasses.replace(LORA, method="dora")
FULL_EXPERTS = PeftConfig(method="bitfit", train_also=(r".*experts/w_(gate|up|down)",))  # experts (+ norm scales)
EXPERT_LORA = PeftConfig(method="lora", rank=8, alpha=16.0, targets=(r".*experts/w_(gate|up|down)",))
GOALS = {"memory_ratio": 0.45, "time_ratio": 0.8, "dora_time_ratio": 1.3, "expert_memory_ratio": 0.5}


def one_device(exp: Experiment, **data) -> Experiment:
  exp = dataclasses.replace(exp, mesh=MeshConfig(fsdp=1), model=dataclasses.replace(exp.model, dtype="float32", scan_layers=False))
  return dataclasses.replace(exp, data=dataclasses.replace(exp.data, **data)) if data else exp


def memory(exp: Experiment) -> dict[str, float]:
  s = aot.summary(aot.compile_train_step(exp, jax.devices()[:1]))
  return {k: s[k] for k in ("arguments", "outputs", "temporaries", "aliased", "peak_estimate")}


def step_fn(exp: Experiment):
  """A callable running one compiled train step (blocking), its state carried between calls."""
  setup = loop.prepare(exp, jax.devices()[:1])
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
  quick = "--quick" in argv
  out: dict = {"goals": GOALS}
  base = one_device(experiments.load("dense_100m"), batch_size=2)
  mem = {name: memory(dataclasses.replace(base, peft=p)) for name, p in (("full", PeftConfig()), ("lora", LORA))}
  out["dense_100m_memory"] = mem
  out["memory_ratio"] = mem["lora"]["peak_estimate"] / mem["full"]["peak_estimate"]
  print(f"dense_100m train-step memory: full {mem['full']['peak_estimate'] / 2**20:,.0f} MiB, LoRA {mem['lora']['peak_estimate'] / 2**20:,.0f} MiB -> {out['memory_ratio']:.3f}")

  mid = dataclasses.replace(base, model=dataclasses.replace(base.model, d_model=512, n_layers=12, n_heads=8, n_kv_heads=8, d_ff=1536, vocab_size=384), data=dataclasses.replace(base.data, batch_size=4, seq_len=256, tokenizer="byte"))
  fns = {name: step_fn(dataclasses.replace(mid, peft=p)) for name, p in (("full", PeftConfig()), ("lora", LORA), ("dora", DORA))}
  times = interleaved_times(fns, warmup=1, rounds=3 if quick else 8)
  out["step_seconds_12x512"] = times
  out["time_ratio"] = times["lora"] / times["full"]
  out["dora_time_ratio"] = times["dora"] / times["lora"]
  print(f"12 x 512 step time: full {times['full']:.3f} s, LoRA {times['lora']:.3f} s, DoRA {times['dora']:.3f} s -> {out['time_ratio']:.3f}, DoRA/LoRA {out['dora_time_ratio']:.3f}")

  moe = one_device(experiments.load("moe_quickstart"))
  emem = {name: memory(dataclasses.replace(moe, peft=p)) for name, p in (("full_experts", FULL_EXPERTS), ("expert_lora", EXPERT_LORA))}
  out["moe_quickstart_memory"] = emem
  out["expert_memory_ratio"] = emem["expert_lora"]["peak_estimate"] / emem["full_experts"]["peak_estimate"]
  print(f"moe_quickstart train-step memory: expert fine-tuning {emem['full_experts']['peak_estimate'] / 2**20:,.0f} MiB, expert LoRA {emem['expert_lora']['peak_estimate'] / 2**20:,.0f} MiB -> {out['expert_memory_ratio']:.3f}")
  out["met"] = {k: out[k] <= g for k, g in GOALS.items()}
  write_result("peft", out)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
