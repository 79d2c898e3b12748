"""HyperMoE against the plain sparse MoE it extends, on the same data and steps (CPU, ~1 minute each).

A small MoE decoder (D 128, 2 layers, top-2 of 8 SwiGLU experts of width 256 in both) on the
stdlib prose+code corpus, 200 steps of 16 x 128 tokens. `experiment()` adds HyperMoE
(Zhao et al. 2024, arXiv 2402.12656; jaxlm.layers.moe.hyper): per token, a hypernetwork turns the
embeddings of the 6 experts the token did not select into a small ReLU adapter (D -> 16 -> D)
added to the MoE output. `moe()` is the baseline: the same model without it (and, the seed being
the same, with the same initial weights: HyperMoE starts as exactly this model). `matched()` is a
control with wider experts that spends HyperMoE's active parameters and FLOPs per token.
Everything else (seed, data order, optimizer, schedule) is shared: eval losses compare at equal
steps.

  .venv/bin/jaxlm train hypermoe_quickstart:moe   # baseline
  .venv/bin/jaxlm train hypermoe_quickstart       # HyperMoE; compare eval_loss
  .venv/bin/jaxlm train hypermoe_quickstart:matched   # equal active compute, no HyperExpert
  .venv/bin/python -m benchmarks.run hypermoe     # both, plus the step-time ratio
"""

import dataclasses

from jaxlm.config import CheckpointConfig, DataConfig, Experiment, HyperMoEConfig, MeshConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig


def moe() -> Experiment:
  """The baseline: the plain top-2-of-8 MoE."""
  return Experiment(
      name="hypermoe_quickstart_moe",
      description="small top-2-of-8 MoE, the HyperMoE baseline (CPU)",
      mesh=MeshConfig(fsdp=-1),
      model=ModelConfig(
          vocab_size=384,  # byte tokens
          d_model=128,
          n_layers=2,
          n_heads=4,
          n_kv_heads=2,
          d_ff=512,
          ffn="moe",
          moe=MoEConfig(n_experts=8, top_k=2, d_ff_expert=256),
          dtype="float32",  # CPUs have no fast bf16 matmuls
      ),
      data=DataConfig(mixture={"stdlib_prose": 0.5, "stdlib_code": 0.5}, seq_len=128, batch_size=16),
      optim=OptimConfig(lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1),
      train=TrainConfig(steps=200, eval_every=100, eval_batches=8, log_every=20, sample_tokens=32),
      checkpoint=CheckpointConfig(enabled=False),  # a comparison run: nothing to resume
  )


def experiment() -> Experiment:
  """HyperMoE: the baseline plus a HyperExpert per token."""
  base = moe()
  return dataclasses.replace(
      base,
      name="hypermoe_quickstart",
      description="HyperMoE on the small top-2-of-8 MoE: same data and steps as :moe (CPU)",
      model=dataclasses.replace(
          base.model,
          ffn="hypermoe",  # what changed: the MoE plus the HyperExpert, sized for <= 1.3x the step time
          hypermoe=HyperMoEConfig(expert_dim=32, process_dim=32, hyper_dim=16, adapter_dim=16),
      ),
  )


def matched() -> Experiment:
  """A control: the plain MoE with experts widened from 256 to 352, which matches HyperMoE's
  active parameters and FLOPs per token (+~37% in the FFN): is the gain HyperMoE's or any extra
  compute's?"""
  base = moe()
  return dataclasses.replace(
      base,
      name="hypermoe_quickstart_matched",
      description="the HyperMoE baseline with wider experts: HyperMoE's active parameters and FLOPs (CPU)",
      model=dataclasses.replace(base.model, moe=dataclasses.replace(base.model.moe, d_ff_expert=352)),  # what changed
  )
