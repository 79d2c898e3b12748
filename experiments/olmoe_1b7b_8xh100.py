"""An OLMoE-1B-7B-shaped sparse MoE on one 8 x H100 node: 64 fine-grained experts, 8 per GPU.

OLMoE shapes (Muennighoff et al. 2024): 16 layers of width 2048, 16 heads, 64 SwiGLU experts of
width 1024 per layer, top-8 softmax routing without renormalisation, load-balancing loss 0.01
and router z-loss 0.001, 50k vocabulary; 6.9B parameters, 1.3B active per token. Mesh: the 64
experts split over `expert` = 8 GPUs (8 experts each); the batch is split over the same axis.
Dropless routing with the Triton grouped matmul and a ragged all-to-all over NVLink.

  .venv/bin/jaxlm train olmoe_1b7b_8xh100 --run-dir /checkpoints/olmoe
"""

from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
  return Experiment(
      name="olmoe_1b7b_8xh100",
      description="OLMoE-1B-7B-shaped MoE (64 experts, top-8), 8 x H100, expert parallel",
      mesh=MeshConfig(data=1, fsdp=1, expert=8, tensor=1, devices=8),
      model=ModelConfig(
          vocab_size=50_304,
          d_model=2048,
          n_layers=16,
          n_heads=16,
          n_kv_heads=16,
          d_ff=8192,  # unused: every layer is MoE
          ffn="moe",
          tie_embeddings=False,
          rope_theta=10_000.0,
          dtype="bfloat16",
          remat="dots_no_batch",
          scan_layers=True,
          attention_impl="cudnn",
          moe=MoEConfig(
              n_experts=64,
              top_k=8,
              d_ff_expert=1024,  # fine-grained experts
              router="softmax_topk",
              renormalize=False,  # OLMoE keeps the raw top-8 probabilities
              mode="dropless",
              load_balance_weight=0.01,
              router_z_weight=0.001,
          ),
      ),
      data=DataConfig(
          mixture={"tfds:c4/en:3.1.0": 1.0},
          seq_len=4096,
          batch_size=32,
          tokenizer="sentencepiece",
          sp_model="tokenizers/c4_50k.model",
      ),
      optim=OptimConfig(lr=4e-4, warmup_steps=2500, min_lr_ratio=0.1, weight_decay=0.1),
      train=TrainConfig(steps=100_000, eval_every=1000, eval_batches=10, checkpoint_every=1000, log_every=20),
  )
