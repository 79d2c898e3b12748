"""G_stack model growth on the quickstart data (Du et al. 2024, arXiv 2405.15319), on a CPU.

A 2-layer model (d_model 128, 16 x 128 tokens per step) trains SMALL_STEPS steps; G_stack
stacks its layers twice into the 4-layer model (layer i = small layer i mod 2), which trains on
with a fresh optimizer. The comparison is the 4-layer model trained from scratch on the same
data for the same total FLOPs: a small step counts as 0.53 of a large one (its training FLOPs
per token over the large model's, jaxlm.train.flops), so scratch trains GROWN_STEPS +
0.53 x SMALL_STEPS = 241 steps. `:scratch_tokens` trains it for the same total tokens (= steps) as small +
grown instead. The small model's cosine spans small + grown steps (it grows from an intermediate
checkpoint, as in the paper); the grown run and the scratch runs warm up and decay over their own
steps (the grown one with a shorter warm-up: its weights are trained, only Adam's moments are new).

  jaxlm train grow_quickstart:small             # runs/grow_quickstart_small
  jaxlm train grow_quickstart                   # grown on load (init_from + grow.operator=stack)
  jaxlm train grow_quickstart:scratch           # equal FLOPs
  jaxlm train grow_quickstart:scratch_tokens    # equal tokens
  # or grow explicitly: jaxlm convert grow runs/grow_quickstart_small runs/grown --factor 2 --set train.steps=188

`benchmarks/growth.py` runs all four in a temporary directory and writes the comparison.
"""

import dataclasses

from jaxlm.config import DataConfig, Experiment, GrowConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxlm.train import flops

SMALL_STEPS = 100  # steps of the small model before it grows
GROWN_STEPS = 188  # steps of the grown model; with the small ones: the FLOPs of SCRATCH_STEPS large steps
FACTOR = 2  # growth factor g: 2 -> 4 layers


def small() -> Experiment:
  """The 2-layer model that grows."""
  return Experiment(
      name="grow_quickstart_small",
      description="2-layer model trained briefly, to be grown x2 by G_stack (CPU)",
      mesh=MeshConfig(fsdp=-1),
      model=ModelConfig(vocab_size=384, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, dtype="float32"),
      data=DataConfig(mixture={"stdlib_prose": 0.5, "stdlib_code": 0.5}, seq_len=128, batch_size=16),
      # Its cosine runs over small + grown steps: it grows from an intermediate checkpoint of a longer
      # schedule, as in the paper (growth at d tokens of a run), not from a fully decayed one.
      optim=OptimConfig(lr=3e-3, warmup_steps=20, decay_steps=SMALL_STEPS + GROWN_STEPS, min_lr_ratio=0.1, weight_decay=0.1),
      train=TrainConfig(steps=SMALL_STEPS, eval_every=50, eval_batches=4, checkpoint_every=0, log_every=10, sample_tokens=32),
  )


def _large_model() -> ModelConfig:
  return dataclasses.replace(small().model, n_layers=small().model.n_layers * FACTOR)


def _small_cost() -> float:
  """Training FLOPs per token of the small model / of the large one (Kaplan-style count)."""
  seq = small().data.seq_len
  return flops.train_flops_per_token(small().model, seq) / flops.train_flops_per_token(_large_model(), seq)


def _scratch_steps() -> int:
  """Large-model steps with the FLOPs of SMALL_STEPS small + GROWN_STEPS large steps."""
  return round(GROWN_STEPS + SMALL_STEPS * _small_cost())


def experiment() -> Experiment:
  """The 4-layer model grown on load from the small run by G_stack, trained GROWN_STEPS steps."""
  base = small()
  return dataclasses.replace(
      base,
      name="grow_quickstart",
      description="4-layer model grown x2 by G_stack from grow_quickstart:small, trained on (CPU)",
      model=_large_model(),
      init_from="runs/grow_quickstart_small",
      grow=GrowConfig(operator="stack", factor=FACTOR),
      optim=dataclasses.replace(base.optim, warmup_steps=10, decay_steps=0),  # a fresh optimizer: a short warm-up of its moments, then its own cosine
      train=dataclasses.replace(base.train, steps=GROWN_STEPS, eval_every=47),
  )


def scratch() -> Experiment:
  """The 4-layer model from scratch for the same total FLOPs as small + grown."""
  base = small()
  return dataclasses.replace(
      base,
      name="grow_quickstart_scratch",
      description="4-layer model from scratch, FLOPs of small + grown (CPU)",
      model=_large_model(),
      optim=dataclasses.replace(base.optim, decay_steps=0),  # warm-up and cosine over its own steps
      train=dataclasses.replace(base.train, steps=_scratch_steps(), eval_every=60),
  )


def scratch_tokens() -> Experiment:
  """The 4-layer model from scratch for the same total tokens (and steps) as small + grown."""
  exp = scratch()
  return dataclasses.replace(exp, name="grow_quickstart_scratch_tokens", description="4-layer model from scratch, tokens of small + grown (CPU)", train=dataclasses.replace(exp.train, steps=SMALL_STEPS + GROWN_STEPS, eval_every=72))
