"""`jaxlm convert hf-import` / `hf-export`: between HF model directories and jaxlm runs.

hf-import writes a jaxlm run at step 0 holding the HF model (its tokenizer files copied in), so
that `jaxlm generate / eval DST`, `jaxlm convert upcycle DST ...` and `init_from=DST` work like
on any run; `jaxlm train EXPERIMENT --run-dir DST` continues it. hf-export writes a run's model
(adapters merged in) as an HF directory that transformers, vLLM and PEFT load; the tokenizer
files travel along when the run's tokenizer is a Hugging Face one.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Sequence

from jaxlm.errors import ConfigError
from jaxlm.interop import hf


def import_run(src: Path | str, dst: Path | str, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Write `dst` as a jaxlm run at step 0 holding the HF model at `src`.

  `overrides` (`key=value`) set run settings such as model.dtype or mesh.fsdp.
  """
  from jaxlm.experiments import apply_overrides
  from jaxlm.train.run import check_empty_run_dir, copy_weights, write_initial_run

  src, dst = Path(src), Path(dst)
  exp = hf.experiment(src)
  check_empty_run_dir(dst)
  exp = apply_overrides(dataclasses.replace(exp, name=dst.resolve().name, init_from=""), overrides)
  if exp.model != hf.model_config(src, like=exp.model):
    raise ConfigError("hf-import: only run settings of the model may be overridden (dtype, param_dtype, remat, scan_layers, attention_impl, init_std, moe kernels and losses)")
  if exp.data.tokenizer == "hf":
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, tokenizer_path=str(dst.resolve())))
  source = hf.load_model(src, cfg=dataclasses.replace(exp.model, scan_layers=False))

  def fill(model) -> None:
    copy_weights(source, model)

  try:
    dst.mkdir(parents=True, exist_ok=True)
    for name in hf.TOKENIZER_FILES:
      if (src / name).is_file():
        shutil.copy(src / name, dst / name)
    write_initial_run(dst, exp, fill)
  except BaseException:
    if dst.exists() and not (dst / "checkpoints").exists():
      shutil.rmtree(dst, ignore_errors=True)  # nothing half-written
    raise
  return {"src": str(src), "run_dir": str(dst), "model_type": hf.read_config(src)["model_type"], "tokenizer": exp.data.tokenizer}


def tokenizer_dir(exp) -> Path | None:
  """The directory of an HF tokenizer.json a run uses (None for byte / sentencepiece)."""
  if exp.data.tokenizer != "hf" or not exp.data.tokenizer_path:
    return None
  path = Path(exp.data.tokenizer_path)
  return path if path.is_dir() else path.parent


def export_run(run_dir: Path | str, dst: Path | str, *, model_type: str | None = None, fused_experts: bool = False, dtype: str | None = None, step: int | None = None) -> dict[str, Any]:
  """Write a run's model (adapters merged) as an HF model directory."""
  from jaxlm.train.run import load_for_inference

  dst = Path(dst)
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    raise ConfigError(f"{dst} already exists and is not empty; choose a new directory")
  exp, model, tokenizer, step = load_for_inference(Path(run_dir), step=step, merged=True)
  fam = hf.family(model_type) if model_type else hf.family_for(model.cfg)
  extra = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
  hf.save(model, dst, model_type=fam.model_type, fused_experts=fused_experts, dtype=dtype, tokenizer_from=tokenizer_dir(exp), extra_config=extra)
  return {"run_dir": str(run_dir), "step": step, "out": str(dst), "model_type": fam.model_type, "tokenizer": exp.data.tokenizer}
