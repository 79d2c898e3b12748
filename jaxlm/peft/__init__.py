"""Parameter-efficient fine-tuning and model merging: a transform plus a trainability filter.

    model = jaxlm.peft.apply(model, PeftConfig(method="lora", rank=8))   # adapters attached
    graphdef, trainable, frozen, rest = nnx.split(model, jaxlm.peft.trainable(cfg), nnx.Param, ...)

`apply` replaces each targeted weight by a module holding the frozen weight and its adapter
(`jaxlm.peft.modules`); layers keep reading `self.w[...]` and get an adapted weight that applies
itself through `jaxlm.layers.linear` (unmerged: x W + s (x A) B, so W's gradient is never
formed). `trainable(cfg)` selects the adapter variables (`AdapterParam`) the optimizer updates.

Methods (`peft.method`): lora, dora, ia3, bitfit, prompt, bottleneck, esft, arrow, phatgoose,
phatgoose_gates, subset (see `methods.py`); mixtures of adapters with `peft.n_experts` (MoLoRA, MoV,
SMEAR-merged bottlenecks). Lifecycle (`lifecycle.py`): merge / unmerge, adapter-only save and
load, banks of adapters chosen per example (`use_adapter`). Model merging: `merging.py`.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxlm.config import PeftConfig
from jaxlm.layers.linear import use_adapter
from jaxlm.peft import merging
from jaxlm.peft.lifecycle import (
    adapted_modules,
    load_adapter,
    load_adapters,
    merge,
    merge_adapters,
    read_adapter,
    save_adapter,
    set_active,
    unmerge_adapters,
)
from jaxlm.peft.methods import METHODS
from jaxlm.peft import esft, library, wrappers  # noqa: F401  (register their methods)
from jaxlm.peft.modules import Adapted, AdapterParam, AdapterState
from jaxlm.peft import targets as _targets


def apply(model: nnx.Module, cfg: PeftConfig, *, seed: int = 0, **inputs: Any) -> nnx.Module:
  """Attach `cfg`'s adapters to `model` (in place; returns it). Works on abstract models
  (`jax.eval_shape`) and on sharded ones (adapters take their weight's sharding)."""
  return METHODS.get(cfg.method).apply(model, cfg, jax.random.fold_in(jax.random.key(seed), 0x5EF7), **inputs)



def trainable(cfg: PeftConfig):
  """The nnx filter of the variables the optimizer updates under `cfg` (everything else is frozen)."""
  method = METHODS.get(cfg.method)
  rule = method.trainable_for(cfg) if method.trainable_for else method.trainable
  also = [_targets.compile_pattern(p) for p in cfg.train_also]

  def is_trainable(path: tuple[Any, ...], v: Any) -> bool:
    if rule(path, v):
      return True
    return bool(also) and isinstance(v, nnx.Param) and any(rx.fullmatch(_targets.path_str(path)) for rx in also)

  return is_trainable


def trainable_fraction(model: nnx.Module, cfg: PeftConfig) -> tuple[int, int]:
  """(trainable parameters, all parameters, adapters included)."""
  is_t = trainable(cfg)
  n_t = n_all = 0
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Param, AdapterParam)):
      n = int(node.size)
      n_all += n
      n_t += n if is_t(tuple(path), node) else 0
  return n_t, n_all


__all__ = [
    "Adapted",
    "AdapterParam",
    "AdapterState",
    "METHODS",
    "adapted_modules",
    "apply",
    "load_adapter",
    "load_adapters",
    "merge",
    "merge_adapters",
    "merging",
    "read_adapter",
    "save_adapter",
    "set_active",
    "trainable",
    "trainable_fraction",
    "unmerge_adapters",
    "use_adapter",
]
