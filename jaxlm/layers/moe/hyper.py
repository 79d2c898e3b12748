"""The `hypermoe` FFN kind: HyperMoE, the sparse MoE plus a per-token HyperExpert generated from
the experts the token did not select.

Zhao, Qiu, Wu, Wang, He, Fu 2024, "HyperMoE: Towards Better Mixture of Experts via Transferring
Among Experts" (ACL 2024, arXiv 2402.12656; the authors' code: github.com/Bumble666/Hyper_MoE).

    y = MoE(x) + HyperExpert_x(x)

The sparse MoE (`jaxlm.layers.moe.layer`, unchanged: same routing, experts, losses) sends each
token to its top-k experts. The knowledge of the other E - k experts reaches the token through a
small extra expert whose weights a hypernetwork generates from their embeddings:

  s   = sum_{e not chosen by the token} emb[e]          selection embedding [Q]
  z   = relu(s W_p + b_p)                               embedding MLP [P]
  u   = [relu(z W_u + b_u), 1]                          hypernetwork state [U] (U = hyper_dim + 1)
  HyperExpert_x(x) = relu(x W_down(u) + b_down(u)) W_up(u) + b_up(u)     ReLU adapter D -> A -> D
  W_down(u) = sum_j u_j G_down[:, j, :]  [D, A]         b_down(u) = u G_bdown  [A]
  W_up(u)   = sum_j u_j G_up[j]          [A, D]         b_up(u)   = u G_bup    [D]

The generators G are the hypernetwork's linear output heads (the paper's "weight_down, weight_up,
bias_down, bias_up"); the constant 1 in u carries those heads' own biases. The per-token weights
are never formed: x W_down(u) = sum_j u_j (x G_down[:, j, :]) is one projection of x to [U, A]
contracted with u, and the up projection is (u outer r) G_up, so the HyperExpert costs
4 D U A FLOPs per token (+ the small MLPs) and [B, L, U, A] activations. Every G and W is a
linear weight of the activations (`jaxlm.layers.linear`), so PEFT's all-linear adapts them too.

Letters beyond the legend: Q expert-embedding width, P embedding-MLP width, U hypernetwork state
(hyper_dim units and the constant 1), A HyperExpert bottleneck.

Where the paper leaves a choice open, or where jaxlm departs from it:
  * The selection embedding is the plain sum of the unselected experts' embeddings, as in the
    authors' code (`torch.sum(n_experts_embedding(index_out))`); router probabilities of the
    unselected experts are not used. "Selected" is the router's top-k (before capacity drops;
    GW-MoE's broadcast does not change it).
  * Not shared across layers. The paper shares one hypernetwork across all layers and tells them
    apart by a layer embedding. jaxlm builds every FFN per layer and `scan_layers` stacks their
    parameters, with no module that spans layers, so each HyperMoE layer holds its own
    hypernetwork. A layer embedding would then be a constant input, i.e. a bias of the
    hypernetwork's first layer, so there is none; and the authors' embedding MLP ends in a linear
    layer that feeds the hypernetwork's first linear layer directly (two linear maps that compose
    into one per layer): here z -> u is that one map. Parameter cost: benchmarks/hypermoe.py.
  * Sizes: the authors' code uses 128 for Q, P and U and 64 for A; the defaults here are smaller
    (64, 64, 32, 16) to keep the step within ~1.3x the plain MoE's.
  * Initialisation. The up-projection heads (G_up, G_bup) start at zero, so the HyperExpert adds
    exactly 0 and the layer starts as the plain MoE (the authors initialise every head near zero,
    hyperfan-in x 1e-3). The down heads do not: with all heads zero no gradient would reach any
    of them (the up heads' gradient is the adapter's hidden activation relu(b_down) = 0, the
    down heads' goes through W_up = 0), the LoRA argument for zeroing B only. G_down ~ N(0,
    1 / (D U)) so W_down(u) starts near fan-in scale; the embeddings ~ N(0, 1 / (E - k)) so
    their sum starts near unit variance; W_p, W_u LeCun-normal, biases and G_bdown zero. The
    hypernetwork takes its keys aside (folded from the key stream's state, which it leaves as it
    was), so a HyperMoE model and a plain MoE model of the same seed share every other initial
    weight: HyperMoE starts as exactly that MoE.
  * Padding tokens (segment id 0) get no HyperExpert output, as they get no MoE output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.layers.ffn import FFN
from jaxlm.layers.linear import project
from jaxlm.layers.moe.forward import SELECTED
from jaxlm.layers.moe.layer import MoE, moe
from jaxlm.layers.moe.losses import Stats
from jaxlm.layers.params import normal, param, zeros
from jaxlm.sharding import shard

Aux = dict[str, dict[str, jax.Array]]

# name: (logical axes, fan-in axes or None for a table, elementwise bias)
_LAYOUT: dict[str, tuple[tuple[str | None, ...], tuple[int, ...] | None, bool]] = {
    "expert_emb": ((None, None), None, False),  # [E, Q]
    "w_process": ((None, None), (0,), False),  # [Q, P]
    "b_process": ((None,), None, True),  # [P]
    "w_hyper": ((None, None), (0,), False),  # [P, U - 1]
    "b_hyper": ((None,), None, True),  # [U - 1]
    "gen_down": (("embed", None, None), (0,), False),  # [D, U, A]
    "gen_down_bias": ((None, None), (0,), False),  # [U, A]
    "gen_up": ((None, None, "embed"), (0, 1), False),  # [U, A, D]
    "gen_up_bias": ((None, "embed"), (0,), False),  # [U, D]
}


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  h, d, e = cfg.hypermoe, cfg.d_model, cfg.moe.n_experts
  q, p, u, a = h.expert_dim, h.process_dim, h.hyper_dim + 1, h.adapter_dim
  return {
      "expert_emb": (e, q),
      "w_process": (q, p),
      "b_process": (p,),
      "w_hyper": (p, u - 1),
      "b_hyper": (u - 1,),
      "gen_down": (d, u, a),
      "gen_down_bias": (u, a),
      "gen_up": (u, a, d),
      "gen_up_bias": (u, d),
  }


class HyperExpert(nnx.Module):
  """The expert embeddings and the hypernetwork of one HyperMoE layer; `params()` -> the dict
  `hyper_expert` takes."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    shapes = _shapes(cfg)
    d, u = cfg.d_model, cfg.hypermoe.hyper_dim + 1
    n_unselected = max(cfg.moe.n_experts - cfg.moe.top_k, 1)
    inits = {
        "expert_emb": normal(n_unselected**-0.5),
        "w_process": normal(shapes["w_process"][0] ** -0.5),
        "w_hyper": normal(shapes["w_hyper"][0] ** -0.5),
        "gen_down": normal((d * u) ** -0.5),
    }
    for name, (axes, fan_in, elementwise) in _LAYOUT.items():
      var = param(rngs, inits.get(name, zeros()), shapes[name], axes, cfg.param_dtype, fan_in=fan_in, elementwise=elementwise)
      setattr(self, name, var)

  def params(self) -> dict[str, Any]:
    return {name: getattr(self, name)[...] for name in _LAYOUT}


