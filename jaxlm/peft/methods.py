"""The PEFT methods: one registered entry per `peft.method`, each a transform plus a trainability rule.

    method.apply(model, cfg, key, **inputs) -> model   adapt the model (in place; returns it);
                                               `inputs`: what the method measured beforehand
    method.trainable(path, variable) -> bool   which variables the optimizer updates
    method.trainable_for(cfg)                  the same rule when it depends on the config (subset)

`jaxlm.peft.apply` looks the method up in `METHODS`; `jaxlm.peft.trainable` builds the filter
the trainer splits the model with (trainable parameters, frozen parameters, the rest).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
from flax import nnx

from jaxlm.config import PeftConfig
from jaxlm.errors import ConfigError
from jaxlm.layers.linear import fan_in_of
from jaxlm.layers.params import is_elementwise
from jaxlm.peft import targets as tg
from jaxlm.peft.modules import IA3, LoRA, AdapterParam
from jaxlm.registry import Registry
from jaxlm.sharding import logical_axes_of

# Default targets of each method (peft.targets = ()): the papers' choices.
DEFAULT_TARGETS = {
    "lora": ("all-linear",),
    "dora": ("all-linear",),
    # (IA)^3 (Liu et al. 2022): rescale keys, values and the FFN's hidden units (input of w_down).
    "ia3": (r".*attn/w_(k|v)", r".*w_down"),
}


@dataclasses.dataclass(frozen=True)
class Method:
  apply: Callable[..., nnx.Module]  # (model, cfg, key, **inputs) -> model
  trainable: Callable[[tuple[Any, ...], nnx.Variable], bool]
  trainable_for: Callable[[PeftConfig], Callable[[tuple[Any, ...], nnx.Variable], bool]] | None = None  # cfg -> the rule, for rules that read the config


METHODS: Registry = Registry("peft method")


def targets_of(cfg: PeftConfig) -> tuple[str, ...]:
  return cfg.targets or DEFAULT_TARGETS.get(cfg.method, ("all-linear",))


def lora_scale(cfg: PeftConfig, rank: int, alpha: float) -> float:
  """alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
  return alpha / (math.sqrt(rank) if cfg.rslora else rank)


def _keys(key: jax.Array, n: int) -> list[jax.Array]:
  return list(jax.random.split(key, max(n, 1)))


def is_adapter(path: tuple[Any, ...], v: nnx.Variable) -> bool:
  return isinstance(v, AdapterParam)


def is_vector(path: tuple[Any, ...], v: nnx.Variable) -> bool:
  """A base parameter that is a bias or a norm scale of any rank (the attention biases [H, K], the
  OLMoE q/k norm scales [H, K]), or has one named axis and is no linear weight (a router [D, E]
  or Qwen2-MoE's shared-expert gate [D, 1] has one named axis too, but BitFit never trains them)."""
  if not isinstance(v, nnx.Param):
    return False
  return is_elementwise(v) or (sum(a is not None for a in logical_axes_of(v)) == 1 and fan_in_of(v) is None)


# -- LoRA, DoRA, MoLoRA -----------------------------------------------------------------------


def _lora(dora: bool) -> Callable[..., nnx.Module]:
  def apply(model: nnx.Module, cfg: PeftConfig, key: jax.Array, **_: Any) -> nnx.Module:
    chosen = tg.select(model, targets_of(cfg))
    for (name, path, var), k in zip(chosen, _keys(key, len(chosen))):
      rank = tg.first_match(cfg.rank_pattern, name, cfg.rank)
      alpha = tg.first_match(cfg.alpha_pattern, name, cfg.alpha)
      tg.check_rank(name, var, rank)
      n = tg.n_scan(path)
      if cfg.n_experts and tg.n_stack(var) > n:
        raise ConfigError(f"peft.n_experts: a mixture of LoRA experts needs a dense weight, but {name} is a bank of routed experts")
      module = LoRA(
          var,
          rank=rank,
          scale=lora_scale(cfg, rank, alpha),
          key=k,
          dora=dora,
          dropout=cfg.dropout,
          bank=cfg.n_experts,
          router="softmax" if cfg.n_experts else None,
          top_k=cfg.top_k,
          n_scan=n,
      )
      tg.set_node(model, path, module)
    return model

  return apply


METHODS.register("lora", Method(_lora(dora=False), is_adapter))
METHODS.register("dora", Method(_lora(dora=True), is_adapter))


# -- (IA)^3, MoV ------------------------------------------------------------------------------


def _ia3(model: nnx.Module, cfg: PeftConfig, key: jax.Array, **_: Any) -> nnx.Module:
  chosen = tg.select(model, targets_of(cfg))
  for (name, path, var), k in zip(chosen, _keys(key, len(chosen))):
    side = "in" if re.search(r"(^|/)w_down$", name) else "out"  # the FFN's hidden units are w_down's input
    module = IA3(var, side=side, key=k, bank=cfg.n_experts, router="softmax" if cfg.n_experts else None, top_k=cfg.top_k, n_scan=tg.n_scan(path))
    tg.set_node(model, path, module)
  return model


METHODS.register("ia3", Method(_ia3, is_adapter))


# -- no adapters: full fine-tuning, BitFit ----------------------------------------------------

METHODS.register("none", Method(lambda model, cfg, key, **_: model, lambda path, v: isinstance(v, nnx.Param)))
# BitFit (Ben Zaken et al. 2022): train only the bias terms (and, as in its LLM uses, the norm scales).
METHODS.register("bitfit", Method(lambda model, cfg, key, **_: model, is_vector))


# -- subset: the targets' base weights in full --------------------------------------------------
# Full fine-tuning of the linear weights `peft.targets` selects, everything else frozen: with the
# `ffn-keys` / `ffn-values` targets, tuning only the FFN's keys or only its values (Qiu et al.
# 2024, arXiv 2402.12233). No adapters: the weights themselves train, with AdamW moments for them
# only (and can be combined with `optim.migu_ratio`).


def _subset(model: nnx.Module, cfg: PeftConfig, key: jax.Array, **_: Any) -> nnx.Module:
  tg.select(model, cfg.targets)  # a pattern that matches no linear weight is an error
  return model


METHODS.register("subset", Method(_subset, lambda path, v: False, trainable_for=lambda cfg: lambda path, v: tg.is_target(cfg.targets, path, v)))
