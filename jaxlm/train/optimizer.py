"""AdamW with linear warmup + cosine decay, global-norm clipping, no decay on norms and biases;
with `optim.migu_ratio`, restricted to the coordinates MIGU selects (`jaxlm.train.migu`)."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from jaxlm.config import OptimConfig
from jaxlm.layers.params import is_elementwise
from jaxlm.sharding import logical_axes_of
from jaxlm.train import migu


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  decay = cfg.decay_steps or total_steps
  warmup = min(cfg.warmup_steps, max(decay - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(decay, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio
  )


def decay_mask(params: Any) -> Any:
  """Weight decay only on matrices: norm scales and biases are left alone.

  A matrix is a variable with at least two named logical axes that is not a bias or norm scale
  (`param(..., elementwise=True)`: the attention biases [H, K] and OLMoE's q/k norm scales
  [H, K] are not matrices); the unnamed leading axis that scanned layers add does not count (a
  stacked norm scale [layers, D] is still a vector).
  """

  def one(v):
    if isinstance(v, nnx.Variable):
      return v.replace(not is_elementwise(v) and sum(a is not None for a in logical_axes_of(v)) >= 2)
    return getattr(v, "ndim", 0) >= 2

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(cfg, total_steps)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if migu.enabled(cfg):  # `update` then takes the step's output magnitudes (`migu_stats=`)
    tx = migu.masked(tx, cfg.migu_ratio)
  return tx, lr
