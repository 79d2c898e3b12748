"""Soft-merged mixture of experts (the `soft_moe` FFN kind): SMEAR and Lory.

One concept per file, in the order a token meets them:
  routing.py  routing groups (segments that never cross documents), granularities
              (segment: Lory; sequence: SMEAR), first-segment rules, expert dropout, metrics
  merge.py    merge implementations (einsum, pallas) and the memory-conscious merged SwiGLU
  layer.py    the `SoftMergedMoE` nnx module, the pure `soft_moe(params, x, cfg)` function and
              generation (routing on the prompt, or re-routing every T positions)
  warmup.py   the dense warm-up and the copy of the FFN into every expert
  plots.py    the per-source routing heatmap written at the end of training
"""

from jaxlm.layers.soft_moe import plots as _plots  # noqa: F401  (registers the routing heatmap)
from jaxlm.layers.soft_moe.layer import DecodeState, SoftMergedMoE, SoftMoEState, soft_moe, soft_moe_decode
from jaxlm.layers.soft_moe.merge import MERGE, ExpertWeights, apply_merged
from jaxlm.layers.soft_moe.routing import FIRST_SEGMENT, GRANULARITY, Layout, chunk_layout, packed_layout

__all__ = [
    "FIRST_SEGMENT",
    "GRANULARITY",
    "MERGE",
    "DecodeState",
    "ExpertWeights",
    "Layout",
    "SoftMergedMoE",
    "SoftMoEState",
    "apply_merged",
    "chunk_layout",
    "packed_layout",
    "soft_moe",
    "soft_moe_decode",
]
