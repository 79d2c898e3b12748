"""GW-MoE fine-tuning (Wu et al. 2024, arXiv 2406.12375) against plain fine-tuning of the same MoE.

A small sparse MoE (moe_quickstart shrunk: D 128, 4 layers, top-2 of 8 experts of width 192,
sequences of 128 bytes) is pretrained on English prose (the Python reference manual), then
fine-tuned on Python code, a new domain for its routers, for the same steps on the same batches,
twice: plainly (`:plain`) and with GW-MoE (this experiment): tokens whose router entropy is at
least 0.99 log E go to all 8 experts, the first 8 of each sequence (the released scripts' slot
caps run from 1 to 32). Evaluation is sparse in both: compare their code eval loss.

The threshold: the released scripts use 1.6 and 1.8 nats with 8 experts (0.77 and 0.87 of
log 8), for Switch Transformers pretrained at length. The routers of this briefly pretrained
model are still nearly flat (median H / log E on code 0.975, 0.991, 0.995, 0.997 in layers 1-4):
0.87 would mark almost every token, and the slot cap would then pick the first 8 positions of
every sequence whatever their routing. 0.99 marks about 10%, 50%, 90% and all of the tokens.

  jaxlm train gw_moe_quickstart:base        # runs/gw_moe_quickstart_base, pretraining (~1 min)
  jaxlm train gw_moe_quickstart:plain       # runs/gw_moe_quickstart_plain, plain fine-tuning
  jaxlm train gw_moe_quickstart             # runs/gw_moe_quickstart, GW-MoE fine-tuning

`python -m benchmarks.run gw_moe` runs all three and records the eval losses and step times.
"""

import dataclasses

from jaxlm.config import DataConfig, Experiment, ModelConfig, MoEConfig, OptimConfig, TrainConfig
from jaxlm.experiments import load

BASE_RUN = "runs/gw_moe_quickstart_base"


def base() -> Experiment:
  """Pretraining on prose: the model every fine-tune starts from."""
  moe = load("moe_quickstart")
  return dataclasses.replace(
      moe,
      name="gw_moe_quickstart_base",
      description="a small top-2-of-8 MoE pretrained on prose, the start of the GW-MoE comparison (CPU)",
      model=dataclasses.replace(
          moe.model,
          d_model=128,
          n_layers=4,
          n_heads=4,
          n_kv_heads=2,
          d_ff=384,
          moe=MoEConfig(n_experts=8, top_k=2, d_ff_expert=192, load_balance_weight=0.01, router_z_weight=0.001),
      ),
      data=DataConfig(mixture={"stdlib_prose": 1.0}, seq_len=128, batch_size=16),
      optim=OptimConfig(lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1),
      train=TrainConfig(steps=200, eval_every=100, eval_batches=4, checkpoint_every=200, log_every=20, sample_prompts=()),
  )


def plain() -> Experiment:
  """Plain fine-tuning on code from the pretrained run: the baseline."""
  exp = base()
  return dataclasses.replace(
      exp,
      name="gw_moe_quickstart_plain",
      description="plain fine-tuning of the prose-pretrained MoE on code (CPU)",
      init_from=BASE_RUN,
      data=dataclasses.replace(exp.data, mixture={"stdlib_code": 1.0}),
      optim=OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1),
      train=dataclasses.replace(exp.train, steps=150, eval_every=50, checkpoint_every=150),
  )


def experiment() -> Experiment:
  """GW-MoE fine-tuning: what changed from `plain` is the two GW fields."""
  exp = plain()
  return dataclasses.replace(
      exp,
      name="gw_moe_quickstart",
      description="GW-MoE fine-tuning of the prose-pretrained MoE on code: uncertain tokens to every expert (CPU)",
      model=dataclasses.replace(exp.model, moe=dataclasses.replace(exp.model.moe, gw_threshold=0.99, gw_slots=8)),
  )


def smoke() -> Experiment:
  """A few GW steps of a 2-layer model from scratch: for trying the CLI (seconds)."""
  small = load("moe_quickstart:smoke")
  return dataclasses.replace(
      small,
      name="gw_moe_quickstart_smoke",
      model=dataclasses.replace(small.model, moe=dataclasses.replace(small.model.moe, gw_threshold=0.99, gw_slots=8)),
  )
