"""LoRA fine-tuning of a Mixtral-8x7B-shaped MoE on one 8 x H100 node, experts included.

Mixtral shapes (Jiang et al. 2024; see mixtral_8x7b_v5p128.py): 46.7B parameters. The frozen
base is kept in bfloat16 (no optimizer state: 93 GB, 11.7 GB per GPU with the experts split
one per GPU over `expert` = 8); rank-16 LoRA adapts attention and every routed expert (per-expert
A [E, D, R] and B [E, R, F] through the grouped matmul, split over `expert` like their experts),
never the routers; the adapters and their AdamW moments are float32 and small (~0.2B
parameters). Sequences of 4096 tokens, one per GPU, full rematerialisation.

Point `init_from` at a jaxlm run holding Mixtral weights (e.g. one written by `jaxlm convert
hf-import` from a Hugging Face checkpoint, when that lands); `jax.eval_shape` builds it without
weights (`jaxlm inspect mixtral_lora_8xh100`).

  .venv/bin/jaxlm train mixtral_lora_8xh100 --run-dir /checkpoints/mixtral_lora
"""

import dataclasses

from jaxlm import experiments
from jaxlm.config import DataConfig, Experiment, MeshConfig, OptimConfig, PeftConfig, TrainConfig


def experiment() -> Experiment:
  base = experiments.load("mixtral_8x7b_v5p128")
  return dataclasses.replace(
      base,
      name="mixtral_lora_8xh100",
      description="rank-16 LoRA on attention and routed experts of a Mixtral-8x7B-shaped MoE, 8 x H100",
      mesh=MeshConfig(data=1, fsdp=1, expert=8, tensor=1, devices=8),
      model=dataclasses.replace(base.model, param_dtype="bfloat16", attention_impl="cudnn", remat="full", scan_layers=True),
      init_from="",  # a jaxlm run with Mixtral weights
      peft=PeftConfig(method="lora", rank=16, alpha=32.0, dropout=0.05, targets=(r".*attn/w_(q|k|v|o)", r".*experts/w_(gate|up|down)")),
      data=DataConfig(mixture={"tfds:c4/en:3.1.0": 1.0}, seq_len=4096, batch_size=8, tokenizer="sentencepiece", sp_model="tokenizers/c4_32k.model"),
      optim=OptimConfig(lr=2e-4, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.0),
      train=TrainConfig(steps=2000, eval_every=200, eval_batches=10, checkpoint_every=200, log_every=10),
  )
