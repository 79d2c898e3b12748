"""The dense warm-up: train the FFN dense for the first steps, then copy it into every expert.

While the warm-up flag (a non-trainable `SoftMoEState` of every soft-MoE layer) is set, every
segment is routed to expert 0 alone, so the layer is exactly a dense SwiGLU with expert 0's
weights; the router and the other experts get no gradient. After step
`round(dense_warmup x train.steps)` expert 0's weights are copied into every expert and the flag
is cleared. The layer only declares these edits (`scheduled_edits`); the trainer owns the train
state and applies them (`jaxlm.train.hooks`), to the optimizer's moments of the expert weights
too. The train step never changes (the flag is data), so nothing recompiles.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxlm.config import Experiment
from jaxlm.layers.experts import NAMES


def warmup_steps(exp: Experiment) -> int:
  """Optimizer steps trained dense (0: no warm-up)."""
  return round(exp.model.soft_moe.dense_warmup * exp.train.steps)


def copy_expert0(w: jax.Array) -> jax.Array:
  """[..., E, X, Y] -> expert 0 broadcast over E (the expert axis is third from last)."""
  axis = w.ndim - 3
  return jnp.broadcast_to(jax.lax.index_in_dim(w, 0, axis, keepdims=True), w.shape)


def scheduled_edits(exp: Experiment) -> dict[int, dict[tuple[str, ...], Callable[[jax.Array], jax.Array]]]:
  """{step: {path suffix inside the layer: edit}}: the end of the dense warm-up."""
  n = warmup_steps(exp)
  if not 0 < n < exp.train.steps:  # dense_warmup = 0 (n = 0); SoftMergedMoE.validate refuses the rest
    return {}
  edits: dict[tuple[str, ...], Callable[[jax.Array], jax.Array]] = {("experts", name): copy_expert0 for name in NAMES}
  edits[("dense",)] = jnp.zeros_like
  return {n: edits}
