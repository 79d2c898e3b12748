"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

  save_peft(model, dst, cfg=None)    a jaxlm model's LoRA (or dense DoRA) adapters as a PEFT adapter
  load_peft(model, src)              a PEFT LoRA adapter attached to a jaxlm model (hf.load_model)
  read_peft(src, model)              (jaxlm PeftConfig, {parameter path: Factors}) of a PEFT adapter
  export_adapter_run(run_dir, dst)   a LoRA run's adapters (`jaxlm convert hf-export --adapter`)

PEFT computes y = base(x) + (x A^T) B^T * scaling, scaling = lora_alpha / r (lora_alpha / sqrt(r)
with use_rslora); jaxlm y = x W + s (x A) B. Tensors are named `base_model.model.<HF name>.lora_A.weight`.

Dense weights (`target_modules`, each an nn.Linear): lora_A.weight [r, in], lora_B.weight [out, r].
jaxlm's A [*fan_in, R] and B [R, *fan_out] are these transposed, the fan axes flattened in C order
like the base weights (w_q: A [D, R], B [R, H, K] <-> [R, D], [H*K, R]; w_o: A [H, K, R] <-> [R, H*K]).
DoRA's magnitude [*fan_out] is `lora_magnitude_vector` [out]: PEFT's DoRA is jaxlm's (the norm of
W + s A B per output unit; y = m / norm * (x W + s x A B) + bias).

Routed experts (`target_parameters`: transformers 5's fused experts, PEFT's `ParamWrapper`):
`mlp.experts.gate_up_proj` [E, 2F, D] (gate rows, then up rows) and `mlp.experts.down_proj` [E, D, F],
each [E, out, in]. PEFT keeps one 2-D pair for all E experts, rank r per expert (peft 0.21.2,
`ParamWrapper.get_delta_weight`: `weight_A.reshape(self.num_experts, -1, in)`,
`weight_B.reshape(out, -1, self.num_experts)`, `einsum("o r e, e r i -> e o i")`):
  lora_A.weight [E*r, in]   row e*r + k is expert e's A column k (expert slowest)
  lora_B.weight [out, r*E]  column k*E + e is expert e's B row k (expert fastest)
Reading one as the other scrambles the experts silently. A layer's two parameters get nested
wrappers in the module's parameter order (gate_up_proj first), so the last one targeted is
`mlp.experts.lora_A` and the one before it `mlp.experts.base_layer.lora_A`.

jaxlm adapts w_gate and w_up separately, PEFT gate_up_proj as one: export writes them exactly as
one adapter of rank r_gate + r_up, A = [A_gate | A_up] (concatenated along the rank) and B
block-diagonal ([B_gate, 0; 0, B_up]), at the gate's scaling (the up block of B multiplied by
s_up / s_gate when they differ). Import gives w_gate the rank components whose B has a non-zero
gate block and w_up those with a non-zero up block: exact for any PEFT adapter (a dense B adapts
both with every component), and jaxlm -> PEFT -> jaxlm gives back the adapters it started from.
Adapters on the legacy per-expert modules (`experts.{j}.w1`, transformers 4) import as expert LoRA
(experts left out get zero factors); export always writes the fused parameters.

