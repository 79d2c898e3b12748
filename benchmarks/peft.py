"""PEFT: what adapters save in a train step, as ratios measured in one run.

  memory_ratio         compiled train-step memory per device (XLA memory analysis: arguments +
                       outputs + temporaries - aliased) with rank-8 LoRA on every linear weight /
                       full fine-tuning, dense_100m (99M parameters). Goal <= 0.45.
  time_ratio           step time LoRA / full fine-tuning, timed interleaved on this machine, and the
                       compiled FLOPs ratio (the frozen weights' gradients are never formed: ~2/3).
                       Goal <= 0.8.
  dora_time_ratio      step time DoRA / LoRA (the column norm comes from A^T W and A^T A, never from
                       the adapted weight). Goal <= 1.3.
  expert_memory_ratio  LoRA on the routed experts only / fine-tuning the routed experts fully
                       (everything else frozen in both). Goal <= 0.5.

Memory is what a fine-tune needs on an accelerator, so it is compiled ahead of time for a TPU v5p
chip when libtpu is installed (`pip install "jax[tpu]"`; CPU figures are recorded too, but XLA:CPU
schedules without regard to memory). LoRA saves the states (gradients and AdamW moments of the
frozen weights: 12 of the 16 bytes per parameter), not the activations: the saving shows where
the states dominate, i.e. with rematerialisation and per-device micro-batches, which is how
memory-bound fine-tuning runs. Both regimes are recorded.

Times are CPU times here (`dense_100m` is far too slow to time on a CPU: a 12-layer, 512-wide
model at batch 4 x 256 is timed instead); on accelerators the elementwise parts of LoRA and DoRA
fuse into the matmuls, which a CPU does not do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from benchmarks.common import interleaved_times, write_result
from benchmarks.train_step import synthetic_batch
from jaxlm import experiments
from jaxlm.config import Experiment, MeshConfig, PeftConfig
from jaxlm.errors import ConfigError
from jaxlm.train import aot, loop

LORA = PeftConfig(method="lora", rank=8, alpha=16.0, targets=("all-linear",))
DORA = dataclasses.replace(LORA, method="dora")
FULL_EXPERTS = PeftConfig(method="bitfit", train_also=(r".*experts/w_(gate|up|down)",))  # the routed experts (+ norm scales)
EXPERT_LORA = PeftConfig(method="lora", rank=8, alpha=16.0, targets=(r".*experts/w_(gate|up|down)",))
GOALS = {"memory_ratio": 0.45, "time_ratio": 0.8, "dora_time_ratio": 1.3, "expert_memory_ratio": 0.5}


def with_(exp: Experiment, *, mesh: MeshConfig | None = None, data: dict | None = None, **model: Any) -> Experiment:
  return dataclasses.replace(
      exp,
      mesh=mesh or exp.mesh,
      model=dataclasses.replace(exp.model, **model),
      data=dataclasses.replace(exp.data, **(data or {})),
  )


def memory_ratio(exp: Experiment, peft: PeftConfig, baseline: PeftConfig, devices: list) -> dict[str, Any]:
  """Compiled per-device memory (MiB) of `peft` and `baseline` on `devices`, and their ratio."""
  out = {}
  for name, p in (("adapted", peft), ("baseline", baseline)):
    s = aot.summary(aot.compile_train_step(dataclasses.replace(exp, peft=p), devices))
    out[name] = {k: s[k] / 2**20 for k in ("arguments", "temporaries", "peak_estimate")}
  out["ratio"] = out["adapted"]["peak_estimate"] / out["baseline"]["peak_estimate"]
  return out


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

  return run, aot.summary(compiled)["flops"]


def tpu_chips(n: int) -> list | None:
  try:
    return aot.topology_devices("v5p:2x2x1")[:n]
  except ConfigError:
    return None


def main(argv: list[str]) -> None:
  quick = "--quick" in argv
  out: dict[str, Any] = {"goals": GOALS}
  tpu = tpu_chips(4)
  one = MeshConfig(fsdp=1, devices=1)
  dense = with_(experiments.load("dense_100m"), mesh=one, scan_layers=False)
  cases = {"remat_full_b2x1024": with_(dense, remat="full", data={"batch_size": 2}), "no_remat_b2x1024": with_(dense, remat="none", data={"batch_size": 2})}
  where = {"cpu": jax.devices()[:1], **({"tpu_v5p": tpu[:1]} if tpu else {})}
  out["dense_100m_memory"] = {f"{w}/{c}": memory_ratio(e, LORA, PeftConfig(), d) for w, d in where.items() for c, e in cases.items()}
  headline = "tpu_v5p/remat_full_b2x1024" if tpu else "cpu/remat_full_b2x1024"
  out["memory_ratio"] = out["dense_100m_memory"][headline]["ratio"]
  out["memory_ratio_case"] = headline
  for k, v in out["dense_100m_memory"].items():
    print(f"dense_100m LoRA / full memory, {k}: {v['adapted']['peak_estimate']:,.0f} / {v['baseline']['peak_estimate']:,.0f} MiB = {v['ratio']:.3f}")

  mid = with_(dense, d_model=512, n_layers=12, n_heads=8, n_kv_heads=8, d_ff=1536, vocab_size=384, dtype="float32", data={"batch_size": 4, "seq_len": 256, "tokenizer": "byte"})
  runs = {name: step_fn(dataclasses.replace(mid, peft=p)) for name, p in (("full", PeftConfig()), ("lora", LORA), ("dora", DORA))}
  times = interleaved_times({k: v[0] for k, v in runs.items()}, warmup=1, rounds=3 if quick else 10)
  flops = {k: v[1] for k, v in runs.items()}
  out["step_12x512"] = {"seconds": times, "compiled_flops": flops, "machine_note": "CPU: times are noisy; ratios from interleaved runs"}
  out["time_ratio"] = times["lora"] / times["full"]
  out["dora_time_ratio"] = times["dora"] / times["lora"]
  out["flops_ratio_lora_full"] = flops["lora"] / flops["full"]
  out["flops_ratio_dora_lora"] = flops["dora"] / flops["lora"]
  print(f"12 x 512 step: full {times['full']:.3f} s, LoRA {times['lora']:.3f} s, DoRA {times['dora']:.3f} s: LoRA/full {out['time_ratio']:.3f} "
        f"(FLOPs {out['flops_ratio_lora_full']:.3f}), DoRA/LoRA {out['dora_time_ratio']:.3f} (FLOPs {out['flops_ratio_dora_lora']:.3f})")

  moe = with_(experiments.load("moe_quickstart"), mesh=one, remat="full")
  out["expert_memory"] = {f"{w}/moe_quickstart": memory_ratio(moe, EXPERT_LORA, FULL_EXPERTS, d) for w, d in where.items()}
  if tpu:  # Mixtral's shapes (2 of its 32 layers), experts split over 4 chips, 2048 tokens per chip
    mix = experiments.load("mixtral_lora_8xh100")
    mix = with_(mix, mesh=MeshConfig(expert=4, fsdp=1, devices=4), n_layers=2, param_dtype="float32", attention_impl="xla", data={"batch_size": 4, "seq_len": 2048})
    out["expert_memory"]["tpu_v5p/mixtral_2_layers_ep4"] = memory_ratio(mix, EXPERT_LORA, FULL_EXPERTS, tpu)
  for k, v in out["expert_memory"].items():
    print(f"expert LoRA / expert fine-tuning memory, {k}: {v['adapted']['peak_estimate']:,.0f} / {v['baseline']['peak_estimate']:,.0f} MiB = {v['ratio']:.3f}")
  key = "tpu_v5p/mixtral_2_layers_ep4" if tpu else "cpu/moe_quickstart"
  out["expert_memory_ratio"], out["expert_memory_ratio_case"] = out["expert_memory"][key]["ratio"], key
  out["met"] = {k: out[k] <= g for k, g in GOALS.items()}
  write_result("peft", out)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
