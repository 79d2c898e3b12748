"""jaxlm: language models and mixtures of experts in JAX/Flax NNX, from a laptop CPU to TPU pods.

    import jaxlm
    exp = jaxlm.experiments.load("quickstart", ["model.n_layers=2"])
    model = jaxlm.models.Transformer(exp.model, rngs=flax.nnx.Rngs(0))
    logits, aux = model(tokens)

Public modules: `config`, `experiments`, `sharding`, `layers`, `models`, `generate`,
`train` (loop, step, checkpoints), `data` (tokenizers, sources, pipeline).
"""

from jaxlm import experiments, layers, models, sharding
from jaxlm.config import (
    CheckpointConfig,
    DataConfig,
    Experiment,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    SoftMoEConfig,
    TrainConfig,
)
from jaxlm.errors import ConfigError

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "Experiment",
    "MeshConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "SoftMoEConfig",
    "TrainConfig",
    "experiments",
    "layers",
    "models",
    "sharding",
]
