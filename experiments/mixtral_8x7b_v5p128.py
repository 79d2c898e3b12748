"""A Mixtral-8x7B-shaped sparse MoE on a TPU v5p-128 slice (64 chips): 8 experts over 8 chips each.

Mixtral shapes (Jiang et al. 2024): 32 layers of width 4096, 32 query / 8 key-value heads,
8 SwiGLU experts of width 14336 per layer with top-2 softmax routing renormalised over the two,
32k vocabulary, RoPE base 1e6; 46.7B parameters, 12.9B active per token. Mesh: experts split
over `expert` = 8 (one expert per chip of an expert group) and everything FSDP-sharded over
`fsdp` = 8; dropless routing through the Pallas grouped matmul and a ragged all-to-all.

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
    "cd jaxlm && .venv/bin/jaxlm train mixtral_8x7b_v5p128 --run-dir gs://$BUCKET/runs/mixtral"
"""

from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
  return Experiment(
      name="mixtral_8x7b_v5p128",
      description="Mixtral-8x7B-shaped MoE (47B, 13B active), TPU v5p-128 (64 chips), expert 8 x fsdp 8",
      mesh=MeshConfig(data=1, fsdp=8, expert=8, tensor=1, devices=64),
      model=ModelConfig(
          vocab_size=32_000,
          d_model=4096,
          n_layers=32,
          n_heads=32,
          n_kv_heads=8,
          d_ff=14_336,
          ffn="moe",
          tie_embeddings=False,
          rope_theta=1_000_000.0,
          dtype="bfloat16",
          remat="full",
          scan_layers=True,
          moe=MoEConfig(
              n_experts=8,
              top_k=2,
              d_ff_expert=14_336,
              router="softmax_topk",
              renormalize=True,  # Mixtral: softmax over the top-2 logits
              mode="dropless",
              gmm_backend="auto",  # Pallas grouped matmul on TPU
              all_to_all="auto",  # ragged all-to-all on TPU
              load_balance_weight=0.01,
              router_z_weight=0.001,
          ),
      ),
      data=DataConfig(
          mixture={"tfds:c4/en:3.1.0": 1.0},
          seq_len=4096,
          batch_size=256,  # 1M tokens per step
          tokenizer="sentencepiece",
          sp_model="tokenizers/c4_32k.model",
      ),
      optim=OptimConfig(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1),
      train=TrainConfig(steps=100_000, eval_every=1000, eval_batches=10, checkpoint_every=500, log_every=20),
  )
