"""Expert merging for soft MoE: [S,E] x [E,D,F] -> [S,D,F], and merge fused into a matmul."""

from pallas_kernels.merge.ops import merge_experts
from pallas_kernels.merge.ops import merged_matmul
from pallas_kernels.merge.reference import merge_experts_reference
from pallas_kernels.merge.reference import merged_matmul_reference

__all__ = [
    "merge_experts",
    "merge_experts_reference",
    "merged_matmul",
    "merged_matmul_reference",
]
