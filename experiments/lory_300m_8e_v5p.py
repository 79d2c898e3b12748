"""Lory 0.3B-active / 8 experts (Zhong et al. 2024, arXiv 2405.03133) on a TPU v5p-16 slice (8 chips).

A Llama-style decoder of 0.3B active parameters (24 layers of width 1024, SwiGLU width 2752,
32k sentencepiece vocabulary) whose every FFN is 8 experts merged per segment of 256 tokens
(1.8B parameters in all), trained on 4096-token sequences, 1M tokens per step, documents
ordered by similarity (In-Context Pretraining; LSH neighbours, computed once per source and
cached; for a C4-sized source that is a long single-host job worth doing ahead of time).
The shape is chosen to match the paper's advertised sizes, not copied from its tables.

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
    "cd jaxlm && .venv/bin/jaxlm train lory_300m_8e_v5p --run-dir gs://$BUCKET/runs/lory_300m"
"""

from jaxlm.config import CheckpointConfig, DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, SoftMoEConfig, TrainConfig


def experiment() -> Experiment:
  return Experiment(
      name="lory_300m_8e_v5p",
      description="Lory 0.3B active / 8 experts (1.8B total), TPU v5p-16 (8 chips), FSDP",
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1, devices=8),
      model=ModelConfig(
          vocab_size=32_000,
          d_model=1024,
          n_layers=24,
          n_heads=16,
          n_kv_heads=16,
          d_ff=2752,
          ffn="soft_moe",
          soft_moe=SoftMoEConfig(n_experts=8, granularity="segment", segment_len=256, first_segment="paper"),
          tie_embeddings=False,
          dtype="bfloat16",
          remat="dots_no_batch",  # the soft MoE recomputes its merged weights on its own
          scan_layers=True,
      ),
      data=DataConfig(
          mixture={"tfds:c4/en:3.1.0": 0.8, "tfds:wikipedia/20230601.en": 0.2},  # prepared under $JAXLM_CACHE/tfds
          seq_len=4096,
          batch_size=256,
          tokenizer="sentencepiece",
          sp_model="tokenizers/c4_32k.model",
          similarity="lsh",
      ),
      optim=OptimConfig(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0),
      train=TrainConfig(steps=143_000, grad_accum=4, eval_every=2000, eval_batches=20, checkpoint_every=1000, log_every=50),  # 150B tokens
      checkpoint=CheckpointConfig(max_to_keep=3, async_save=True),
  )
