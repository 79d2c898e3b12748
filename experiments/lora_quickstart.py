"""LoRA fine-tuning of the quickstart model on code only (CPU, a few minutes).

Starts from the quickstart run (`init_from = runs/quickstart`: run `make train` first; the error
says so when it is missing) and adapts every linear weight with rank-8 LoRA on the standard
library's code, then reports what PEFT is for: the trainable fraction (printed at the start),
the compiled train step's memory (printed after compiling), and the code validation loss.
`lora_quickstart:full` fine-tunes every weight for the same steps on the same data, for the
comparison; `:dora` uses DoRA. Each variant runs at its own customary learning rate.

  make train                                   # runs/quickstart, ~5 min
  jaxlm train lora_quickstart                  # runs/lora_quickstart
  jaxlm train lora_quickstart:full             # runs/lora_quickstart_full
  jaxlm merge runs/lora_quickstart --out runs/lora_quickstart_merged
"""

import dataclasses

from jaxlm import experiments
from jaxlm.config import DataConfig, Experiment, OptimConfig, PeftConfig, TrainConfig


def experiment() -> Experiment:
  base = experiments.load("quickstart")
  return dataclasses.replace(
      base,
      name="lora_quickstart",
      description="rank-8 LoRA on every linear weight of the quickstart model, fine-tuned on code (CPU)",
      init_from="runs/quickstart",
      data=DataConfig(mixture={"stdlib_code": 1.0}, seq_len=256, batch_size=16),
      peft=PeftConfig(method="lora", rank=8, alpha=16.0, targets=("all-linear",)),
      optim=OptimConfig(lr=2e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0),
      train=TrainConfig(steps=100, eval_every=25, eval_batches=4, checkpoint_every=50, log_every=10, sample_prompts=("def ",)),
  )


def full() -> Experiment:
  """Full fine-tuning for the same steps on the same data (the comparison)."""
  exp = experiment()
  return dataclasses.replace(exp, name="lora_quickstart_full", description="full fine-tuning of the quickstart model on code", peft=PeftConfig(), optim=dataclasses.replace(exp.optim, lr=5e-4, weight_decay=0.1))


def dora() -> Experiment:
  """DoRA (weight-decomposed LoRA) instead of LoRA."""
  exp = experiment()
  return dataclasses.replace(exp, name="lora_quickstart_dora", peft=dataclasses.replace(exp.peft, method="dora"))


def smoke() -> Experiment:
  """A few steps from a quickstart:smoke run (tests)."""
  exp = experiment()
  small = experiments.load("quickstart:smoke")
  return dataclasses.replace(exp, name="lora_quickstart_smoke", init_from="runs/quickstart_smoke", model=small.model, data=dataclasses.replace(small.data, mixture={"stdlib_code": 1.0}), train=small.train)
