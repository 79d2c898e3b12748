"""A run directory: its config, tokenizer and checkpoints, and loading a trained model from it.

  <run_dir>/config.json       the experiment that made the run
  <run_dir>/init_from.json    the weights it started from (`init_from` resolved to a checkpoint step)
  <run_dir>/peft_inputs.json  what a PEFT method measured before training (ESFT's chosen experts)
  <run_dir>/tokenizer.model   sentencepiece model trained for the run (if any)
  <run_dir>/checkpoints/      Orbax checkpoints (jaxlm.train.checkpoint)
  <run_dir>/metrics.jsonl     metrics, one JSON object per line
  <run_dir>/tensorboard/      TensorBoard events
  <run_dir>/*.png             plots written at the end of training
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxlm import peft, sharding
from jaxlm.config import Experiment, MeshConfig, MoEConfig, from_dict, to_dict
from jaxlm.data import tokenizers
from jaxlm.data.tokenizers import SentencePieceTokenizer, Tokenizer
from jaxlm.errors import ConfigError

CONFIG_FILE = "config.json"
INIT_FILE = "init_from.json"
PEFT_INPUTS_FILE = "peft_inputs.json"
TOKENIZER_FILE = SentencePieceTokenizer.RUN_FILE
CHECKPOINTS = "checkpoints"


def save_config(run_dir: Path, exp: Experiment) -> None:
  tmp = run_dir / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(to_dict(exp), indent=2) + "\n")
  tmp.replace(run_dir / CONFIG_FILE)


def load_config(run_dir: Path) -> Experiment:
  path = Path(run_dir) / CONFIG_FILE
  if not path.is_file():
    raise ConfigError(f"{run_dir} is not a jaxlm run directory (no {CONFIG_FILE})")
  return from_dict(Experiment, json.loads(path.read_text()))


def check_resumable(saved: Experiment, new: Experiment) -> None:
  """A run resumes only with the same model, data, PEFT method and initial weights; train, optim,
  mesh and checkpoint may change."""
  if saved.init_from != new.init_from:
    raise ConfigError(f"the run directory holds a run that started from init_from={saved.init_from!r}, not {new.init_from!r}; use another --run-dir")
  for section in ("model", "data", "peft", "grow"):
    a, b = to_dict(getattr(saved, section)), to_dict(getattr(new, section))
    if a != b:
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      raise ConfigError(
          f"the run directory holds a run with a different {section} config ({', '.join(f'{section}.{k}' for k in diff)}); "
          "use another --run-dir or the same settings"
      )


def tokenizer_for(exp: Experiment, run_dir: Path | None, *, train_if_missing: bool = True) -> Tokenizer:
  """The run's tokenizer (`data.tokenizer`, jaxlm.data.tokenizers registry), checked against
  model.vocab_size; a sentencepiece model without `data.sp_model` is the run directory's own,
  trained there when missing and `train_if_missing`."""
  tok = tokenizers.load(exp.data, run_dir, train=train_if_missing)
  if tok is None:
    raise ConfigError("no sentencepiece model: set data.sp_model (or give a run directory to train one in)")
  tokenizers.check_vocab(tok, exp.model.vocab_size)
  return tok


def _hint(path: Path) -> str:
  from jaxlm import experiments

  if path.parent.name == "runs" and path.name in experiments.known_names():
    return f"; make it with `jaxlm train {path.name}`" + (" (or `make train`)" if path.name == "quickstart" else "")
  return ""


def resolve_init(exp: Experiment, run_dir: Path | None) -> dict[str, Any] | None:
  """{"path", "step"}: the checkpoint `exp.init_from` names ({"path", "format": "hf"} for a
  Hugging Face model directory). A run that already started keeps the step recorded in its
  `init_from.json` (the source run may have trained on since)."""
  from jaxlm.interop import hf

  if not exp.init_from:
    return None
  if run_dir is not None and (Path(run_dir) / INIT_FILE).is_file():
    return json.loads((Path(run_dir) / INIT_FILE).read_text())
  path = Path(exp.init_from)
  if hf.is_hf_dir(path):
    if exp.grow.operator != "none":
      raise ConfigError(f"grow.operator={exp.grow.operator!r} grows a jaxlm run; init_from {exp.init_from} is a Hugging Face model (import it first: jaxlm convert hf-import)")
    hf.check_dir(path, exp.model)  # weights present and shaped for the model, before anything is written
    return {"path": str(path), "format": "hf"}
  if not (path / CONFIG_FILE).is_file():
    raise ConfigError(f"init_from {exp.init_from}: no jaxlm run or Hugging Face model there{_hint(path)}")
  from jaxlm.train.checkpoint import Checkpointer

  saved = load_config(path)
  grown = None
  if exp.grow.operator != "none":  # model growth: the source's model must grow into exp.model
    from jaxlm.models.grow import check_growth

    grown = {"operator": exp.grow.operator, "factor": check_growth(saved.model, exp.model, exp.grow), "source_n_layers": saved.model.n_layers}
  ckpt = Checkpointer(path / CHECKPOINTS, saved.checkpoint, read_only=True) if (path / CHECKPOINTS).is_dir() else None
  step = ckpt.latest_step() if ckpt else None
  if ckpt:
    ckpt.close()
  if step is None:
    raise ConfigError(f"init_from {exp.init_from}: the run has no checkpoint yet")
  return {"path": str(path), "step": int(step), **({"grow": grown} if grown else {})}


def record(run_dir: Path, name: str, value: Any) -> None:
  tmp = run_dir / (name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2) + "\n")
  tmp.replace(run_dir / name)


def read_record(run_dir: Path | None, name: str) -> Any:
  if run_dir is None or not (Path(run_dir) / name).is_file():
    return None
  return json.loads((Path(run_dir) / name).read_text())


# ModelConfig fields that may differ between a run and the weights it starts from.
INIT_FREE_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl")
INIT_FREE_MOE_FIELDS = ("gw_threshold", "gw_slots")  # fine-tuning options (GW-MoE) that shape no parameter


def copy_weights(src: nnx.Module, dst: nnx.Module) -> None:
  """Copy a trained plain model's parameters into `dst` (in place; unrolled or scanned either
  way, cast to dst's dtypes and placed on its shardings). Adapters of dst are left alone."""
  import dataclasses

  from jaxlm.models.build import layer_trees, set_layer_trees
  from jaxlm.peft.modules import Adapted

  a, b = src.cfg, dst.cfg
  free_moe = lambda m: dataclasses.replace(m, **{k: getattr(MoEConfig(), k) for k in INIT_FREE_MOE_FIELDS})
  for f in dataclasses.fields(a):
    if f.name == "moe" and free_moe(a.moe) == free_moe(b.moe):
      continue
    if f.name not in INIT_FREE_FIELDS and getattr(a, f.name) != getattr(b, f.name):
      raise ConfigError(f"init_from: model.{f.name} is {getattr(b, f.name)!r} but the weights come from a model with {getattr(a, f.name)!r}")
  if any(isinstance(n, Adapted) for _, n in nnx.iter_graph(dst)):
    raise ConfigError("copy_weights: load the base weights before attaching adapters")
  src_tree = nnx.to_pure_dict(nnx.state(src, nnx.Param))
  dst_state = nnx.state(dst, nnx.Param)
  dst_tree = nnx.to_pure_dict(dst_state)
  out = jax.tree.map(lambda x: x, dst_tree)  # fresh containers shaped like dst
  out.update({k: v for k, v in src_tree.items() if k not in ("blocks", "prefix", "units")})
  set_layer_trees(out, b, layer_trees(src_tree, a))
  placed = jax.tree.map(lambda s, d: jax.device_put(jax.numpy.asarray(s, d.dtype), d.sharding) if isinstance(d, jax.Array) else jax.numpy.asarray(s, d.dtype), out, dst_tree)
  nnx.replace_by_pure_dict(dst_state, placed)
  nnx.update(dst, dst_state)


