"""EMoE against sparse upcycling, from one short dense run (CPU, a few minutes in all).

A small dense model (4 layers of width 128, d_ff 512, sequences of 128 bytes) is trained for 120
steps on the prose+code corpus (`:dense`). Its last two FFNs (EMoE's LLaMA recipe splits FFNs in
the last half or quarter of the layers) are turned into 8 experts two ways, and each model is
fine-tuned on code for the same 80 steps, data order and optimizer:

  experiment()       EMoE (Qiu et al. 2023, arXiv 2310.10908): each FFN split by clustering its
                     keys into 8 experts of 64 hidden units, routed by their mean keys,
                     recomputed from the experts every step (`router_from_keys`); top-2 of 8
                     (the paper's top-k = E/4 for full fine-tuning), outputs summed with weight 1
                     (`hard_topk`), no load-balancing loss. No new parameters; 1/4 of those FFNs
                     per token.
  :upcycled          sparse upcycling (Komatsuzaki et al. 2022): 8 copies of the FFN, a fresh
                     softmax router, top-1 (the paper's GMoE baseline is top-1 of FFN copies),
                     Switch balance and z-losses. 8x those FFNs' parameters, the dense model's
                     active ones.
  :dense_continued   the dense model fine-tuned the same way (the third line).

  jaxlm train emoe_quickstart:dense                    # runs/emoe_quickstart_dense
  jaxlm convert emoe runs/emoe_quickstart_dense emoe_quickstart --run-dir runs/emoe_quickstart
  jaxlm train emoe_quickstart --run-dir runs/emoe_quickstart
  jaxlm convert upcycle runs/emoe_quickstart_dense emoe_quickstart:upcycled --run-dir runs/emoe_quickstart_upcycled
  jaxlm train emoe_quickstart:upcycled --run-dir runs/emoe_quickstart_upcycled
  jaxlm train emoe_quickstart:dense_continued          # init_from runs/emoe_quickstart_dense

`python -m benchmarks.run emoe` runs all of this and records the eval losses and step times.
"""

import dataclasses

from jaxlm import experiments
from jaxlm.config import DataConfig, Experiment, ModelConfig, MoEConfig, OptimConfig, TrainConfig

DENSE_RUN = "runs/emoe_quickstart_dense"


def dense() -> Experiment:
  """The source: a small dense decoder, 120 steps on prose and code."""
  base = experiments.load("quickstart")
  return dataclasses.replace(
      base,
      name="emoe_quickstart_dense",
      description="small dense decoder, the source of the EMoE / upcycling comparison (CPU)",
      model=ModelConfig(vocab_size=384, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512, tie_embeddings=True, dtype="float32"),
      data=DataConfig(mixture={"stdlib_prose": 0.5, "stdlib_code": 0.5}, seq_len=128, batch_size=16),
      train=TrainConfig(steps=120, eval_every=60, eval_batches=4, checkpoint_every=60, log_every=20, sample_tokens=0),
  )


def _finetune(name: str, description: str, model: ModelConfig) -> Experiment:
  """80 steps on code from the dense run's weights: the same for all three models."""
  src = dense()
  return dataclasses.replace(
      src,
      name=name,
      description=description,
      model=model,
      data=dataclasses.replace(src.data, mixture={"stdlib_code": 1.0}),
      optim=OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1),
      train=TrainConfig(steps=80, eval_every=40, eval_batches=4, checkpoint_every=80, log_every=10, sample_tokens=0),
  )


def experiment() -> Experiment:
  """EMoE: the last two FFNs split into 8 key clusters, top-2 by mean key, weight 1 each."""
  m = dense().model
  model = dataclasses.replace(
      m,
      ffn="moe",
      first_k_dense=m.n_layers // 2,  # what changed: the last half of the FFNs are EMoE layers ...
      moe=MoEConfig(
          n_experts=8,
          top_k=2,  # ... top-2 of 8: the paper's E/4
          d_ff_expert=m.d_ff // 8,  # the experts partition the dense FFN
          router="hard_topk",
          router_from_keys=True,
          load_balance_weight=0.0,
          router_z_weight=0.0,
      ),
  )
  return _finetune("emoe_quickstart", "EMoE from the dense run (top-2 of 8 key clusters), fine-tuned on code (CPU)", model)


def upcycled() -> Experiment:
  """Sparse upcycling of the same layers: 8 copies of the FFN, fresh top-1 softmax router."""
  m = dense().model
  moe = MoEConfig(n_experts=8, top_k=1, d_ff_expert=m.d_ff, router="softmax_topk", load_balance_weight=0.01, router_z_weight=0.001)
  model = dataclasses.replace(m, ffn="moe", first_k_dense=m.n_layers // 2, moe=moe)
  return _finetune("emoe_quickstart_upcycled", "upcycled MoE from the dense run (top-1 of 8 copies), fine-tuned on code (CPU)", model)


def dense_continued() -> Experiment:
  """The dense model fine-tuned the same way."""
  exp = _finetune("emoe_quickstart_dense_continued", "the dense run fine-tuned on code (CPU)", dense().model)
  return dataclasses.replace(exp, init_from=DENSE_RUN)


def smoke() -> Experiment:
  """EMoE of a quickstart:smoke run (2 layers, d_ff 128): 4 experts of 32, top-2; for tests."""
  small = experiments.load("quickstart:smoke")
  exp = experiment()
  moe = dataclasses.replace(exp.model.moe, n_experts=4, d_ff_expert=small.model.d_ff // 4)
  return dataclasses.replace(small, name="emoe_quickstart_smoke", model=dataclasses.replace(small.model, ffn="moe", moe=moe))
