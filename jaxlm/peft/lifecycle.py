"""An adapter's life: merge into the base and back, save and load it alone, several side by side.

  merge(model)               replace every adapted weight by its merged weight: a plain model
                             (exact for LoRA, DoRA and (IA)^3; in place, returns the model)
  merge_adapters / unmerge_adapters(model)
                             fold the adapters into the base weights for fast inference and take
                             them out again (the adapters stay; unmerging is exact up to rounding)
  save_adapter(model, dir, cfg) / load_adapter(model, dir)
                             the adapter alone: `adapter.npz` (its variables by path) and
                             `adapter_config.json` (the PEFT config, the base model config and the
                             shape of every adapted weight; loading refuses a base whose shapes differ)
  load_adapters(model, {name: dir})
                             several adapters of one method resident as a bank; `set_active`
                             picks one for every example, `use_adapter(ids)` one per example
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig, PeftConfig, from_dict, to_dict
from jaxlm.errors import ConfigError
from jaxlm.peft import targets as tg
from jaxlm.peft.modules import IA3, Adapted, AdapterParam, AdapterState, LoRA, new_variable

ADAPTER_FILE = "adapter.npz"
ADAPTER_CONFIG = "adapter_config.json"


def adapted_modules(model: nnx.Module) -> list[tuple[tuple[Any, ...], Adapted]]:
  """(path, module) of every adapted weight, in model order."""
  return [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, Adapted)]


def _like_base(base: nnx.Param, value: jax.Array) -> nnx.Param:
  """A Param holding `value` with the metadata (logical axes, fan-in) of `base`."""
  meta = {k: v for k, v in base.get_metadata().items() if k in ("out_sharding", "fan_in")}
  return nnx.Param(value, eager_sharding=False, **meta)


def _check_mergeable(model: nnx.Module) -> None:
  from jaxlm.peft.wrappers import Wrapper

  wrapped = [tg.path_str(tuple(p)) for p, n in nnx.iter_graph(model) if isinstance(n, Wrapper)]
  if wrapped:
    raise ConfigError(f"cannot merge: {wrapped[0]} is a prompt or bottleneck adapter, which adds computation rather than changing a weight")


def merge(model: nnx.Module, *, adapter: str | None = None) -> nnx.Module:
  """Every adapted weight replaced by its merged weight (in place): the plain base architecture.

  A bank merges one adapter: `adapter` (a name) or the bank's active one.
  """
  _check_mergeable(model)
  for path, mod in adapted_modules(model):
    value = mod.base[...] if mod.merged else mod.dense(_bank_index(mod, adapter))
    tg.set_node(model, path, _like_base(mod.base, value))
  return model


def _bank_index(mod: Adapted, adapter: str | None) -> int | None:
  if not getattr(mod, "bank", 0):
    return None
  names = getattr(mod, "names", ())
  if adapter is not None:
    if adapter not in names:
      raise ConfigError(f"no adapter {adapter!r}; loaded: {', '.join(names) or '(unnamed mixture)'}")
    return names.index(adapter)
  if mod.active is None:
    raise ConfigError("merging a bank of adapters: name the adapter to merge (or set_active one)")
  return mod.active


def merge_adapters(model: nnx.Module, *, adapter: str | None = None) -> nnx.Module:
  """Fold the adapters into the base weights (in place); forward passes then use the base only."""
  for _, mod in adapted_modules(model):
    if mod.merged:
      continue
    i = _bank_index(mod, adapter)
    w = mod.adapted_for_merge()
    cache = getattr(w, "col_scale", None)
    if cache is not None and w.bank:
      cache = jnp.take(cache, i, axis=w.n_stack)
    mod.merge_cache = None if cache is None else AdapterState(cache)
    mod.merged_index = i
    mod.base.set_value(w.dense(i))
    mod.merged = True
  return model


def unmerge_adapters(model: nnx.Module) -> nnx.Module:
  """Undo `merge_adapters` (in place): W = W' / l for (IA)^3; W = W' / (m / ||.||) - s A B for DoRA."""
  for _, mod in adapted_modules(model):
    if not mod.merged:
      continue
    mod.merged = False
    w = mod.adapted_for_merge()
    i = mod.merged_index
    merged = mod.base[...].astype(jnp.float32)
    if isinstance(mod, LoRA):
      delta = w.delta() if not w.bank else jnp.take(w.delta(), i, axis=w.n_stack)
      col = mod.merge_cache
      if col is not None:
        c = col[...]
        merged = merged / c.reshape(c.shape[: w.n_stack] + (1,) * w.n_in + c.shape[w.n_stack :])
      value = merged - delta
    else:
      l = w.scale if not w.bank else jnp.take(w.scale, i, axis=w.n_stack)
      s = w.n_stack
      l = l.reshape(l.shape[:s] + (1,) * w.n_in + l.shape[s:]) if w.side == "out" else l.reshape(l.shape + (1,) * w.n_out)
      value = merged / l
    mod.base.set_value(value.astype(mod.base.dtype))
    mod.merge_cache = None
  return model


def set_active(model: nnx.Module, name: str | None) -> nnx.Module:
  """Use the bank's adapter `name` for every example (None: none chosen; then use_adapter)."""
  for _, mod in adapted_modules(model):
    if getattr(mod, "bank", 0) and getattr(mod, "router", None) is None:
      if name is not None and name not in mod.names:
        raise ConfigError(f"no adapter {name!r}; loaded: {', '.join(mod.names)}")
      mod.active = None if name is None else mod.names.index(name)
  return model