def initial_model(exp: Experiment, mesh: Any, rules: Any, *, abstract: bool = False, init: dict[str, Any] | None = None, peft_inputs: dict[str, Any] | None = None) -> nnx.Module:
  """The model a run of `exp` starts from: initialised on `mesh` (or abstract), the `init`
  checkpoint's weights copied in (`resolve_init`), then the PEFT method's adapters attached."""
  from jaxlm.interop import hf
  from jaxlm.models import abstract_model, build

  with sharding.use_rules(rules):
    if abstract:
      model = abstract_model(exp.model, seed=exp.train.seed)
    elif init is not None and init.get("format") == "hf":  # straight onto the mesh, no random init
      model = hf.load_model(init["path"], mesh, cfg=exp.model, rules=rules)
    else:
      model = build(exp.model, mesh, seed=exp.train.seed, rules=rules)
    if init is not None and not abstract and init.get("format") != "hf":
      _, src, _, _ = load_for_inference(Path(init["path"]), step=init["step"], mesh=mesh, merged=True)
      if exp.grow.operator != "none":  # a smaller model grown into this one (jaxlm.models.grow)
        from jaxlm.models.grow import grow_into

        grow_into(src, model, exp.grow, seed=exp.train.seed)
      else:
        copy_weights(src, model)
      del src
    return peft.apply(model, exp.peft, seed=exp.train.seed, **(peft_inputs or {}))


