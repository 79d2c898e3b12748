"""The sparse twin of the quickstart: top-2 of 8 experts in every layer, same active parameters.

Everything but the FFN is the quickstart's (data, steps, tokens, optimizer). Each of the 4
layers holds 8 SwiGLU experts of width 384, and each token uses 2 of them: 2 x 384 = the
dense model's 768 hidden units, so both models spend the same FLOPs and active parameters per
token (the MoE holds 4x the FFN parameters). Dropless routing, Switch load-balancing and
router z-losses; the run writes the expert-load heatmap `moe_expert_load.png`.

  .venv/bin/jaxlm train moe_quickstart        # then compare eval_loss with `jaxlm train quickstart`
"""

import dataclasses

from jaxlm.config import Experiment, MoEConfig
from jaxlm.experiments import load


def experiment() -> Experiment:
  dense = load("quickstart")
  return dataclasses.replace(
      dense,
      name="moe_quickstart",
      description="top-2 of 8 experts, same active parameters and tokens as quickstart (CPU)",
      model=dataclasses.replace(
          dense.model,
          ffn="moe",  # what changed: every FFN is a mixture of experts ...
          moe=MoEConfig(
              n_experts=8,
              top_k=2,
              d_ff_expert=dense.model.d_ff // 2,  # ... of half width, two per token: equal active FFN
              mode="dropless",
              load_balance_weight=0.01,
              router_z_weight=0.001,
          ),
      ),
  )


def capacity() -> Experiment:
  """The same with fixed expert capacity (factor 1.25, overflow dropped): faster on CPU."""
  exp = experiment()
  return dataclasses.replace(exp, name="moe_quickstart_capacity", model=dataclasses.replace(exp.model, moe=dataclasses.replace(exp.model.moe, mode="capacity", capacity_factor=1.25)))


def smoke() -> Experiment:
  """A few steps of a 2-layer MoE: for tests and for trying the CLI (seconds)."""
  small = load("quickstart:smoke")
  exp = experiment()
  return dataclasses.replace(
      small,
      name="moe_quickstart_smoke",
      model=dataclasses.replace(small.model, ffn="moe", moe=dataclasses.replace(exp.model.moe, d_ff_expert=small.model.d_ff // 2)),
  )
