"""DeepSeek-V3-shaped MoE layers at small depth, on a TPU v5p-128 slice (64 chips) or 8 x H100.

DeepSeek-V3 (2024) widths: d_model 7168, 256 routed experts of width 2048 with top-8 sigmoid
routing, auxiliary-loss-free balancing (a selection bias updated by 1e-3 * sign(mean - load)
after each step), weights renormalised over the 8 and scaled by 2.5, one always-on shared
expert, the first layers dense (width 18432), 129k vocabulary. Small depth: 4 layers (1 dense +
3 MoE) instead of 61, enough to exercise the sharding and memory of the real layer shapes.
Deviations: grouped-query attention with 128 heads of 128 instead of multi-head latent
attention, no node-limited (grouped) routing, no multi-token prediction.

  jaxlm inspect deepseek_v3_small_v5p --topology v5p:4x4x4
"""

import dataclasses

from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
  return Experiment(
      name="deepseek_v3_small_v5p",
      description="DeepSeek-V3 layer shapes at depth 4 (1 dense + 3 MoE), TPU v5p-128 (64 chips), expert 16 x fsdp 4",
      mesh=MeshConfig(data=1, fsdp=4, expert=16, tensor=1, devices=64),
      model=ModelConfig(
          vocab_size=129_280,
          d_model=7168,
          n_layers=4,
          n_heads=128,
          n_kv_heads=128,
          head_dim=128,
          d_ff=18_432,  # the dense layers
          ffn="moe",
          first_k_dense=1,  # DeepSeek-V3: the first 3 of 61 layers are dense
          tie_embeddings=False,
          dtype="bfloat16",
          remat="full",
          moe=MoEConfig(
              n_experts=256,
              top_k=8,
              d_ff_expert=2048,
              n_shared_experts=1,
              router="sigmoid_bias",
              renormalize=True,
              route_scale=2.5,
              bias_update_rate=0.001,
              load_balance_weight=0.0001,  # V3's small sequence-level balance term, here batch-level
              router_z_weight=0.0,
              mode="dropless",
          ),
      ),
      data=DataConfig(
          mixture={"tfds:c4/en:3.1.0": 1.0},
          seq_len=4096,
          batch_size=64,
          tokenizer="sentencepiece",
          sp_model="tokenizers/c4_128k.model",
      ),
      optim=OptimConfig(lr=2.2e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1),
      train=TrainConfig(steps=10_000, eval_every=500, eval_batches=10, checkpoint_every=500, log_every=20),
  )


def h100x8() -> Experiment:
  """The same layers on one 8 x H100 node: 64 experts per GPU pair, 2 layers (1 dense + 1 MoE)."""
  exp = experiment()
  return dataclasses.replace(
      exp,
      name="deepseek_v3_small_8xh100",
      description="DeepSeek-V3 layer shapes at depth 2 (1 dense + 1 MoE), 8 x H100, expert 4 x fsdp 2",
      mesh=MeshConfig(data=1, fsdp=2, expert=4, tensor=1, devices=8),
      model=dataclasses.replace(exp.model, n_layers=2, attention_impl="cudnn"),  # what changed: mesh, depth
      data=dataclasses.replace(exp.data, batch_size=8),
  )