def load_for_inference(run_dir: Path, *, step: int | None = None, mesh_cfg: MeshConfig = MeshConfig(), mesh: Any = None, merged: bool = False) -> tuple[Experiment, nnx.Module, Tokenizer, int]:
  """(experiment, model with the checkpoint's parameters, tokenizer, step) of a trained run.

  A PEFT run's checkpoint holds its adapters only: the model is rebuilt from the run's base
  (`init_from.json`) and the adapters restored on top (merged into the base with `merged`).
  A Hugging Face model directory loads as a run at step 0 (`jaxlm.interop.hf.experiment`).
  """
  from jaxlm.interop import hf
  from jaxlm.train.checkpoint import Checkpointer
  from jaxlm.train.step import split_model

  run_dir = Path(run_dir)
  if hf.is_hf_dir(run_dir):
    exp = hf.experiment(run_dir, mesh=mesh_cfg)
    mesh = sharding.make_mesh(mesh_cfg) if mesh is None else mesh
    return exp, hf.load_model(run_dir, mesh, cfg=exp.model), tokenizer_for(exp, None, train_if_missing=False), 0
  exp = load_config(run_dir)
  ckpt_dir = run_dir / CHECKPOINTS
  if not ckpt_dir.is_dir():
    raise ConfigError(f"{run_dir} has no checkpoints yet")
  ckpt = Checkpointer(ckpt_dir, exp.checkpoint, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.manager.all_steps():
    raise ConfigError(f"{run_dir}: no checkpoint at step {step}; have {list(ckpt.manager.all_steps())}")
  mesh = sharding.make_mesh(mesh_cfg) if mesh is None else mesh
  rules = sharding.make_rules(exp.mesh.rules)
  model = initial_model(exp, mesh, rules, init=read_record(run_dir, INIT_FILE), peft_inputs=read_record(run_dir, PEFT_INPUTS_FILE))
  with sharding.use_rules(rules):
    graphdef, params, frozen, rest = split_model(model, peft.trainable(exp.peft))
    restored = ckpt.restore(step, params=params, rest=rest, opt_state=None, data_iterator=None)
  ckpt.close()
  model = nnx.merge(graphdef, restored["params"], frozen, restored.get("rest", rest))
  if merged and exp.peft.method != "none":
    peft.merge(model)
  return exp, model, tokenizer_for(exp, run_dir, train_if_missing=False), step


def check_empty_run_dir(out_dir: Path) -> None:
  if (Path(out_dir) / CONFIG_FILE).exists() or (Path(out_dir) / CHECKPOINTS).exists():
    raise ConfigError(f"{out_dir} already holds a run; choose an empty directory")


def write_initial_run(out_dir: Path, exp: Experiment, fill: Any, *, tokenizer_from: Path | None = None) -> None:
  """Write `out_dir` as a run of `exp` at step 0 (config, checkpoint with fresh optimizer and data
  state) whose parameters `fill(model)` sets in place; `jaxlm train EXP --run-dir OUT` continues it,
  `jaxlm generate / eval OUT` use it. The tokenizer model of `tokenizer_from` is copied."""
  import shutil

  from jaxlm.train import loop
  from jaxlm.train.checkpoint import Checkpointer
  from jaxlm.train.step import split_model

  out_dir = Path(out_dir)
  check_empty_run_dir(out_dir)
  loop.validate(exp, None)
  out_dir.mkdir(parents=True, exist_ok=True)
  if tokenizer_from is not None and (Path(tokenizer_from) / TOKENIZER_FILE).is_file() and not exp.data.sp_model:
    shutil.copy(Path(tokenizer_from) / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)  # the same tokens
  save_config(out_dir, exp)
  setup = loop.prepare(exp)
  model = nnx.merge(setup.graphdef, setup.state.params, setup.state.frozen, setup.state.rest)
  fill(model)
  _, params, _, rest = split_model(model, peft.trainable(exp.peft))
  train_iter = iter(loop.datasets(exp, tokenizer_for(exp, out_dir), "train"))
  ckpt = Checkpointer(out_dir / CHECKPOINTS, exp.checkpoint)
  ckpt.save(0, params=params, rest=rest, opt_state=setup.state.opt_state, data_iterator=train_iter, config=to_dict(exp))
  ckpt.wait()
  ckpt.close()
