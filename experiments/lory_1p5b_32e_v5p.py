"""Lory 1.5B-active / 32 experts (Zhong et al. 2024, arXiv 2405.03133) on a TPU v5p-128 slice (64 chips).

A Llama-style decoder of 1.5B active parameters (28 layers of width 2048, SwiGLU width 5504,
32k sentencepiece vocabulary) whose every FFN is 32 experts merged per segment of 256 tokens:
~31B parameters in all, the paper's "30B (1.5B active)". Experts are sharded along F over
`tensor` (4) and along D over `fsdp` (16): soft-merged experts cannot use expert parallelism,
every expert takes part in every merge. 4096-token sequences, 1M tokens per step, documents
ordered by similarity (LSH neighbours, cached per source). The shape is chosen to match the
paper's advertised sizes, not copied from its tables.

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
    "cd jaxlm && .venv/bin/jaxlm train lory_1p5b_32e_v5p --run-dir gs://$BUCKET/runs/lory_1p5b"
"""

from jaxlm.config import CheckpointConfig, DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, SoftMoEConfig, TrainConfig


def experiment() -> Experiment:
  return Experiment(
      name="lory_1p5b_32e_v5p",
      description="Lory 1.5B active / 32 experts (31B total), TPU v5p-128 (64 chips), FSDP 16 x tensor 4",
      mesh=MeshConfig(data=1, fsdp=16, tensor=4, devices=64),
      model=ModelConfig(
          vocab_size=32_000,
          d_model=2048,
          n_layers=28,
          n_heads=16,
          n_kv_heads=16,
          d_ff=5504,
          ffn="soft_moe",
          soft_moe=SoftMoEConfig(n_experts=32, granularity="segment", segment_len=256, first_segment="paper"),
          tie_embeddings=False,
          dtype="bfloat16",
          remat="dots_no_batch",
          scan_layers=True,
      ),
      data=DataConfig(
          mixture={"tfds:c4/en:3.1.0": 0.8, "tfds:wikipedia/20230601.en": 0.2},
          seq_len=4096,
          batch_size=256,
          tokenizer="sentencepiece",
          sp_model="tokenizers/c4_32k.model",
          similarity="lsh",
      ),
      optim=OptimConfig(lr=2e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0),
      train=TrainConfig(steps=143_000, grad_accum=4, eval_every=2000, eval_batches=20, checkpoint_every=1000, log_every=50),  # 150B tokens
      checkpoint=CheckpointConfig(max_to_keep=3, async_save=True),
  )
