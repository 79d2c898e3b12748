"""Hugging Face checkpoints on disk: config.json plus safetensors, one file or sharded with an index.

Reading streams one `Entry` (families.py) at a time: its HF tensors are read, converted to
jaxlm's layout and cast on the host, then placed straight into their shardings with
`jax.make_array_from_callback` (each device gets its slice; no device holds the whole tensor
unless its sharding says so), and the host copies are dropped before the next entry. Peak host
memory is the loaded model plus about two copies of the largest entry. Writing gathers one entry
at a time to the host of process 0 and fills shards of at most `max_shard_bytes`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np

from jaxlm.errors import ConfigError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed by every reader


def _safetensors():
  try:
    import safetensors  # noqa: F401
    from safetensors import safe_open
    from safetensors.numpy import save_file
  except ImportError:
    raise ConfigError("Hugging Face checkpoints need safetensors: pip install 'jaxlm[hf]'") from None
  return safe_open, save_file


def read_json(path: Path, what: str) -> Any:
  """A JSON file that must exist: ConfigError naming it and `what` the directory should be."""
  if not path.is_file():
    raise ConfigError(f"{path.parent}: no {path.name} (not {what})")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def read_config(path: Path | str) -> dict[str, Any]:
  """The config.json of an HF model directory (ConfigError when there is none)."""
  path = Path(path)
  hf = read_json(path / CONFIG, "a Hugging Face model directory")
  if not isinstance(hf, dict) or "model_type" not in hf:
    raise ConfigError(f"{path / CONFIG}: no model_type (not a Hugging Face model config)")
  return hf


def is_hf_dir(path: Path | str) -> bool:
  """A directory with an HF config.json (a jaxlm run's config.json has no `model_type`)."""
  try:
    return "model_type" in json.loads((Path(path) / CONFIG).read_text())
  except (OSError, ValueError, TypeError):
    return False


class Reader:
  """The tensors of a checkpoint directory: names, shapes and streaming reads."""

  def __init__(self, path: Path | str):
    safe_open, _ = _safetensors()
    self._open = safe_open
    self.path = Path(path)
    if (self.path / INDEX).is_file():
      weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
    elif (self.path / SINGLE).is_file():
      weight_map = None
    else:
      raise ConfigError(f"{self.path}: no {SINGLE} or {INDEX}")
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
    self.file_of: dict[str, str] = {}
    self.shape: dict[str, tuple[int, ...]] = {}
    for name in files:
      if not (self.path / name).is_file():
        raise ConfigError(f"{self.path}: {INDEX} names {name}, which is missing")
      try:
        with safe_open(str(self.path / name), "np") as f:
          for key in f.keys():
            self.file_of[key] = name
            self.shape[key] = tuple(f.get_slice(key).get_shape())
      except Exception as e:  # safetensors raises its own error types for truncated or bad headers
        raise ConfigError(f"{self.path / name}: not a readable safetensors file ({e})") from None

  @property
  def nbytes(self) -> int:
    return sum((self.path / f).stat().st_size for f in set(self.file_of.values()))

  def names(self) -> set[str]:
    return set(self.file_of)

  def read(self, names: Iterable[str]) -> list[np.ndarray]:
    """The named tensors, each file opened once and closed again (its pages leave this process)."""
    names = list(names)
    by_file: dict[str, list[str]] = defaultdict(list)
    for n in names:
      by_file[self.file_of[n]].append(n)
    got: dict[str, np.ndarray] = {}
    for file, keys in by_file.items():
      with self._open(str(self.path / file), "np") as f:
        for k in keys:
          got[k] = f.get_tensor(k)
    return [got[n] for n in names]


def leaf_paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
  if isinstance(tree, dict):
    return [p for k, v in tree.items() for p in leaf_paths(v, prefix + (k,))]
  return [prefix]


def get_path(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def check_coverage(entries: list, tree: dict, reader: Reader | None = None, *, where: str = "") -> None:
  """Every parameter has exactly one entry, and (when reading) every tensor exists with the right size."""
  ours = [p for e in entries for p in e.ours]
  want = set(leaf_paths(tree))
  if sorted(map(str, ours)) != sorted(map(str, want)):
    missing = want - set(ours)
    raise ConfigError(f"internal: no Hugging Face name for parameter(s) {sorted(map(str, missing))[:3]}")
  if reader is None:
    return
  have = reader.names()
  needed = [n for e in entries for n in e.hf]
  missing = [n for n in needed if n not in have]
  if missing:
    raise ConfigError(f"{where}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  unused = sorted(n for n in have - set(needed) if not n.endswith(IGNORED_SUFFIXES) and n != "lm_head.weight")
  if unused:
    raise ConfigError(f"{where}: tensor {unused[0]} has no place in the model" + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else "") + "; its config and weights disagree")
  for e in entries:  # sizes first (cheap): a wrong size is reported before anything is read
    hf_size = sum(math.prod(reader.shape[n]) for n in e.hf)
    our_size = sum(math.prod(get_path(tree, p).shape) for p in e.ours)
    if hf_size != our_size:
      shapes = ", ".join(f"{n} {list(reader.shape[n])}" for n in e.hf[:2])
      raise ConfigError(f"{where}: tensor shape mismatch: {shapes} cannot hold {'/'.join(map(str, e.ours[0]))} {list(get_path(tree, e.ours[0]).shape)}")


def progress(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled or jax.process_index() != 0, leave=False)


def read_params(reader: Reader, entries: list, tree: dict, shardings: dict | None, *, show_progress: bool = True) -> dict:
  """A pure dict shaped like `tree` (ShapeDtypeStructs) holding the checkpoint's arrays, placed
  on `shardings` (a pure dict of NamedShardings) or the default device."""
  out = jax.tree.map(lambda x: None, tree)
  with progress(reader.nbytes, f"loading {reader.path.name}", show_progress) as bar:
    for e in entries:
      arrays = reader.read(e.hf)
      shapes = [tuple(get_path(tree, p).shape) for p in e.ours]
      converted = e.to_ours(arrays, shapes)
      bar.update(sum(a.nbytes for a in arrays))
      del arrays
      for path, value, shape in zip(e.ours, converted, shapes):
        if tuple(value.shape) != shape:
          raise ConfigError(f"{reader.path}: tensor shape mismatch for {'/'.join(map(str, path))}: the checkpoint gives {list(value.shape)}, the config wants {list(shape)}")
        host = np.ascontiguousarray(value, dtype=get_path(tree, path).dtype)
        if shardings is None:
          placed = jax.device_put(host)
        else:
          placed = jax.make_array_from_callback(shape, get_path(shardings, path), lambda idx, h=host: h[idx])
        set_path(out, path, placed.block_until_ready())  # the host copy is free once the transfer is done
        del host
      del converted
  return out


def host_array(x: jax.Array) -> np.ndarray:
  """A full host copy of a (possibly sharded, possibly multi-process) array."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def write_params(dst: Path, entries: list, get: Any, *, dtype: np.dtype | None, max_shard_bytes: int, show_progress: bool = True) -> None:
  """Write the HF tensors of `entries` (our arrays from `get(path)`) as safetensors shards into
  `dst` (an existing directory); only process 0 writes, every process takes part in gathers."""
  _, save_file = _safetensors()
  plan: list[list[int]] = [[]]
  sizes = []
  for i, e in enumerate(entries):
    n = sum(math.prod(get(p).shape) * (np.dtype(dtype) if dtype else get(p).dtype).itemsize for p in e.ours)
    sizes.append(n)
    if plan[-1] and sum(sizes[j] for j in plan[-1]) + n > max_shard_bytes:
      plan.append([])
    plan[-1].append(i)
  files = [SINGLE] if len(plan) == 1 else [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
  weight_map: dict[str, str] = {}
  writer = jax.process_index() == 0
  with progress(sum(sizes), f"writing {dst.name}", show_progress) as bar:
    for file, shard in zip(files, plan):
      tensors: dict[str, np.ndarray] = {}
      for i in shard:
        e = entries[i]
        ours = [host_array(get(p)) for p in e.ours]
        if dtype is not None:
          ours = [a.astype(dtype) for a in ours]
        for name, value in zip(e.hf, e.to_hf(ours)):
          tensors[name] = np.ascontiguousarray(value)
          weight_map[name] = file
        bar.update(sizes[i])
      if writer:
        save_file(tensors, str(dst / file), metadata={"format": "pt"})
      del tensors
  if writer and len(files) > 1:
    total = sum(sizes)
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def fresh_dir(dst: Path) -> Path:
  """A temporary sibling of `dst` to write into; `dst` must not exist or be empty."""
  dst = Path(dst)
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    raise ConfigError(f"{dst} already exists and is not empty; choose a new directory")
  tmp = dst.parent / f".{dst.name}.partial"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  return tmp


def commit_dir(tmp: Path, dst: Path) -> None:
  dst = Path(dst)
  if dst.exists():
    dst.rmdir()  # empty (checked by fresh_dir)
  tmp.rename(dst)
