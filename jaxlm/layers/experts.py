"""The expert bank shared by every MoE kind: w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D].

One module creates it (`Experts`), one pytree carries it into the pure functions
(`ExpertWeights`). The sparse MoE runs it through the grouped matmul (`swiglu_grouped`), the soft
MoE merges it in parameter space (`merge`), upcycling copies a dense MLP into it, expert LoRA
adapts its three weights (each leaf may be an adapted weight, see `jaxlm.layers.linear`), and
expert parallelism derives its `shard_map` specs from the logical axes of its leaves (`axes`).

The expert axis is named `expert` for the sparse MoE (split over the expert mesh axis) and left
unnamed for the soft MoE (every expert takes part in every merge; F is split instead).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers import linear
from jaxlm.layers.params import normal, param

NAMES = ("w_gate", "w_up", "w_down")


class ExpertWeights(NamedTuple):
  """Stacked experts (arrays or adapted weights), the layout of DESIGN.md."""

  w_gate: Any  # [E, D, F]
  w_up: Any  # [E, D, F]
  w_down: Any  # [E, F, D]

  @classmethod
  def of(cls, params: dict[str, Any]) -> "ExpertWeights":
    """From a pure parameter dict with keys w_gate, w_up, w_down."""
    return cls(*(params[k] for k in NAMES))

  @staticmethod
  def axes(expert_axis: str | None) -> "ExpertWeights":
    """Logical axes of the three weights."""
    return ExpertWeights((expert_axis, "embed", "mlp"), (expert_axis, "embed", "mlp"), (expert_axis, "mlp", "embed"))

  def leaf_axes(self, expert_axis: str | None) -> "ExpertWeights":
    """Logical axes of every array leaf, in the pytree structure of self (adapters included)."""
    return ExpertWeights(*(linear.logical_axes(w, a) for w, a in zip(self, ExpertWeights.axes(expert_axis))))

  @property
  def n_experts(self) -> int:
    return self.w_gate.shape[0]

  def swiglu_grouped(self, x_md: jax.Array, mm: linear.GroupedMatmul, rows: linear.Rows) -> jax.Array:
    """(silu(x W_gate[e]) * (x W_up[e])) W_down[e] for rows grouped by expert."""
    h_mf = jax.nn.silu(linear.grouped(x_md, self.w_gate, mm, rows)) * linear.grouped(x_md, self.w_up, mm, rows)
    return linear.grouped(h_mf, self.w_down, mm, rows)

  def merge(self, w_ge: jax.Array, merge: Callable[..., jax.Array], *, dense: bool = False) -> "ExpertWeights":
    """One merged expert per group g: sum_e w[g, e] * expert_e (the soft MoE)."""
    return ExpertWeights(
        linear.mix(w_ge, self.w_gate, merge, mlp_axis=1, dense=dense),
        linear.mix(w_ge, self.w_up, merge, mlp_axis=1, dense=dense),
        linear.mix(w_ge, self.w_down, merge, mlp_axis=0, dense=dense),
    )


class Experts(nnx.Module):
  """E SwiGLU experts of width F: `experts.weights()` -> ExpertWeights."""

  def __init__(self, cfg: ModelConfig, n_experts: int, d_ff: int, *, expert_axis: str | None, rngs: nnx.Rngs):
    d, f, e = cfg.d_model, d_ff, n_experts
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # GPT-2 style scaling of residual outputs
    ax = ExpertWeights.axes(expert_axis)
    self.w_gate = param(rngs, normal(cfg.init_std), (e, d, f), ax.w_gate, cfg.param_dtype, fan_in=(1,))
    self.w_up = param(rngs, normal(cfg.init_std), (e, d, f), ax.w_up, cfg.param_dtype, fan_in=(1,))
    self.w_down = param(rngs, normal(out_std), (e, f, d), ax.w_down, cfg.param_dtype, fan_in=(1,))

  def weights(self) -> ExpertWeights:
    return ExpertWeights(self.w_gate[...], self.w_up[...], self.w_down[...])

  def params(self) -> dict[str, Any]:
    return dict(zip(NAMES, self.weights()))
