"""A Llama-3-8B-shaped dense decoder on one 8 x H100 (80 GB) node: FSDP over the 8 GPUs.

32 layers of width 4096, 32 query / 8 key-value heads, SwiGLU width 14336, 128k vocabulary,
RoPE base 500k, 8192-token sequences (Llama 3, Dubey et al. 2024). Full rematerialisation
keeps activations small enough for 80 GB; cuDNN flash attention through XLA.

  .venv/bin/jaxlm train llama3_8b_8xh100 --run-dir /checkpoints/llama3_8b

On several nodes, start the same command on each with --coordinator-address, --num-processes
and --process-id (or under SLURM's srun, which jax detects), and raise `mesh.dcn_data`.
"""

from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
  return Experiment(
      name="llama3_8b_8xh100",
      description="8B dense decoder (Llama-3 shapes), 8 x H100, FSDP",
      mesh=MeshConfig(data=1, fsdp=8, tensor=1, devices=8),
      model=ModelConfig(
          vocab_size=128_256,
          d_model=4096,
          n_layers=32,
          n_heads=32,
          n_kv_heads=8,
          d_ff=14_336,
          tie_embeddings=False,
          rope_theta=500_000.0,
          dtype="bfloat16",
          remat="full",
          scan_layers=True,
          attention_impl="cudnn",
      ),
      data=DataConfig(
          mixture={"tfds:c4/en:3.1.0": 1.0},
          seq_len=8192,
          batch_size=16,
          tokenizer="sentencepiece",
          sp_model="tokenizers/llama3_128k.model",
      ),
      optim=OptimConfig(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1),
      train=TrainConfig(steps=50_000, eval_every=1000, eval_batches=10, checkpoint_every=500, log_every=20),
  )