def hyper_expert(params: dict[str, Any], x_bld: jax.Array, selected_ble: jax.Array, cfg: ModelConfig, *, segment_ids: jax.Array | None = None) -> jax.Array:
  """The HyperExpert's output [B, L, D] for every token, from the experts it did not select.

  params: the dict of `HyperExpert.params()` (arrays or adapted weights); selected_ble [B, L, E]:
  1 where the router chose the expert (the MoE's stats["selected_ble"]); segment_ids: 0 marks
  padding, whose output is 0.
  """
  dt = jnp.dtype(cfg.dtype)
  x_bld = x_bld.astype(dt)
  relu = jax.nn.relu
  s_blq = project("ble,eq->blq", (1.0 - selected_ble).astype(dt), params["expert_emb"])  # sum of the unselected embeddings
  z_blp = relu(project("blq,qp->blp", s_blq, params["w_process"]) + params["b_process"].astype(dt))
  u_blu = relu(project("blp,pu->blu", z_blp, params["w_hyper"]) + params["b_hyper"].astype(dt))
  u_blu = jnp.concatenate([u_blu, jnp.ones(u_blu.shape[:-1] + (1,), dt)], axis=-1)  # the heads' biases
  xg_blua = project("bld,dua->blua", x_bld, params["gen_down"])  # x G_down[:, j, :] for every j
  h_bla = jnp.einsum("blua,blu->bla", xg_blua, u_blu) + project("blu,ua->bla", u_blu, params["gen_down_bias"])
  r_bla = relu(h_bla)
  ur_blua = u_blu[..., :, None] * r_bla[..., None, :]
  y_bld = project("blua,uad->bld", ur_blua, params["gen_up"]) + project("blu,ud->bld", u_blu, params["gen_up_bias"])
  if segment_ids is not None:
    y_bld = jnp.where((segment_ids != 0)[..., None], y_bld, jnp.zeros((), dt))
  return shard(y_bld.astype(dt), "batch", "seq", "embed")


