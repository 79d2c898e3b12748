"""Top-k routing: router logits [T,E] -> expert ids, weights, group sizes, sort permutation."""

from pallas_kernels.routing.ops import topk_route
from pallas_kernels.routing.reference import MODES
from pallas_kernels.routing.reference import Routing
from pallas_kernels.routing.reference import RoutingMode
from pallas_kernels.routing.reference import topk_route_reference

__all__ = ["MODES", "Routing", "RoutingMode", "topk_route", "topk_route_reference"]