# -- files --------------------------------------------------------------------------------------


def adapter_values(model: nnx.Module) -> dict[str, np.ndarray]:
  """{path: host array} of every adapter weight."""
  return {tg.path_str(tuple(p)): np.asarray(jax.device_get(n.get_value())) for p, n in nnx.iter_graph(model) if isinstance(n, AdapterParam)}


def save_adapter(model: nnx.Module, directory: str | Path, cfg: PeftConfig, *, model_cfg: ModelConfig, inputs: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
  """Write the adapter alone (weights + config + the adapted weights' shapes) into `directory`.

  `inputs`: what the method measured before its adapters existed (a run's peft_inputs.json, e.g.
  ESFT's chosen experts), passed back to `apply` when the adapter is loaded.
  """
  directory = Path(directory)
  values = adapter_values(model)
  if not values:
    raise ConfigError("the model has no adapter weights to save")
  shapes = {tg.path_str(p): list(m.shape) for p, m in adapted_modules(model)}
  meta = {"peft": to_dict(cfg), "model": to_dict(model_cfg), "adapted_shapes": shapes, "peft_inputs": dict(inputs or {}), **(extra or {})}
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (ADAPTER_FILE + ".tmp.npz")
    np.savez(tmp, **values)
    tmp.replace(directory / ADAPTER_FILE)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
  return directory


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config dict, {path: array}) of a saved adapter; ConfigError when it is not one."""
  directory = Path(directory)
  if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_FILE).is_file():
    raise ConfigError(f"{directory} is not a saved adapter (no {ADAPTER_CONFIG} / {ADAPTER_FILE})")
  meta = json.loads((directory / ADAPTER_CONFIG).read_text())
  with np.load(directory / ADAPTER_FILE) as f:
    values = {k: f[k] for k in f.files}
  return meta, values


def check_shapes(model: nnx.Module, meta: dict[str, Any], directory: Path) -> None:
  have = {tg.path_str(p): list(v.shape) for p, v in _weights_by_path(model).items()}
  for path, shape in meta["adapted_shapes"].items():
    if path not in have:
      raise ConfigError(f"adapter {directory} adapts {path}, which this model does not have")
    if have[path] != shape:
      raise ConfigError(f"adapter {directory} was trained on a base whose {path} is {shape}, but this model's is {have[path]}")


def _weights_by_path(model: nnx.Module) -> dict[tuple[Any, ...], Any]:
  """Every linear weight by path, adapted ones under their own path (not .../base)."""
  out = {path: var for _, path, var in tg.linear_weights(model)}
  out.update({path: mod for path, mod in adapted_modules(model)})
  return out


def set_array(var: nnx.Variable, value: np.ndarray, what: str) -> None:
  old = var.get_value()
  if tuple(old.shape) != tuple(value.shape):
    raise ConfigError(f"{what}: shape {tuple(value.shape)} does not fit {tuple(old.shape)}")
  new = jnp.asarray(value, old.dtype)
  if isinstance(old, jax.Array) and hasattr(old, "sharding"):
    new = jax.device_put(new, old.sharding)
  var.set_value(new)


def load_adapter(model: nnx.Module, directory: str | Path, *, seed: int = 0) -> nnx.Module:
  """Apply the saved adapter's method to `model` and load its weights (in place; returns the
  adapted model, a new wrapper for prompt tuning)."""
  from jaxlm.peft import apply

  directory = Path(directory)
  meta, values = read_adapter(directory)
  check_shapes(model, meta, directory)
  cfg = from_dict(PeftConfig, meta["peft"])
  model = apply(model, cfg, seed=seed, **meta.get("peft_inputs", {}))
  for path, value in values.items():
    try:
      var = tg.get_node(model, tuple(int(p) if p.isdigit() else p for p in path.split("/")))
    except (AttributeError, IndexError, KeyError):
      raise ConfigError(f"adapter {directory}: {path} has no place in this model") from None
    set_array(var, value, f"adapter {directory}: {path}")
  return model


def load_adapters(model: nnx.Module, directories: Mapping[str, str | Path]) -> nnx.Module:
  """Several saved LoRA / DoRA / (IA)^3 adapters of one method and targets, resident as banks.

  Ranks may differ (smaller ones are zero-padded: exact) and so may the scales. Choose with
  `set_active(model, name)` or per example with `use_adapter(ids)` (ids index `directories`).
  """
  names = list(directories)
  if len(names) < 1:
    raise ConfigError("load_adapters needs at least one adapter")
  metas, values = zip(*(read_adapter(directories[n]) for n in names))
  methods = {m["peft"]["method"] for m in metas}
  if len(methods) != 1 or not methods <= {"lora", "dora", "ia3"}:
    raise ConfigError(f"a bank needs adapters of one method among lora, dora, ia3; got {sorted(methods)}")
  paths = set(metas[0]["adapted_shapes"])
  for n, m in zip(names, metas):
    check_shapes(model, m, Path(directories[n]))
    if set(m["adapted_shapes"]) != paths:
      raise ConfigError(f"adapter {n!r} adapts other weights than {names[0]!r}; a bank needs the same targets")
  method = methods.pop()
  weights = _weights_by_path(model)
  for path_s in sorted(paths):
    path = tuple(int(p) if p.isdigit() else p for p in path_s.split("/"))
    var = weights[path]
    if isinstance(var, Adapted):
      raise ConfigError(f"{path_s} is adapted already; load the bank into the base model")
    _load_bank(model, path, var, method, names, [v for v in values], path_s, [from_dict(PeftConfig, m["peft"]) for m in metas])
  return model


def _load_bank(model, path, var, method, names, values, path_s, cfgs) -> None:
  from jaxlm.peft.methods import lora_scale

  key = jax.random.key(0)
  n_scan = tg.n_scan(path)
  if method == "ia3":
    side = "in" if path_s.endswith("w_down") else "out"
    mod = IA3(var, side=side, key=key, bank=len(names), names=tuple(names), n_scan=n_scan)
    stacked = np.stack([v[f"{path_s}/scale"] for v in values], axis=mod.n_stack)
    set_array(mod.scale, stacked, f"{path_s}/scale")
  else:
    ranks = [v[f"{path_s}/a"].shape[-1] for v in values]
    r = max(ranks)
    scales = tuple(lora_scale(c, rk, tg.first_match(c.alpha_pattern, path_s, c.alpha)) for c, rk in zip(cfgs, ranks))
    mod = LoRA(var, rank=r, scale=scales, key=key, dora=method == "dora", bank=len(names), names=tuple(names), n_scan=n_scan)
    s = mod.n_stack
    pad_a = lambda a: np.concatenate([a, np.zeros(a.shape[:-1] + (r - a.shape[-1],), a.dtype)], axis=-1)
    pad_b = lambda b: np.concatenate([b, np.zeros(b.shape[:s] + (r - b.shape[s],) + b.shape[s + 1 :], b.dtype)], axis=s)
    set_array(mod.a, np.stack([pad_a(v[f"{path_s}/a"]) for v in values], axis=s), f"{path_s}/a")
    set_array(mod.b, np.stack([pad_b(v[f"{path_s}/b"]) for v in values], axis=s), f"{path_s}/b")
    if method == "dora":
      set_array(mod.magnitude, np.stack([v[f"{path_s}/magnitude"] for v in values], axis=s), f"{path_s}/magnitude")
  tg.set_node(model, path, mod)
