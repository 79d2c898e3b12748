"""Load an experiment file or a registered name, and apply typed `--set a.b=value` overrides.

An experiment file is a Python file with a function `experiment() -> Experiment`; variants are
more functions in the same file, selected as `path.py:variant`. Registered names are the files
in the repository's `experiments/` folder (and `./experiments/` of the working directory):
`load("quickstart")` is `load("experiments/quickstart.py")`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
import types
import traceback
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from jaxlm.config import Experiment
from jaxlm.errors import ConfigError

REPO_EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def search_dirs() -> list[Path]:
  dirs = [Path.cwd() / "experiments", REPO_EXPERIMENTS]
  return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def known_names() -> list[str]:
  return sorted({p.stem for d in search_dirs() for p in d.glob("*.py") if not p.stem.startswith("_")})


def resolve(path_or_name: str) -> tuple[Path, str]:
  """(file, function) for `name`, `name:variant`, `path.py` or `path.py:variant`."""
  spec, _, fn = path_or_name.partition(":")
  fn = fn or "experiment"
  path = Path(spec).expanduser()
  if path.suffix == ".py" or path.exists():
    if not path.is_file():
      raise ConfigError(f"experiment file not found: {spec}")
    return path, fn
  for d in search_dirs():
    if (d / f"{spec}.py").is_file():
      return d / f"{spec}.py", fn
  raise ConfigError(f"unknown experiment {spec!r}: not a file, and not one of {', '.join(known_names()) or '(none)'}")


def _user_code(path: Path, what: str, fn: Callable[[], Any]) -> Any:
  """Run code of an experiment file; its mistakes become one line naming the file and line."""
  try:
    return fn()
  except ConfigError:
    raise
  except SyntaxError as e:
    raise ConfigError(f"{path}, line {e.lineno}: {e.msg}") from None
  except Exception as e:  # noqa: BLE001 - anything the user's file raises
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    where = f", line {lines[-1]}" if lines else ""
    raise ConfigError(f"{path}{where}: {what} raised {type(e).__name__}: {e}") from None


def _import_file(path: Path) -> types.ModuleType:
  name = f"jaxlm_experiment_{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  _user_code(path, "importing it", lambda: spec.loader.exec_module(module))
  return module


def load(path_or_name: str, overrides: Iterable[str] = ()) -> Experiment:
  """The experiment defined by a file or registered name, with `key=value` overrides applied."""
  path, fn_name = resolve(path_or_name)
  module = _import_file(path)
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    variants = [n for n, v in vars(module).items() if callable(v) and getattr(v, "__module__", None) == module.__name__ and not n.startswith("_")]
    raise ConfigError(f"{path} has no function {fn_name!r}; it defines: {', '.join(variants)}")
  exp = _user_code(path, f"{fn_name}()", fn)
  if not isinstance(exp, Experiment):
    raise ConfigError(f"{path}:{fn_name}() returned {type(exp).__name__}, not an Experiment")
  from jaxlm.interop import hf

  return hf.resolve_experiment(apply_overrides(exp, overrides))


def apply_overrides(cfg: Any, overrides: Iterable[str]) -> Any:
  """Apply `a.b.c=value` strings to a dataclass tree; each value is parsed by its field's type.

  All overrides are applied together and every config object is rebuilt (and validated) once,
  so their order never matters (e.g. raising `data.sp_vocab_size` and `model.vocab_size`).
  """
  changes: dict[str, Any] = {}
  for item in overrides:
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key:
      raise ConfigError(f"bad override {item!r}: expected key=value, e.g. model.n_layers=2")
    path = key.split(".")
    value = _parse_at(cfg, path, raw.strip(), key)
    node = changes
    for part in path[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {key!r} conflicts with an override of its section")
    node[path[-1]] = value
  return _rebuild(cfg, changes)


def _parse_at(node: Any, path: list[str], raw: str, full_key: str) -> Any:
  """The value for `path` below `node`, parsed by the type of the field it names."""
  for i, head in enumerate(path):
    if not dataclasses.is_dataclass(node):
      raise ConfigError(f"unknown config key {full_key!r}")
    names = [f.name for f in dataclasses.fields(node)]
    if head not in names:
      where = ".".join(path[:i]) or type(node).__name__
      raise ConfigError(f"unknown config key {full_key!r}: {where} has {', '.join(names)}")
    if i == len(path) - 1:
      return parse_value(typing.get_type_hints(type(node))[head], raw, full_key)
    node = getattr(node, head)


def _rebuild(node: Any, changes: dict[str, Any]) -> Any:
  kwargs = {k: _rebuild(getattr(node, k), v) if isinstance(v, dict) and dataclasses.is_dataclass(getattr(node, k)) else v for k, v in changes.items()}
  return dataclasses.replace(node, **kwargs)


def parse_value(tp: Any, raw: str, key: str) -> Any:
  """Parse `raw` as a value of type `tp` (int, float, bool, str, tuples, mappings, unions)."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    errors = []
    for arm in typing.get_args(tp):
      if arm is type(None):
        if raw.lower() in ("none", "null"):
          return None
        continue
      try:
        return parse_value(arm, raw, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"bad value for {key}: {raw!r} ({'; '.join(errors)})")
  if tp is bool:
    low = raw.lower()
    if low in ("true", "1", "yes", "on"):
      return True
    if low in ("false", "0", "no", "off"):
      return False
    raise ConfigError(f"bad value for {key}: expected true or false, got {raw!r}")
  if tp is int:
    try:
      return int(raw.replace("_", ""))
    except ValueError:
      raise ConfigError(f"bad value for {key}: expected an integer, got {raw!r}") from None
  if tp is float:
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"bad value for {key}: expected a number, got {raw!r}") from None
  if tp is str:
    return raw
  if dataclasses.is_dataclass(tp):
    raise ConfigError(f"{key} is a section; set its fields, e.g. {key}.{dataclasses.fields(tp)[0].name}=...")
  # Containers and anything else: a Python literal, checked against the declared container type.
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise ConfigError(f"bad value for {key}: {raw!r} is not a Python literal") from None
  if origin in (tuple, list, typing.Sequence) or tp is tuple:
    if isinstance(value, str):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"bad value for {key}: expected a tuple, got {raw!r}")
    return tuple(value)
  if origin in (dict, Mapping, typing.Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
    if not isinstance(value, dict):
      raise ConfigError(f"bad value for {key}: expected a mapping like {{'a': 1.0}}, got {raw!r}")
    return value
  return value