Refused with a ConfigError (PEFT cannot hold them): DoRA on routed experts, LoRA on MoE routers
(transformers' routers are not nn.Linear), banks of adapters, other methods. PEFT refuses dropout
on expert parameters: an adapter with expert targets is written with lora_dropout 0 (dropout acts
in training only; the adapted model computes the same).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig, PeftConfig
from jaxlm.errors import ConfigError
from jaxlm.interop.hf.checkpoint import _safetensors, commit_dir, fresh_dir, host_array, read_json
from jaxlm.interop.hf.families import Family, family, family_for

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # the fused experts' parameters in module order (their nesting)
# PEFT options that change what the saved tensors mean; jaxlm implements none of them.
UNSUPPORTED = ("layer_replication", "modules_to_save", "trainable_token_indices", "velora_config", "kasa_config", "arrow_config", "monteclora_config", "alora_invocation_tokens", "use_qalora", "use_bdlora", "lora_bias", "fan_in_fan_out")
MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")  # inits that change the base weights too


@dataclasses.dataclass
class Factors:
  """One LoRA adapter of a jaxlm weight: delta = scale * A B (times DoRA's column scale)."""

  a: np.ndarray  # [(E), *fan_in, R]
  b: np.ndarray  # [(E), R, *fan_out]
  scale: float
  magnitude: np.ndarray | None = None  # DoRA [*fan_out]
  source: str = ""  # the jaxlm path it belongs to (scanned layers: units/...)
  alpha: float | None = None  # read from a PEFT config: the lora_alpha that gave `scale`

  @property
  def rank(self) -> int:
    return self.a.shape[-1]


@dataclasses.dataclass
class Layout:
  """Where the linear weights of an unrolled jaxlm model live in the HF model of a family."""

  dense: dict[str, tuple]  # HF nn.Linear name -> jaxlm path
  fused: dict[str, tuple[str, tuple]]  # HF expert parameter -> (gate_up_proj | down_proj, jaxlm paths)
  legacy: dict[str, tuple[tuple, int]]  # HF per-expert nn.Linear -> (jaxlm path, expert)
  dims: dict[tuple, tuple[tuple, tuple, tuple]]  # jaxlm path -> (stack, fan-in, fan-out) sizes

  def place(self, path: tuple) -> tuple[str, str]:
    """(dense | fused, HF name) of a jaxlm path."""
    for name, p in self.dense.items():
      if p == path:
        return "dense", name
    for name, (_, ps) in self.fused.items():
      if path in ps:
        return "fused", name
    raise KeyError(path)


def layout(cfg: ModelConfig, fam: Family) -> Layout:
  """The HF names of every linear weight of a model of `cfg` in family `fam` (transformers 5)."""
  from jaxlm.layers.linear import fan_in_of
  from jaxlm.models import abstract_model
  from jaxlm.peft import targets as tg

  flat = dataclasses.replace(cfg, scan_layers=False)
  model = abstract_model(flat)
  linear = {path: var for _, path, var in tg.linear_weights(model)}
  dims = {}
  for path, var in linear.items():
    shape, fan_in = tuple(var.shape), fan_in_of(var)
    n_out = -fan_in[-1] - 1
    s = len(shape) - len(fan_in) - n_out
    dims[path] = (shape[:s], shape[s : s + len(fan_in)], shape[s + len(fan_in) :])
  out = Layout({}, {}, {}, dims)
  tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for e in fam.entries(flat, tree, fused=True):
    if not all(p in linear for p in e.ours):
      continue
    name = e.hf[0]
    if name.endswith(tuple("." + p for p in EXPERT_PARAMS)):
      out.fused[name] = (name.rsplit(".", 1)[1], e.ours)
    elif len(e.hf) == 1 and name.endswith(".weight"):
      out.dense[name[: -len(".weight")]] = e.ours[0]
  for e in fam.entries(flat, tree, fused=False):
    if e.ours[0] in linear and "experts" in e.ours[0]:
      out.legacy.update({n[: -len(".weight")]: (e.ours[0], j) for j, n in enumerate(e.hf)})
  return out


def pack_experts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """jaxlm expert factors A [E, in, R], B [E, R, out] -> PEFT's lora_A [E*R, in] (expert slowest)
  and lora_B [out, R*E] (expert fastest)."""
  e, n_in, r = a.shape
  return a.transpose(0, 2, 1).reshape(e * r, n_in), b.transpose(2, 1, 0).reshape(b.shape[-1], r * e)


def unpack_experts(lora_a: np.ndarray, lora_b: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's lora_A [E*R, in], lora_B [out, R*E] -> jaxlm's A [E, in, R], B [E, R, out]."""
  r = lora_a.shape[0] // n_experts
  return lora_a.reshape(n_experts, r, -1).transpose(0, 2, 1), lora_b.reshape(lora_b.shape[0], r, n_experts).transpose(2, 1, 0)


def _scaling(alpha: float, rank: int, rslora: bool) -> float:
  """PEFT's scaling (the same expression as jaxlm's lora_scale)."""
  return alpha / (math.sqrt(rank) if rslora else rank)


def _alpha(scale: float, rank: int, rslora: bool) -> float:
  """The lora_alpha whose scaling at `rank` is `scale`."""
  return scale * (math.sqrt(rank) if rslora else rank)


def _most_common(values: list[Any]) -> Any:
  return collections.Counter(values).most_common(1)[0][0]


# -- export ------------------------------------------------------------------------------------


def lora_factors(model: nnx.Module) -> dict[tuple, Factors]:
  """Every LoRA adapter of `model` by its unrolled path (`blocks/i/...`; scanned layers split);
  ConfigError for what PEFT's LoRA format cannot hold (other methods, banks of adapters)."""
  from jaxlm.peft import targets as tg
  from jaxlm.peft.lifecycle import adapted_modules
  from jaxlm.peft.modules import AdapterParam, LoRA

  cfg: ModelConfig = model.cfg
  mods = adapted_modules(model)
  for path, mod in mods:
    if not isinstance(mod, LoRA):
      raise ConfigError(f"PEFT format: {tg.path_str(path)} holds a {type(mod).__name__} adapter; only LoRA and DoRA adapters can be written")
    if mod.bank:
      raise ConfigError(f"PEFT format: {tg.path_str(path)} holds a bank of {mod.bank} adapters (MoLoRA or loaded side by side); a PEFT file holds one")
  for p, n in nnx.iter_graph(model):
    if isinstance(n, AdapterParam) and not any(tuple(p)[: len(q)] == q for q, _ in mods):
      raise ConfigError(f"PEFT format: {tg.path_str(tuple(p))} is not part of a LoRA adapter; only LoRA and DoRA adapters can be written")
  if not mods:
    raise ConfigError("PEFT format: the model has no LoRA adapters")
  out: dict[tuple, Factors] = {}
  for path, mod in mods:
    a, b = host_array(mod.a[...]), host_array(mod.b[...])
    m = None if mod.magnitude is None else host_array(mod.magnitude[...])
    source = tg.path_str(path)
    if path[0] == "units":  # row u of the unit's block j is layer first_k_dense + u * ffn_every + j
      j, rest = path[2], path[3:]
      for u in range(cfg.n_units):
        out[("blocks", cfg.first_k_dense + u * cfg.ffn_every + j) + rest] = Factors(a[u], b[u], mod.scales[0], None if m is None else m[u], source)
    else:
      out[("blocks",) + path[1:] if path[0] == "prefix" else path] = Factors(a, b, mod.scales[0], m, source)
  return out


def _gate_up(got: list[Factors | None], f_dim: int) -> Factors:
  """w_gate's and w_up's adapters as one on gate_up_proj: rank r_gate + r_up, B block-diagonal."""
  used = [(i, f) for i, f in enumerate(got) if f is not None]
  scale = used[0][1].scale
  a = np.concatenate([f.a for _, f in used], axis=-1)
  b = np.zeros((a.shape[0], a.shape[-1], 2 * f_dim), np.float32)
  k = 0
  for i, f in used:
    b[:, k : k + f.rank, i * f_dim : (i + 1) * f_dim] = f.b if f.scale == scale else f.b * (f.scale / scale)
    k += f.rank
  return Factors(a, b, scale, source=used[0][1].source)


def _compact(chosen: list[str], candidates: list[str]) -> list[str]:
  """PEFT target names: a layer-free suffix (`self_attn.q_proj`) where it picks exactly the chosen
  names among the candidates (PEFT matches `name == t or name.endswith("." + t)`), else full names."""
  chosen_set, out = set(chosen), []
  layer_free = lambda n: re.sub(r"^model\.layers\.\d+\.", "", n)
  for suffix in dict.fromkeys(layer_free(n) for n in chosen):
    hits = {c for c in candidates if c == suffix or c.endswith("." + suffix)}
    out += [suffix] if hits <= chosen_set else [n for n in chosen if layer_free(n) == suffix]
  return out


def peft_adapter(model: nnx.Module, *, cfg: PeftConfig | None = None, model_type: str | None = None, base_model: str = "") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(adapter_config.json as a dict, {tensor name: float32 array}) of the model's LoRA adapters.

  `cfg` (the PeftConfig the adapters were made with) keeps its lora_alpha and use_rslora where
  they give each adapter's scale; otherwise alphas are written for use_rslora false.
  """
  from jaxlm.peft import targets as tg
  from jaxlm.peft.lifecycle import adapted_modules
  from jaxlm.peft.methods import lora_scale

  fam = family(model_type) if model_type else family_for(model.cfg)
  lay = layout(model.cfg, fam)
  factors = lora_factors(model)
  rslora = bool(cfg and cfg.rslora)

  def alpha_of(f: Factors) -> float:
    if cfg is not None:
      alpha = tg.first_match(cfg.alpha_pattern, f.source, cfg.alpha)
      if lora_scale(cfg, f.rank, alpha) == f.scale:
        return alpha
    return _alpha(f.scale, f.rank, rslora)

  tensors: dict[str, np.ndarray] = {}
  keys: dict[str, Factors] = {}  # PEFT module or parameter name -> its adapter
  for path, f in factors.items():
    try:
      kind, name = lay.place(path)
    except KeyError:
      raise ConfigError(f"PEFT format: {f.source} has no place in a {fam.model_type} model") from None
    if kind == "fused":
      continue
    if path[-1] == "router":
      raise ConfigError(f"PEFT format: LoRA on the MoE router {f.source} cannot be written (transformers' routers are not nn.Linear modules)")
    tensors[f"{PREFIX}{name}.lora_A.weight"] = f.a.reshape(-1, f.rank).T
    tensors[f"{PREFIX}{name}.lora_B.weight"] = f.b.reshape(f.rank, -1).T
    if f.magnitude is not None:
      tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = f.magnitude.reshape(-1)
    keys[name] = f
  modules = list(keys)
  experts: dict[str, dict[str, Factors]] = collections.defaultdict(dict)  # mlp.experts module -> {parameter: adapter}
  for name, (kind, ours) in lay.fused.items():
    got = [factors.get(p) for p in ours]
    if not any(f is not None for f in got):
      continue
    dora = [f.source for f in got if f is not None and f.magnitude is not None]
    if dora:
      raise ConfigError(f"PEFT format: DoRA on routed experts ({dora[0]}) cannot be written; PEFT's LoRA on expert parameters has no DoRA")
    f = _gate_up(got, lay.dims[ours[0]][2][0]) if kind == "gate_up_proj" else got[0]
    experts[name.rsplit(".", 1)[0]][kind] = f
    keys[name] = f
  for module, by_param in experts.items():
    targeted = [p for p in EXPERT_PARAMS if p in by_param]
    for depth, p in enumerate(reversed(targeted)):  # the last wrapped is the outermost
      lora_a, lora_b = pack_experts(by_param[p].a, by_param[p].b)
      tensors[f"{PREFIX}{module}{'.base_layer' * depth}.lora_A.weight"] = lora_a
      tensors[f"{PREFIX}{module}{'.base_layer' * depth}.lora_B.weight"] = lora_b
  params = [k for k in keys if k not in modules]
  ranks = {k: f.rank for k, f in keys.items()}
  alphas = {k: alpha_of(f) for k, f in keys.items()}
  r0, a0 = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
  dropout = max(float(m.dropout) for _, m in adapted_modules(model))
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "r": r0,
      "lora_alpha": a0,
      "use_rslora": rslora,
      "lora_dropout": 0.0 if params else dropout,
      "target_modules": _compact(modules, list(lay.dense)) if modules else None,
      "target_parameters": _compact(params, list(lay.fused)) if params else None,
      "rank_pattern": {k: r for k, r in ranks.items() if r != r0},
      "alpha_pattern": {k: a for k, a in alphas.items() if a != a0},
      "use_dora": any(f.magnitude is not None for f in keys.values()),
      "bias": "none",
      "fan_in_fan_out": False,
      "lora_bias": False,
      "init_lora_weights": True,
      "inference_mode": True,
  }
  return config, {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def save_peft(model: nnx.Module, dst: Path | str, *, cfg: PeftConfig | None = None, model_type: str | None = None, base_model: str = "") -> Path:
  """Write the LoRA adapters of `model` as a PEFT adapter directory that
  `peft.PeftModel.from_pretrained(hf_model, dst)` loads (see the module docstring for the layout).

  `cfg`: the PeftConfig the adapters were made with (keeps lora_alpha and use_rslora);
  `model_type`: the HF family (default: the first that holds the model); `base_model`: written as
  base_model_name_or_path. `dst` must be new or empty; it never holds half an adapter.
  """
  import jax

  config, tensors = peft_adapter(model, cfg=cfg, model_type=model_type, base_model=base_model)
  _, save_file = _safetensors()
  dst = Path(dst)
  if jax.process_index() != 0:
    return dst
  tmp = fresh_dir(dst)
  save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
  (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  commit_dir(tmp, dst)
  return dst


# -- import ------------------------------------------------------------------------------------


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
  """PEFT's rank_pattern / alpha_pattern lookup: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
  for p, v in (patterns or {}).items():
    if re.match(rf"(.*\.)?({p})$", key):
      return v
  return default


def read_config(src: Path | str) -> dict[str, Any]:
  """adapter_config.json of a PEFT LoRA adapter; ConfigError for anything jaxlm does not reproduce."""
  src = Path(src)
  conf = read_json(src / CONFIG, "a PEFT adapter directory")
  if conf.get("peft_type") != "LORA":
    raise ConfigError(f"{src}: peft_type {conf.get('peft_type')!r} is not LORA; jaxlm reads PEFT LoRA adapters only")
  for k in UNSUPPORTED:
    if conf.get(k) not in (None, False, [], {}):
      raise ConfigError(f"{src}: PEFT option {k}={conf[k]!r} is not supported")
  if conf.get("bias", "none") != "none":
    raise ConfigError(f"{src}: PEFT option bias={conf['bias']!r} (trained base biases) is not supported")
  init = conf.get("init_lora_weights")
  if isinstance(init, str) and init.lower().startswith(MODIFIED_BASE_INITS):
    raise ConfigError(f"{src}: init_lora_weights={init!r} changes the base weights too; convert the adapter to plain LoRA with PEFT first")
  return conf


def _read_tensors(src: Path) -> dict[str, np.ndarray]:
  if not (src / WEIGHTS).is_file():
    other = " (adapter_model.bin: save it with safe_serialization=True)" if (src / "adapter_model.bin").is_file() else ""
    raise ConfigError(f"{src}: no {WEIGHTS}{other}")
  safe_open, _ = _safetensors()
  try:
    with safe_open(str(src / WEIGHTS), "np") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types
    raise ConfigError(f"{src / WEIGHTS}: not a readable safetensors file ({e})") from None


def _modules(src: Path, tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """{module name (as saved, with base_layer): {lora_A | lora_B | magnitude: array}}."""
  out: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  ends = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude"}
  for key, value in tensors.items():
    end = next((e for e in ends if key.endswith(e)), None)
    if not key.startswith(PREFIX) or end is None:
      raise ConfigError(f"{src}: tensor {key} is not a LoRA weight jaxlm reads")
    out[key[len(PREFIX) : -len(end)]][ends[end]] = value.astype(np.float32)
  for module, parts in out.items():
    if {"lora_A", "lora_B"} - set(parts):
      raise ConfigError(f"{src}: {module} has no {({'lora_A', 'lora_B'} - set(parts)).pop()} tensor")
  return out


def _check_shapes(src: Path, name: str, lora_a: np.ndarray, lora_b: np.ndarray, want_a: tuple, want_b: tuple, path: tuple) -> None:
  if lora_a.shape != want_a or lora_b.shape != want_b:
    from jaxlm.peft import targets as tg

    raise ConfigError(f"{src}: {name} has lora_A {list(lora_a.shape)}, lora_B {list(lora_b.shape)}, but this model's {tg.path_str(path)} needs {list(want_a)}, {list(want_b)}")


def read_peft(src: Path | str, model: nnx.Module, *, model_type: str | None = None) -> tuple[PeftConfig, dict[tuple, Factors]]:
  """(the jaxlm PeftConfig, {jaxlm path: Factors}) of the PEFT LoRA adapter at `src` for `model`
  (an unrolled, unadapted jaxlm model). The config's targets name the adapted paths, its ranks and
  alphas give PEFT's scaling; ConfigError for adapters whose shapes differ from the model's."""
  from jaxlm.peft import targets as tg

  src = Path(src)
  conf = read_config(src)
  cfg: ModelConfig = model.cfg
  lay = layout(cfg, family(model_type) if model_type else family_for(cfg))
  rslora = bool(conf.get("use_rslora", False))
  dora = bool(conf.get("use_dora", False))
  r0, a0 = int(conf.get("r", 8)), float(conf.get("lora_alpha", 8))

  def alpha(key: str, rank: int) -> float:
    want = int(_pattern_value(conf.get("rank_pattern"), key, r0))
    if want != rank:
      raise ConfigError(f"{src}: {key} has rank {rank} in {WEIGHTS} but {want} in {CONFIG}")
    return float(_pattern_value(conf.get("alpha_pattern"), key, a0))

  def factors(a: np.ndarray, b: np.ndarray, key: str, rank: int, m: np.ndarray | None = None) -> Factors:
    al = alpha(key, rank)
    return Factors(a, b, _scaling(al, rank, rslora), m, alpha=al)

  def targeted_params(module: str) -> list[str]:
    names = conf.get("target_parameters") or []
    names = [names] if isinstance(names, str) else names
    return [p for p in EXPERT_PARAMS if any(f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t) for t in names)]

  out: dict[tuple, Factors] = {}
  legacy: dict[tuple, dict[int, Factors]] = collections.defaultdict(dict)
  for saved, parts in _modules(src, _read_tensors(src)).items():
    module, depth = saved.replace(".base_layer", ""), saved.count(".base_layer")
    lora_a, lora_b = parts["lora_A"], parts["lora_B"]
    if module in lay.dense and depth == 0:
      path = lay.dense[module]
      if path[-1] == "router":
        raise ConfigError(f"{src}: LoRA on the MoE router {module} is not supported")
      _, fan_in, fan_out = lay.dims[path]
      r = lora_a.shape[0]
      _check_shapes(src, module, lora_a, lora_b, (r, math.prod(fan_in)), (math.prod(fan_out), r), path)
      m = parts.get("magnitude")
      if dora != (m is not None) or (m is not None and m.shape != (math.prod(fan_out),)):
        raise ConfigError(f"{src}: {module}: use_dora={dora} but the magnitude vector is {'missing' if m is None else list(m.shape)}")
      out[path] = factors(lora_a.T.reshape(fan_in + (r,)), lora_b.T.reshape((r,) + fan_out), module, r, None if m is None else m.reshape(fan_out))
    elif any(f"{module}.{p}" in lay.fused for p in EXPERT_PARAMS):
      targeted = targeted_params(module)
      if depth >= len(targeted):
        raise ConfigError(f"{src}: {saved} has no expert parameter among target_parameters={conf.get('target_parameters')!r}")
      if dora or "magnitude" in parts:
        raise ConfigError(f"{src}: DoRA on the expert parameters of {module} is not supported")
      name = f"{module}.{targeted[len(targeted) - 1 - depth]}"
      kind, ours = lay.fused[name]
      (e,), fan_in, fan_out = lay.dims[ours[0]]
      fan_out = (fan_out[0] * len(ours),)  # gate_up_proj: the gate's and the up's outputs
      r = max(lora_a.shape[0] // e, 1)
      _check_shapes(src, name, lora_a, lora_b, (e * r, fan_in[0]), (fan_out[0], r * e), ours[0])
      a, b = unpack_experts(lora_a, lora_b, e)
      whole = factors(a, b, name, r)
      if kind == "down_proj":
        out[ours[0]] = whole
        continue
      f = b.shape[-1] // 2
      halves = [b[..., :f], b[..., f:]]
      keep = [np.flatnonzero(np.abs(h).max(axis=(0, 2)) > 0) for h in halves]
      if not any(len(k) for k in keep):  # an untrained adapter (B = 0): both keep every component
        keep = [np.arange(r)] * 2
      for path, half, k in zip(ours, halves, keep):
        if len(k):  # a part of the rank: the same scale, its alpha for that rank
          out[path] = Factors(a[..., k], half[:, k], whole.scale, alpha=whole.alpha if len(k) == r else None)
    elif module in lay.legacy and depth == 0:
      path, j = lay.legacy[module]
      (e,), fan_in, fan_out = lay.dims[path]
      r = lora_a.shape[0]
      _check_shapes(src, module, lora_a, lora_b, (r, fan_in[0]), (fan_out[0], r), path)
      if dora:
        raise ConfigError(f"{src}: DoRA on routed experts ({module}) is not supported")
      legacy[path][j] = factors(lora_a.T, lora_b.T, module, r)
    else:
      raise ConfigError(f"{src}: {saved} is not a linear module of this model (an adapter of another architecture?)")
  for path, by_expert in legacy.items():
    (e,), fan_in, fan_out = lay.dims[path]
    ranks, scales = {f.rank for f in by_expert.values()}, {f.scale for f in by_expert.values()}
    if len(ranks) > 1 or len(scales) > 1:
      raise ConfigError(f"{src}: the experts of {tg.path_str(path)} have different ranks or scales ({sorted(ranks)}, {sorted(scales)}); jaxlm's expert LoRA has one of each")
    r = ranks.pop()
    a, b = np.zeros((e,) + fan_in + (r,), np.float32), np.zeros((e, r) + fan_out, np.float32)
    for j, f in by_expert.items():
      a[j], b[j] = f.a, f.b
    out[path] = Factors(a, b, scales.pop(), alpha=next(iter(by_expert.values())).alpha)
  if not out:
    raise ConfigError(f"{src}: the adapter has no LoRA weights")
  order = {p: i for i, p in enumerate(lay.dims)}
  out = dict(sorted(out.items(), key=lambda kv: order[kv[0]]))
  for f_path, f in out.items():
    f.source = tg.path_str(f_path)
  return _jaxlm_config(conf, out, rslora, dora), out


def _jaxlm_config(conf: dict[str, Any], factors: dict[tuple, Factors], rslora: bool, dora: bool) -> PeftConfig:
  """A PeftConfig whose `peft.apply` makes these adapters: targets the exact paths; ranks and
  alphas per path where they differ from the most common ones (the adapter's own alphas, derived
  from the scale only for the parts of a split gate_up_proj adapter)."""
  ranks = {f.source: f.rank for f in factors.values()}
  alphas = {f.source: f.alpha if f.alpha is not None else _alpha(f.scale, f.rank, rslora) for f in factors.values()}
  r0, a0 = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
  return PeftConfig(
      method="dora" if dora else "lora",
      targets=tuple(re.escape(p) for p in ranks),
      rank=r0,
      alpha=a0,
      rslora=rslora,
      dropout=float(conf.get("lora_dropout") or 0.0),
      rank_pattern={re.escape(p): r for p, r in ranks.items() if r != r0},
      alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != a0},
  )


def load_peft(model: nnx.Module, src: Path | str, *, model_type: str | None = None, seed: int = 0) -> nnx.Module:
  """Attach the PEFT LoRA adapter at `src` to `model` (in place; returns it): a jaxlm model of the
  adapter's base (`hf.load_model(base_dir)`, unrolled, without adapters) that then computes what
  `peft.PeftModel.from_pretrained(base, src)` computes."""
  from jaxlm import peft
  from jaxlm.peft import targets as tg
  from jaxlm.peft.lifecycle import adapted_modules, set_array

  if adapted_modules(model):
    raise ConfigError("load_peft: the model holds adapters already; load the PEFT adapter into a plain model")
  if model.cfg.scan_layers:
    raise ConfigError("load_peft: load the base model unrolled (model.scan_layers=false)")
  cfg, factors = read_peft(src, model, model_type=model_type)
  model = peft.apply(model, cfg, seed=seed)
  for path, f in factors.items():
    mod = tg.get_node(model, path)
    set_array(mod.a, f.a, f"{src}: {f.source}/a")
    set_array(mod.b, f.b, f"{src}: {f.source}/b")
    if f.magnitude is not None:
      set_array(mod.magnitude, f.magnitude, f"{src}: {f.source}/magnitude")
  return model


# -- runs --------------------------------------------------------------------------------------


def export_adapter_run(run_dir: Path | str, dst: Path | str, *, model_type: str | None = None, step: int | None = None) -> dict[str, Any]:
  """Write a LoRA run's adapters (not merged) as a PEFT adapter directory."""
  from jaxlm.train.run import load_for_inference

  dst = Path(dst)
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    raise ConfigError(f"{dst} already exists and is not empty; choose a new directory")
  exp, model, _, step = load_for_inference(Path(run_dir), step=step)
  if exp.peft.method not in ("lora", "dora"):
    raise ConfigError(f"--adapter: {run_dir} is a peft.method={exp.peft.method!r} run; PEFT's format holds LoRA and DoRA adapters")
  fam = family(model_type) if model_type else family_for(model.cfg)
  save_peft(model, dst, cfg=exp.peft, model_type=fam.model_type, base_model=exp.init_from)
  return {"run_dir": str(run_dir), "step": step, "out": str(dst), "model_type": fam.model_type}
