"""Token embedding, also usable as the (tied) output head."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.params import normal, param
from jaxlm.sharding import shard


class Embed(nnx.Module):
  """Embedding table `w_vd [V, D]`; `attend` maps hidden states back to vocabulary logits."""

  def __init__(self, vocab_size: int, d_model: int, *, init_std: float = 1.0, dtype: str = "bfloat16", param_dtype: str = "float32", rngs: nnx.Rngs):
    self.dtype = jnp.dtype(dtype)
    self.w_vd = param(rngs, normal(init_std), (vocab_size, d_model), ("vocab", "embed"), param_dtype)

  def __call__(self, tokens_bl: jax.Array) -> jax.Array:
    # Gather from a table whose vocab axis is not split (a gather over a sharded vocab makes
    # XLA replicate everything); the embed axis stays sharded like the parameter.
    w_vd = shard(self.w_vd[...], None, "embed")
    x_bld = jnp.take(w_vd, tokens_bl, axis=0).astype(self.dtype)
    return shard(x_bld, "batch", "seq", "embed")

  def attend(self, x_bld: jax.Array) -> jax.Array:
    """Logits [B, L, V] = x @ w_vd^T, accumulated in float32."""
    return self.attend_fn()(x_bld)

  def attend_fn(self) -> Callable[[jax.Array], jax.Array]:
    """`attend` as a pure function of x_bld, the table read once (callable inside jax transforms)."""
    w_vd = self.w_vd[...].astype(self.dtype)

    def attend(x_bld: jax.Array) -> jax.Array:
      logits = jnp.einsum("bld,vd->blv", x_bld, w_vd, preferred_element_type=jnp.float32)
      return shard(logits, "batch", "seq", "vocab")

    return attend
