"""A run directory: its config, tokenizer and checkpoints, and loading a trained model from it.

  <run_dir>/config.json       the experiment that made the run
  <run_dir>/tokenizer.model   sentencepiece model trained for the run (if any)
  <run_dir>/checkpoints/      Orbax checkpoints (jaxlm.train.checkpoint)
  <run_dir>/metrics.jsonl     metrics, one JSON object per line
  <run_dir>/tensorboard/      TensorBoard events
  <run_dir>/*.png             plots written at the end of training
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from jaxlm import sharding
from jaxlm.config import Experiment, MeshConfig, from_dict, to_dict
from jaxlm.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer
from jaxlm.errors import ConfigError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
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
  """A run resumes only with the same model and data; train, optim, mesh and checkpoint may change."""
  for section in ("model", "data"):
    a, b = to_dict(getattr(saved, section)), to_dict(getattr(new, section))
    if a != b:
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      raise ConfigError(
          f"the run directory holds a run with a different {section} config ({', '.join(f'{section}.{k}' for k in diff)}); "
          "use another --run-dir or the same settings"
      )


def tokenizer_for(exp: Experiment, run_dir: Path | None, *, train_if_missing: bool = True) -> Tokenizer:
  """The run's tokenizer: bytes, a given sentencepiece model, or one trained into the run dir."""
  data = exp.data
  if data.tokenizer == "byte":
    return ByteTokenizer()
  if data.sp_model:
    tok = SentencePieceTokenizer(data.sp_model)
  else:
    path = None if run_dir is None else run_dir / TOKENIZER_FILE
    if path is not None and path.is_file():
      tok = SentencePieceTokenizer(path)
    elif not train_if_missing or path is None:
      raise ConfigError(f"no sentencepiece model: set data.sp_model (no {TOKENIZER_FILE} in {run_dir})")
    else:
      if jax.process_count() > 1:
        raise ConfigError("multi-host runs need a pre-trained tokenizer: set data.sp_model")
      from jaxlm.data.pipeline import sample_texts

      print(f"training a sentencepiece tokenizer ({data.sp_vocab_size} pieces) on the training data ...", flush=True)
      tok = SentencePieceTokenizer.train(sample_texts(data.mixture, max_chars=4_000_000, cache_dir=data.cache_dir), path, data.sp_vocab_size)
  if tok.vocab_size > exp.model.vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is {exp.model.vocab_size}")
  return tok


def load_for_inference(run_dir: Path, *, step: int | None = None, mesh_cfg: MeshConfig = MeshConfig()) -> tuple[Experiment, nnx.Module, Tokenizer, int]:
  """(experiment, model with the checkpoint's parameters, tokenizer, step) of a trained run."""
  from jaxlm.models import build
  from jaxlm.train.checkpoint import Checkpointer

  run_dir = Path(run_dir)
  exp = load_config(run_dir)
  ckpt_dir = run_dir / CHECKPOINTS
  if not ckpt_dir.is_dir():
    raise ConfigError(f"{run_dir} has no checkpoints yet")
  ckpt = Checkpointer(ckpt_dir, exp.checkpoint, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.manager.all_steps():
    raise ConfigError(f"{run_dir}: no checkpoint at step {step}; have {list(ckpt.manager.all_steps())}")
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.make_rules(exp.mesh.rules)
  with sharding.use_rules(rules):
    model = build(exp.model, mesh, seed=exp.train.seed, rules=rules)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    restored = ckpt.restore(step, params=params, rest=rest, opt_state=None, data_iterator=None)
  ckpt.close()
  model = nnx.merge(graphdef, restored["params"], restored.get("rest", rest))
  return exp, model, tokenizer_for(exp, run_dir, train_if_missing=False), step