def hypermoe(
    params: dict[str, Any],
    x_bld: jax.Array,
    cfg: ModelConfig,
    *,
    segment_ids: jax.Array | None = None,
    jitter_key: jax.Array | None = None,
) -> tuple[jax.Array, Aux, Stats]:
  """Pure HyperMoE layer: (y [B, L, D], aux, stats). params: the `moe` params plus
  "hyper": the dict of `HyperExpert.params()`."""
  y_bld, aux, stats = moe(params, x_bld, cfg, segment_ids=segment_ids, jitter_key=jitter_key)
  return y_bld + hyper_expert(params["hyper"], x_bld, stats[SELECTED], cfg, segment_ids=segment_ids), aux, stats


def hyper_flops_per_token(cfg: ModelConfig) -> int:
  """Matmul FLOPs of the HyperExpert path per token: selection sum, the two MLP layers, the
  down projection to [U, A] and its contraction with u, the generated biases, the up projection."""
  h, d, e = cfg.hypermoe, cfg.d_model, cfg.moe.n_experts
  q, p, u, a = h.expert_dim, h.process_dim, h.hyper_dim + 1, h.adapter_dim
  return 2 * (e * q + q * p + p * (u - 1) + d * u * a + u * a + u * a + u * a * d + u * d)


def _side_stream(rngs: nnx.Rngs) -> nnx.Rngs:
  """Keys for the hypernetwork that leave `rngs` where it was: every other parameter of a model
  is drawn as in the plain-MoE model of the same seed, so the two start out identical."""
  stream = rngs.params
  return nnx.Rngs(params=jax.random.fold_in(jax.random.fold_in(stream.key[...], stream.count[...]), 0x4879))


@FFN.register("hypermoe")
class HyperMoE(MoE):
  """HyperMoE FFN: the `moe` layer (its parameters, routing and losses) plus `hyper`, the
  HyperExpert generated per token; `__call__(x_bld, segment_ids=None) -> (y_bld, aux)`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.hyper = HyperExpert(cfg, rngs=_side_stream(rngs))

  @staticmethod
  def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return MoE.forward_flops_per_token(cfg, seq_len) + hyper_flops_per_token(cfg)

  @staticmethod
  def inactive_params(cfg: ModelConfig) -> int:
    """The MoE's unselected experts; the hypernetwork serves every token."""
    return MoE.inactive_params(cfg)

  @staticmethod
  def validate(exp: Experiment, mesh_shape: dict[str, int]) -> None:
    MoE.validate(exp, mesh_shape)
    m = exp.model.moe
    if m.top_k >= m.n_experts:
      raise ConfigError(
          f"model.ffn='hypermoe' builds its extra expert from the experts a token did not select: model.moe.top_k ({m.top_k}) must be < model.moe.n_experts ({m.n_experts})"
      )

  def __call__(self, x_bld: jax.Array, *, segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    del positions
    y_bld, aux, stats = self.forward(x_bld, segment_ids=segment_ids)
    with jax.named_scope("hyper_expert"):
      extra = hyper_expert(self.hyper.params(), x_bld, stats[SELECTED], self.cfg, segment_ids=segment_ids)
    return y_bld + extra, aux
