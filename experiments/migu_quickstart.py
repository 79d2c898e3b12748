"""Continual fine-tuning, code then prose: how much of the code does each method forget?

MIGU (Du et al. 2024, arXiv 2406.17245, `optim.migu_ratio`) against plain fine-tuning, and
tuning only the FFN's keys or only its values (Qiu et al. 2024, arXiv 2402.12233,
`peft.method="subset"` with the `ffn-keys` / `ffn-values` targets). As in the MIGU authors'
scripts, the first task is trained plainly and the method applies from the second task on:

  jaxlm train migu_quickstart:code      # stage 1: a small model on the stdlib's code (runs/migu_quickstart_code)
  jaxlm train migu_quickstart           # stage 2 with MIGU: the prose of the Python manual
  jaxlm train migu_quickstart:plain     # stage 2, plain full fine-tuning
  jaxlm train migu_quickstart:keys      # stage 2, only the FFN keys (w_gate, w_up) trained
  jaxlm train migu_quickstart:values    # stage 2, only the FFN values (w_down) trained

Every stage-2 run starts from stage 1's last checkpoint and also evaluates on code
(`data.eval_also`), never training on it: forgetting = its final `eval_loss/stdlib_code` minus
stage 1's; learning = its final `eval_loss/stdlib_prose` (both in metrics.jsonl).
`benchmarks/migu.py` runs all five and records the figures. Under a minute per run on a 2-core
CPU (d_model 128, 2 layers, 16 x 128 tokens, 100 steps per stage).
"""

import dataclasses

from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, PeftConfig, TrainConfig

STAGE_1 = "runs/migu_quickstart_code"


def code() -> Experiment:
  """Stage 1: train a small model on code (plain AdamW), evaluated on prose too."""
  return Experiment(
      name="migu_quickstart_code",
      description="stage 1 of the continual fine-tuning: a small decoder trained on the stdlib's code",
      mesh=MeshConfig(fsdp=-1),
      model=ModelConfig(vocab_size=384, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, dtype="float32"),
      data=DataConfig(mixture={"stdlib_code": 1.0}, eval_also=("stdlib_prose",), seq_len=128, batch_size=16),
      optim=OptimConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1),
      train=TrainConfig(steps=100, eval_every=50, eval_batches=4, checkpoint_every=100, log_every=10, sample_prompts=("def ",), sample_tokens=48),
  )


def experiment() -> Experiment:
  """Stage 2 with MIGU: prose, updating per layer only the weights of its top 30% outputs."""
  return dataclasses.replace(
      plain(),
      name="migu_quickstart",
      description="stage 2 on prose with MIGU (top 30% of each linear layer's outputs updated)",
      optim=dataclasses.replace(plain().optim, migu_ratio=0.3),
  )


def plain() -> Experiment:
  """Stage 2, plain full fine-tuning on prose (the baseline)."""
  stage1 = code()
  return dataclasses.replace(
      stage1,
      name="migu_quickstart_plain",
      description="stage 2 on prose, plain full fine-tuning",
      init_from=STAGE_1,
      data=dataclasses.replace(stage1.data, mixture={"stdlib_prose": 1.0}, eval_also=("stdlib_code",)),
      optim=OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1),
      train=dataclasses.replace(stage1.train, sample_prompts=("The ",)),
  )


def keys() -> Experiment:
  """Stage 2 tuning only the FFN keys (w_gate and w_up of every layer), everything else frozen."""
  return dataclasses.replace(plain(), name="migu_quickstart_keys", description="stage 2 on prose, only the FFN keys trained", peft=PeftConfig(method="subset", targets=("ffn-keys",)))


def values() -> Experiment:
  """Stage 2 tuning only the FFN values (w_down of every layer), everything else frozen."""
  return dataclasses.replace(plain(), name="migu_quickstart_values", description="stage 2 on prose, only the FFN values trained", peft=PeftConfig(method="subset", targets=("ffn-values",)))
