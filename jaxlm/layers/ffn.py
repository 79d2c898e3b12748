"""The FFN registry and protocol: every kind of feed-forward block a decoder layer can hold.

An FFN kind is a registered subclass of `FFNKind` (an `nnx.Module`) with
`__init__(cfg: ModelConfig, *, rngs)` and
`__call__(x_bld, *, segment_ids=None, positions=None) -> (y_bld, aux)`. `aux` is a dict with
optional entries `"losses"` ({name: scalar, already weighted}; the model sums them over layers
and the trainer adds them to the loss) and `"metrics"` ({name: array}; the model stacks them
over the layers of that kind). The class methods below have defaults; a kind overrides those
it needs:

  forward_flops_per_token(cfg, seq_len)  matmul FLOPs per token (MFU, the FLOPs benchmark)
  inactive_params(cfg)                   parameters idle for a given token (active count)
  validate(exp, mesh_shape)              raise ConfigError for settings that depend on the mesh
                                         (called by the trainer before anything is written)
  scheduled_edits(exp)                   {step: {path suffix: fn(array) -> array}}: changes of
                                         the layer's variables after a given step; the trainer
                                         applies each fn to the variable (and to a parameter's
                                         optimizer moments) once (the soft MoE's dense warm-up)
  init_decode_state(cfg, batch, max_len) + decode(x_bld, state, *, positions, segment_ids)
                                         per-sequence state while generating (the model stores
                                         it next to each block's KV cache); None: stateless

Kinds: `dense` (jaxlm.layers.mlp), `moe` (jaxlm.layers.moe), `soft_moe` (jaxlm.layers.soft_moe),
`hypermoe` (jaxlm.layers.moe.hyper: the `moe` kind plus a generated HyperExpert per token).
Adapters may wrap a block's FFN (`jaxlm.peft`): a wrapper is an FFNKind too.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from jaxlm.registry import Registry

FFN: Registry = Registry("ffn kind")

Aux = dict[str, dict[str, jax.Array]]


class FFNKind(nnx.Module):
  """Base class of the FFN kinds: the protocol, with defaults."""

  init_decode_state: Callable[..., Any] | None = None  # kinds with decoding state define it and `decode`

  @staticmethod
  def forward_flops_per_token(cfg: Any, seq_len: int) -> float:
    raise NotImplementedError

  @staticmethod
  def inactive_params(cfg: Any) -> int:
    return 0

  @staticmethod
  def validate(exp: Any, mesh_shape: dict[str, int]) -> None:
    return None

  @staticmethod
  def scheduled_edits(exp: Any) -> dict[int, dict[tuple[str, ...], Callable[[jax.Array], jax.Array]]]:
    return {}

  def __call__(self, x_bld: jax.Array, *, segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    raise NotImplementedError
