"""Token-level sparse mixture of experts (the `moe` FFN kind), importable on its own.

One concept per file, in the order a token meets them:
  routing.py   router logits (float32) -> assignments; registered routers; jitter; DeepSeek-V3 bias
  layout.py    dispatch and combine: dropless (sorted) and capacity (fixed slots) layouts
  gmm.py       the grouped matmul with backends ragged_dot, capacity_einsum, pallas
  forward.py   route -> dispatch -> experts -> combine for one device's tokens
  gw.py        GW-MoE fine-tuning (Wu et al. 2024): uncertain tokens go to every expert, in training only
  parallel.py  expert parallelism: shard_map over the mesh, all-to-all over `expert`
  losses.py    load-balancing and router z-loss, expert-load / dropped / entropy metrics
  layer.py     the `MoE` nnx module and the pure `moe(params, x, cfg)` function
  plots.py     the expert-load heatmap written at the end of training
  hyper.py     the `hypermoe` FFN kind: HyperMoE (Zhao et al. 2024), the MoE plus a HyperExpert per token
"""

from jaxlm.layers.moe import plots as _plots  # noqa: F401  (registers the expert-load heatmap)
from jaxlm.layers.moe.gmm import GMM, grouped_matmul
from jaxlm.layers.moe.layer import MoE, RouterState, moe
from jaxlm.layers.moe.hyper import HyperMoE, hypermoe  # registers the `hypermoe` FFN kind
from jaxlm.layers.moe.losses import load_balance_loss, router_z_loss
from jaxlm.layers.moe.routing import ROUTERS, Routing, update_bias

__all__ = ["GMM", "ROUTERS", "MoE", "RouterState", "Routing", "grouped_matmul", "load_balance_loss", "moe", "router_z_loss", "update_bias"]
