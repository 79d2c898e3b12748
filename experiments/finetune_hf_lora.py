"""LoRA fine-tuning of a local Hugging Face checkpoint, on GPUs or a TPU slice (a template).

Point `init_from` at a model directory (config.json + safetensors + tokenizer.json) of any family
jaxlm reads (llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, olmoe). Its config.json
sets the architecture; this file sets how to train: bfloat16 weights and compute, full remat,
rank-16 LoRA on every linear weight (routed experts included), the checkpoint's own tokenizer,
and a data mixture to replace with yours. Weights stream from the safetensors files straight into
their shardings (`jaxlm.interop.hf.load_model`): no host ever holds the model once per device.

  jaxlm train experiments/finetune_hf_lora.py --set init_from=/data/Meta-Llama-3.1-8B      # 8 x H100
  jaxlm train experiments/finetune_hf_lora.py:tpu --set init_from=/data/Mixtral-8x7B-v0.1  # v5p-64
  jaxlm convert hf-export runs/finetune_hf_lora out/merged          # merged, for transformers / vLLM
  jaxlm convert hf-export runs/finetune_hf_lora out/adapter --adapter   # PEFT adapter only

`:smoke` runs two steps on CPU (tests), from a tiny model such as `jaxlm.interop.hf.tiny` writes.
"""

import dataclasses
import os

from jaxlm.config import CheckpointConfig, DataConfig, Experiment, MeshConfig, ModelConfig, MoEConfig, OptimConfig, PeftConfig, TrainConfig

HF_DIR = os.environ.get("JAXLM_HF_DIR", "checkpoints/hf-model")  # or --set init_from=...


def experiment() -> Experiment:
  """8 x H100 (one host): fsdp over the 8 GPUs, experts (if any) over them too."""
  return Experiment(
      name="finetune_hf_lora",
      description="rank-16 LoRA on all linear weights of a Hugging Face checkpoint (GPU)",
      init_from=HF_DIR,
      mesh=MeshConfig(fsdp=-1, devices=8),
      # Only run settings are read here; the architecture comes from init_from's config.json.
      model=ModelConfig(dtype="bfloat16", param_dtype="bfloat16", remat="full", attention_impl="auto", moe=MoEConfig(gmm_backend="auto")),
      data=DataConfig(tokenizer="hf", mixture={"stdlib_code": 0.7, "stdlib_prose": 0.3}, seq_len=4096, batch_size=32, add_bos=True),
      peft=PeftConfig(method="lora", targets=("all-linear",), rank=16, alpha=32.0, dropout=0.05),
      optim=OptimConfig(lr=2e-4, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0),
      train=TrainConfig(steps=2000, eval_every=200, eval_batches=8, checkpoint_every=200, log_every=10, sample_prompts=("def ",)),
      checkpoint=CheckpointConfig(max_to_keep=2),
  )


def tpu() -> Experiment:
  """A v5p-64 slice (32 chips): fsdp within it; MoE checkpoints put experts on an expert axis of 8."""
  exp = experiment()
  return dataclasses.replace(exp, name="finetune_hf_lora_tpu", mesh=MeshConfig(fsdp=-1, devices=32), model=dataclasses.replace(exp.model, attention_impl="xla"))


def smoke() -> Experiment:
  """Two steps on the CPU from a tiny checkpoint (tests): float32, short rows, no remat."""
  exp = experiment()
  return dataclasses.replace(
      exp,
      name="finetune_hf_lora_smoke",
      mesh=MeshConfig(fsdp=-1),
      model=ModelConfig(dtype="float32", param_dtype="float32"),
      data=dataclasses.replace(exp.data, seq_len=64, batch_size=8),
      peft=dataclasses.replace(exp.peft, rank=4, alpha=8.0, dropout=0.0),
      train=TrainConfig(steps=2, eval_every=0, eval_batches=1, checkpoint_every=0, log_every=1, sample_prompts=("def ",), sample_tokens=4),
  )
