"""Layers: NNX modules with `__init__(cfg, *, rngs)` plus pure functions over explicit weights.

Importing this package registers every FFN kind in `jaxlm.layers.ffn.FFN`.
"""

from jaxlm.layers.attention import Attention, KVCache, attention
from jaxlm.layers.embed import Embed
from jaxlm.layers.ffn import FFN
from jaxlm.layers.mlp import MLP, swiglu
from jaxlm.layers.moe import MoE, moe  # registers the `moe` FFN kind
from jaxlm.layers.norms import RMSNorm, rms_norm
from jaxlm.layers.rope import apply_rope
from jaxlm.layers.soft_moe import SoftMergedMoE  # registers the `soft_moe` FFN kind (pure function: jaxlm.layers.soft_moe.soft_moe)

__all__ = ["FFN", "MLP", "Attention", "Embed", "KVCache", "RMSNorm", "apply_rope", "attention", "rms_norm", "swiglu"]
