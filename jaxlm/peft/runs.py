"""`jaxlm merge`: merge adapters into their base, or several fine-tuned runs into one model.

  merge_runs([ADAPTER_RUN], out)                  the run's adapters merged into its base:
                                                  a plain run (exact for LoRA, DoRA, (IA)^3)
  merge_runs([RUN_1, ..., RUN_n], out, method=..) the runs' weights (adapters merged first)
                                                  combined with their common base by task
                                                  arithmetic ("linear"), TIES or DARE
                                                  (`jaxlm.peft.merging`)
  merge_runs([LORA_RUN_1, ...], out, method="cat") their LoRA adapters as one adapter of rank
                                                  sum R_i: the exact weighted merge
                                                  sum_i w_i s_i A_i B_i, written as a saved adapter

The base of several runs is `base` (a run directory) or the weights their `init_from` named
(they must agree). The output run (step 0, fresh optimizer state) is what `jaxlm train
EXPERIMENT --run-dir OUT`, `jaxlm eval OUT` and `jaxlm generate OUT` take. Nothing is written
when an input is wrong, and an existing output is never overwritten.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from jaxlm.config import PeftConfig
from jaxlm.errors import ConfigError
from jaxlm.peft import merging
from jaxlm.peft import targets as tg

METHODS = ("linear", "ties", "dare", "dare_ties", "cat")


def _params(model: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def merge_runs(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float = 0.2,
    drop: float = 0.9,
    base: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
  """Write the merged model (or, for "cat", the merged adapter) to `out_dir`; returns a summary."""
  from jaxlm.train.run import INIT_FILE, check_empty_run_dir, load_config, load_for_inference, read_record, write_initial_run

  if method not in METHODS:
    raise ConfigError(f"merge: unknown method {method!r}; known: {', '.join(METHODS)}")
  sources = [Path(s) for s in sources]
  if not sources:
    raise ConfigError("merge: name at least one run")
  weights = list(weights) if weights is not None else [1.0 if method != "cat" else 1.0 / len(sources)] * len(sources)
  if len(weights) != len(sources):
    raise ConfigError(f"merge: {len(weights)} weights for {len(sources)} runs")
  out_dir = Path(out_dir)
  check_empty_run_dir(out_dir)
  exps = [load_config(s) for s in sources]
  for s, e in zip(sources[1:], exps[1:]):
    if e.model != exps[0].model:
      raise ConfigError(f"merge: {s} has another model config than {sources[0]}")
  if method == "cat":
    return _cat(sources, exps, out_dir, weights)

  if len(sources) == 1 and method == "linear" and base is None:
    if exps[0].peft.method == "none":
      raise ConfigError(f"merge: {sources[0]} has no adapters to merge; name several runs to merge them")
    _, model, _, step = load_for_inference(sources[0], merged=True)
    merged, base_desc = _params(model), None
  else:
    inits = {tuple(sorted((read_record(s, INIT_FILE) or {}).items())) for s in sources}
    if base is None:
      if len(inits) != 1 or not next(iter(inits)):
        raise ConfigError("merge: the runs do not share one init_from; name their common base with --base")
      init = dict(next(iter(inits)))
      base, base_step = Path(init["path"]), init.get("step")  # no step: a Hugging Face directory
    else:
      base, base_step = Path(base), None
    _, base_model, _, base_step = load_for_inference(base, step=base_step, merged=True)
    base_tree = _params(base_model)
    tasks = [_params(load_for_inference(s, merged=True)[1]) for s in sources]
    try:
      if method == "linear":
        merged = merging.task_arithmetic(base_tree, tasks, weights)
      elif method == "ties":
        merged = merging.ties(base_tree, tasks, density=density, weights=weights)
      else:
        merged = merging.dare(base_tree, tasks, drop=drop, key=jax.random.key(seed), weights=weights, combine="ties" if method == "dare_ties" else "linear", density=density)
    except ConfigError as e:
      raise ConfigError(f"merge: {e}") from None
    base_desc = f"{base} step {base_step}"
    model = base_model

  exp = dataclasses.replace(exps[0], name=out_dir.name or "merged", peft=PeftConfig(), init_from="")

  def fill(dst: nnx.Module) -> None:
    state = nnx.state(dst, nnx.Param)
    dst_tree = nnx.to_pure_dict(state)
    placed = jax.tree.map(lambda s, d: jax.device_put(np.asarray(s, d.dtype), d.sharding), merged, dst_tree)
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(dst, state)

  write_initial_run(out_dir, exp, fill, tokenizer_from=sources[0])
  return {"out": str(out_dir), "method": method, "sources": [str(s) for s in sources], "weights": weights, "base": base_desc}


def _cat(sources: list[Path], exps: list, out_dir: Path, weights: list[float]) -> dict[str, Any]:
  """The LoRA adapters of `sources` as one adapter: A = [w_i s_i A_i], B = [B_i] along the rank."""
  from jaxlm.peft import adapted_modules, save_adapter
  from jaxlm.train.run import load_for_inference

  if any(e.peft.method != "lora" or e.peft.n_experts for e in exps):
    raise ConfigError("merge --method cat: every run must be a LoRA adapter run (peft.method=lora, no mixture)")
  models = [load_for_inference(s)[1] for s in sources]
  mods = [{tg.path_str(p): m for p, m in adapted_modules(model)} for model in models]
  if any(set(m) != set(mods[0]) for m in mods):
    raise ConfigError("merge --method cat: the adapters must adapt the same weights")
  out = models[0]
  for path, mod in mods[0].items():
    n_stack = mod.n_stack
    parts = [(np.asarray(m[path].a[...]), np.asarray(m[path].b[...]), m[path].scales[0]) for m in mods]
    a, b = merging.lora_cat(parts, weights, n_stack=n_stack, n_in=mod.n_in)
    mod.a = type(mod.a)(jax.numpy.asarray(a), **{k: v for k, v in mod.a.get_metadata().items() if k in ("out_sharding",)}, eager_sharding=False)
    mod.b = type(mod.b)(jax.numpy.asarray(b), **{k: v for k, v in mod.b.get_metadata().items() if k in ("out_sharding",)}, eager_sharding=False)
    mod.scales = (1.0,)
  # Scale 1 everywhere (the s_i are folded into A); each weight's rank is the sum of its ranks.
  ranks = {re.escape(path): int(m.rank) for path, m in mods[0].items()}
  cfg = dataclasses.replace(exps[0].peft, rank_pattern=ranks, alpha_pattern={k: float(r) for k, r in ranks.items()}, rslora=False, dropout=0.0)
  save_adapter(out, out_dir, cfg, model_cfg=exps[0].model, extra={"merged_from": [str(s) for s in sources], "weights": weights})
  return {"out": str(out_dir), "method": "cat", "sources": [str(s) for s in sources], "weights": weights, "base": None}
