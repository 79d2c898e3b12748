"""A ~1.1B Llama-style dense decoder on a TPU v5p-64 slice (32 chips), FSDP over all of them.

TinyLlama-shaped (Zhang et al. 2024): 22 layers of width 2048, 32 query / 4 key-value heads,
SwiGLU width 5632, 32k sentencepiece vocabulary, 2048-token sequences, 1M tokens per step.
Launch on every worker of the slice (the hosts find each other on their own):

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
    "cd jaxlm && .venv/bin/jaxlm train dense_1b_v5p64 --run-dir gs://$BUCKET/runs/dense_1b"
"""

from jaxlm.config import CheckpointConfig, DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
  return Experiment(
      name="dense_1b_v5p64",
      description="1.1B dense decoder, TPU v5p-64 (32 chips), FSDP",
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1, devices=32),
      model=ModelConfig(
          vocab_size=32_000,
          d_model=2048,
          n_layers=22,
          n_heads=32,
          n_kv_heads=4,
          d_ff=5632,
          tie_embeddings=False,
          rope_theta=10_000.0,
          dtype="bfloat16",
          remat="dots_no_batch",  # keep matmul outputs, recompute the cheap elementwise work
          scan_layers=True,  # one compiled block: fast compiles at any depth
      ),
      data=DataConfig(
          mixture={"tfds:c4/en:3.1.0": 0.8, "tfds:wikipedia/20230601.en": 0.2},  # prepared under $JAXLM_CACHE/tfds
          seq_len=2048,
          batch_size=512,
          tokenizer="sentencepiece",
          sp_model="tokenizers/c4_32k.model",  # a pre-trained 32k model with pad=0, bos=1, eos=2
      ),
      optim=OptimConfig(lr=4e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0),
      train=TrainConfig(steps=100_000, eval_every=1000, eval_batches=20, checkpoint_every=1000, log_every=50, z_loss_weight=1e-4),
      checkpoint=CheckpointConfig(max_to_keep=3, async_save=True),
  )
