"""A ~100M dense decoder (GPT-2-small scale) on one device or one host: the benchmark model.

14 layers of width 768, 12 heads, SwiGLU width 2048, byte tokens, 1024-token sequences.
`make bench` measures its train-step throughput and compiled-vs-analytical FLOPs.
"""

from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
  return Experiment(
      name="dense_100m",
      description="~100M dense decoder, single host",
      mesh=MeshConfig(fsdp=-1),
      model=ModelConfig(vocab_size=384, d_model=768, n_layers=14, n_heads=12, n_kv_heads=12, d_ff=2048, dtype="bfloat16"),
      data=DataConfig(mixture={"stdlib_prose": 0.5, "stdlib_code": 0.5}, seq_len=1024, batch_size=16),
      optim=OptimConfig(lr=1e-3, warmup_steps=200),
      train=TrainConfig(steps=5000, eval_every=500, checkpoint_every=500),
  )
