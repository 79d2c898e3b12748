"""Hugging Face interop: read and write HF model directories (config.json + safetensors).

  cfg, params = hf.load(path)              ModelConfig and a pure dict of parameters
  model = hf.load_model(path, mesh=None)   a ready jaxlm Transformer, loaded onto the mesh
  hf.save(model, dst)                      config.json + safetensors that transformers loads
  hf.model_config(path, like=cfg)          the architecture of an HF model; run settings from `like`

Families: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, olmoe (`families.py`).
Experts are read in both the legacy per-expert names and transformers 5's fused names, and written
in the legacy names unless `fused_experts=True`. Only numpy and safetensors are needed (the `hf`
extra); torch and transformers are only used by the tests that compare against them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlm import sharding
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.interop.hf.checkpoint import CONFIG, Reader, check_coverage, commit_dir, fresh_dir, get_path, is_hf_dir, read_config, read_params, write_params
from jaxlm.interop.hf.families import FAMILIES, Family, family, family_for

__all__ = ["FAMILIES", "check_dir", "experiment", "is_hf_dir", "load", "load_model", "model_config", "read_config", "resolve_experiment", "save", "TOKENIZER_FILES"]

# Settings of a run rather than of the architecture: an experiment keeps its own when it starts
# from an HF model (`init_from`), everything else comes from the HF config.
RUN_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl", "init_std")
MOE_RUN_FIELDS = ("mode", "capacity_factor", "gmm_backend", "block_rows", "all_to_all", "load_balance_weight", "router_z_weight", "jitter", "bias_update_rate")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.model")


def model_config(path: Path | str, *, like: ModelConfig | None = None, **overrides: Any) -> ModelConfig:
  """The ModelConfig of the HF model at `path`; `like`'s run settings (RUN_FIELDS, MOE_RUN_FIELDS) kept."""
  hf = read_config(path)
  fam = family(hf["model_type"])
  if like is not None:
    cfg = fam.model_config(hf)
    moe = dataclasses.replace(cfg.moe, **{f: getattr(like.moe, f) for f in MOE_RUN_FIELDS}) if cfg.ffn == "moe" else cfg.moe
    overrides = {**{f: getattr(like, f) for f in RUN_FIELDS}, "moe": moe, **overrides}
  return fam.model_config(hf, **overrides)


def resolve_experiment(exp: Experiment) -> Experiment:
  """An experiment whose `init_from` names an HF directory gets that model's architecture (its
  run settings kept), and its tokenizer when `data.tokenizer="hf"` names no path."""
  if not exp.init_from or not is_hf_dir(exp.init_from):
    return exp
  data = exp.data
  if data.tokenizer == "hf" and not data.tokenizer_path:
    data = dataclasses.replace(data, tokenizer_path=exp.init_from)
  return dataclasses.replace(exp, model=model_config(exp.init_from, like=exp.model), data=data)


def add_bos(path: Path | str) -> bool:
  """Whether the model's tokenizer puts BOS in front of a text (tokenizer_config.json's
  `add_bos_token`; true when it does not say: Llama's and Mistral's do, Qwen's have no BOS)."""
  cfg = Path(path) / "tokenizer_config.json"
  try:
    return bool(json.loads(cfg.read_text()).get("add_bos_token", True))
  except (OSError, ValueError):
    return True


def experiment(path: Path | str, *, mesh: MeshConfig = MeshConfig()) -> Experiment:
  """An HF model directory seen as a jaxlm run at step 0: its model, its tokenizer.json (bytes
  when it has none), the default data mixture."""
  path = Path(path)
  has_tokenizer = (path / "tokenizer.json").is_file()
  data = DataConfig(tokenizer="hf", tokenizer_path=str(path), add_bos=add_bos(path)) if has_tokenizer else DataConfig()
  return Experiment(name=path.resolve().name or "hf", mesh=mesh, model=model_config(path), data=data, init_from=str(path))


def _abstract(cfg: ModelConfig) -> tuple[Any, nnx.State, nnx.State]:
  from jaxlm.models import abstract_model

  return nnx.split(abstract_model(cfg), nnx.Param, ...)


def _rest(cfg: ModelConfig, graph_rest: nnx.State, mesh: Any, rules: Any) -> nnx.State:
  """The non-parameter state (router bias, counters) as a fresh model would have it; the
  parameter initialisers are dead code in this jit and never run."""
  from jaxlm.models.transformer import Transformer

  if not jax.tree.leaves(graph_rest):  # nothing but parameters (every dense model)
    return graph_rest

  def init():
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2]

  if mesh is None:
    return jax.jit(init)()
  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=sharding.state_shardings(graph_rest, mesh, rules))()


