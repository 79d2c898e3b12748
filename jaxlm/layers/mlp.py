"""SwiGLU MLP (Shazeer 2020), the `dense` FFN kind: y = (silu(x W_gate) * (x W_up)) W_down."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers.ffn import FFN, Aux, FFNKind
from jaxlm.layers.linear import project
from jaxlm.layers.params import normal, param
from jaxlm.sharding import shard


def swiglu(x_bld: jax.Array, w_gate_df: jax.Array, w_up_df: jax.Array, w_down_fd: jax.Array) -> jax.Array:
  """The pure function over explicit weights (compute dtype = x's dtype)."""
  gate = project("bld,df->blf", x_bld, w_gate_df)
  up = project("bld,df->blf", x_bld, w_up_df)
  h = shard(jax.nn.silu(gate) * up, "batch", "seq", "mlp")
  return project("blf,fd->bld", h, w_down_fd)


@FFN.register("dense")
class MLP(FFNKind):
  """Dense SwiGLU MLP with weights `w_gate [D, F]`, `w_up [D, F]`, `w_down [F, D]`."""

  def __init__(self, cfg: ModelConfig, *, d_ff: int | None = None, rngs: nnx.Rngs):
    d, f = cfg.d_model, d_ff or cfg.d_ff
    self.dtype = jnp.dtype(cfg.dtype)
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # GPT-2 style scaling of residual outputs
    self.w_gate = param(rngs, normal(cfg.init_std), (d, f), ("embed", "mlp"), cfg.param_dtype, fan_in=(0,))
    self.w_up = param(rngs, normal(cfg.init_std), (d, f), ("embed", "mlp"), cfg.param_dtype, fan_in=(0,))
    self.w_down = param(rngs, normal(out_std), (f, d), ("mlp", "embed"), cfg.param_dtype, fan_in=(0,))

  @staticmethod
  def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 2 * 3 * cfg.d_model * cfg.d_ff

  def __call__(self, x_bld: jax.Array, **_: object) -> tuple[jax.Array, Aux]:
    with jax.named_scope("mlp"):
      y = swiglu(x_bld.astype(self.dtype), self.w_gate[...], self.w_up[...], self.w_down[...])
      return shard(y, "batch", "seq", "embed"), {}
