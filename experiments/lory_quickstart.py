"""Lory on the CPU quickstart: the dense quickstart with every FFN a soft-merged MoE of 8 experts.

Same model shape, steps and tokens as `quickstart` (4 layers of width 256, 200 steps of 16 x 256
tokens); each FFN becomes 8 SwiGLU experts merged per segment of 64 tokens (Lory, Zhong et al.
2024), so the active parameters match the dense run and the total is ~4x. Training documents
are ordered by similarity (In-Context Pretraining) so a sequence holds related documents;
evaluation uses the same validation batches as the dense run. The run ends with
`soft_moe_routing.png`: mean routing weights per source (prose, code) x expert, per layer.

  jaxlm train lory_quickstart            # ~7 minutes on 2 CPU cores
  jaxlm train quickstart                 # the parameter-matched dense baseline
"""

import dataclasses

from jaxlm import experiments
from jaxlm.config import Experiment, SoftMoEConfig, TrainConfig


def experiment() -> Experiment:
  base = experiments.load("quickstart")
  return dataclasses.replace(
      base,
      name="lory_quickstart",
      description="quickstart with Lory soft-merged MoE FFNs (8 experts, segments of 64) and similarity batching (CPU)",
      model=dataclasses.replace(
          base.model,
          ffn="soft_moe",
          soft_moe=SoftMoEConfig(n_experts=8, granularity="segment", segment_len=64, first_segment="paper"),
      ),
      data=dataclasses.replace(base.data, similarity="auto"),  # nearest-neighbour chains of documents
  )


def causal() -> Experiment:
  """Strictly causal: segment 1 uses uniform weights instead of routing on its own mean."""
  exp = experiment()
  return dataclasses.replace(exp, name="lory_quickstart_causal", model=dataclasses.replace(exp.model, soft_moe=dataclasses.replace(exp.model.soft_moe, first_segment="uniform")))


def warmup() -> Experiment:
  """Dense for the first 10% of steps, then the FFN is copied into every expert."""
  exp = experiment()
  return dataclasses.replace(exp, name="lory_quickstart_warmup", model=dataclasses.replace(exp.model, soft_moe=dataclasses.replace(exp.model.soft_moe, dense_warmup=0.1)))


def smoke() -> Experiment:
  """A few steps of a 2-layer model with a dense warm-up: for tests (seconds)."""
  exp = experiment()
  return dataclasses.replace(
      exp,
      name="lory_quickstart_smoke",
      model=dataclasses.replace(
          exp.model, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
          soft_moe=dataclasses.replace(exp.model.soft_moe, n_experts=4, segment_len=16, dense_warmup=0.34),
      ),
      data=dataclasses.replace(exp.data, seq_len=64, batch_size=8),
      train=TrainConfig(steps=6, eval_every=3, eval_batches=1, checkpoint_every=3, log_every=2, sample_tokens=8),
  )
