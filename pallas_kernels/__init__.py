"""Pallas kernels for MoE: routing, expert merging, grouped matmul; each beside its jnp reference.

Each op lives in its own package (`routing`, `merge`, `gmm`) as `reference.py` (the spec in
plain jnp), `tpu.py` (Mosaic TPU kernel), `gpu.py` (Triton kernel) and `ops.py` (the public
op: input checks, `custom_vjp`, and the `implementation=` switch of `dispatch`).
"""

from pallas_kernels.dispatch import IMPLEMENTATIONS
from pallas_kernels.dispatch import Implementation
from pallas_kernels.gmm import grouped_matmul
from pallas_kernels.gmm import grouped_matmul_reference
from pallas_kernels.gmm import transposed_grouped_matmul
from pallas_kernels.gmm import transposed_grouped_matmul_reference
from pallas_kernels.merge import merge_experts
from pallas_kernels.merge import merge_experts_reference
from pallas_kernels.merge import merged_matmul
from pallas_kernels.merge import merged_matmul_reference
from pallas_kernels.routing import Routing
from pallas_kernels.routing import topk_route
from pallas_kernels.routing import topk_route_reference

__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "Routing",
    "grouped_matmul",
    "grouped_matmul_reference",
    "merge_experts",
    "merge_experts_reference",
    "merged_matmul",
    "merged_matmul_reference",
    "topk_route",
    "topk_route_reference",
    "transposed_grouped_matmul",
    "transposed_grouped_matmul_reference",
]