def check_dir(path: Path | str, cfg: ModelConfig | None = None) -> None:
  """ConfigError unless the directory's tensors are exactly the model's (names and sizes; only
  the safetensors headers are read)."""
  hf_cfg = read_config(path)
  flat = dataclasses.replace(cfg or family(hf_cfg["model_type"]).model_config(hf_cfg), scan_layers=False)
  reader = Reader(path)
  _, params, _ = _abstract(flat)
  tree = nnx.to_pure_dict(params)
  fused = any(n.endswith("mlp.experts.gate_up_proj") for n in reader.names())
  check_coverage(family(hf_cfg["model_type"]).entries(flat, tree, fused=fused), tree, reader, where=str(path))


def load_model(path: Path | str, mesh: Any = None, *, cfg: ModelConfig | None = None, rules: Any = None, show_progress: bool = True) -> nnx.Module:
  """A jaxlm Transformer holding the HF checkpoint at `path`, its parameters created directly in
  their shardings on `mesh` (default device without one). `cfg` (default `model_config(path)`)
  may differ from the checkpoint's only in run settings (dtype, remat, scan_layers, ...)."""
  from jaxlm.train.run import copy_weights

  path = Path(path)
  hf = read_config(path)
  fam = family(hf["model_type"])
  cfg = cfg or fam.model_config(hf)
  want = model_config(path, like=cfg)
  if want != cfg:
    diff = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(want, f.name)]
    raise ConfigError(f"{path}: the model config differs from the checkpoint's in model.{', model.'.join(diff)}")
  rules = sharding.make_rules() if rules is None else rules
  flat = dataclasses.replace(cfg, scan_layers=False)
  with sharding.use_rules(rules):
    graphdef, params, rest = _abstract(flat)
    tree = nnx.to_pure_dict(params)
    reader = Reader(path)
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n in reader.names())
    entries = fam.entries(flat, tree, fused=fused)
    check_coverage(entries, tree, reader, where=str(path))
    shardings = None if mesh is None else nnx.to_pure_dict(sharding.state_shardings(params, mesh, rules))
    loaded = read_params(reader, entries, tree, shardings, show_progress=show_progress)
    nnx.replace_by_pure_dict(params, loaded)
    model = nnx.merge(graphdef, params, _rest(flat, rest, mesh, rules))
    if cfg.scan_layers:
      from jaxlm.models import build

      scanned = build(cfg, mesh, rules=rules)
      copy_weights(model, scanned)
      model = scanned
  return model


def load(path: Path | str, *, show_progress: bool = True) -> tuple[ModelConfig, dict]:
  """(ModelConfig, parameters as a pure dict of arrays on the default device)."""
  model = load_model(path, show_progress=show_progress)
  return model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save(
    model: nnx.Module,
    dst: Path | str,
    *,
    model_type: str | None = None,
    fused_experts: bool = False,
    dtype: str | None = None,
    max_shard_bytes: int = 4 << 30,
    tokenizer_from: Path | str | None = None,
    extra_config: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> Path:
  """Write `model` (a plain jaxlm Transformer: merge adapters first) as an HF model directory.

  `model_type` chooses the family (default: the first that holds the model, `family_for`);
  experts use the legacy per-expert names unless `fused_experts`; `dtype` casts the weights
  (default: the model's param_dtype). The tokenizer files of `tokenizer_from` are copied.
  `dst` is written in a temporary sibling and renamed at the end: it never holds half a model.
  """
  from jaxlm.models.build import layer_trees
  from jaxlm.peft.modules import Adapted

  if any(isinstance(n, Adapted) for _, n in nnx.iter_graph(model)):
    raise ConfigError("save: the model holds adapters; merge them first (jaxlm.peft.merge)")
  cfg: ModelConfig = model.cfg
  fam: Family = family(model_type) if model_type else family_for(cfg)
  hf_cfg = {**fam.hf_config(cfg), **(extra_config or {})}
  out_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
  hf_cfg["dtype"] = str(jax.numpy.dtype(out_dtype))
  tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if cfg.scan_layers:  # unrolled views: layer i of a scanned unit is row u of its stacked arrays
    tree = {k: v for k, v in tree.items() if k not in ("prefix", "units")} | {"blocks": dict(enumerate(layer_trees(tree, cfg)))}
  flat = dataclasses.replace(cfg, scan_layers=False)
  entries = fam.entries(flat, tree, fused=fused_experts)
  check_coverage(entries, tree)
  dst = Path(dst)
  tmp = fresh_dir(dst) if jax.process_index() == 0 else None
  try:
    write_params(tmp or dst, entries, lambda p: get_path(tree, p), dtype=out_dtype, max_shard_bytes=max_shard_bytes, show_progress=show_progress)
    if tmp is not None:
      (tmp / CONFIG).write_text(json.dumps(hf_cfg, indent=2) + "\n")
      if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
          if (Path(tokenizer_from) / name).is_file():
            shutil.copy(Path(tokenizer_from) / name, tmp / name)
      commit_dir(tmp, dst)
  except BaseException:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst
