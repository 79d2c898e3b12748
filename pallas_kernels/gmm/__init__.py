"""Grouped matmul for sparse MoE: [M,K] x [E,K,N] by row groups, and its weight gradient."""

from pallas_kernels.gmm.ops import grouped_matmul
from pallas_kernels.gmm.ops import transposed_grouped_matmul
from pallas_kernels.gmm.reference import grouped_matmul_reference
from pallas_kernels.gmm.reference import transposed_grouped_matmul_reference

__all__ = [
    "grouped_matmul",
    "grouped_matmul_reference",
    "transposed_grouped_matmul",
    "transposed_grouped_matmul_reference",
]
