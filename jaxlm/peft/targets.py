"""Which weights a PEFT method adapts: regexes over parameter paths, and `all-linear`.

A parameter's path is its place in the model joined by "/", e.g. `blocks/0/attn/w_q`,
`blocks/1/ffn/experts/w_gate` (routed experts), `units/blocks/0/ffn/w_down` (scanned layers),
`blocks/0/ffn/router`, `lm_head`. A target pattern must match a whole path (`re.fullmatch`).

  all-linear  every linear weight (a parameter with fan-in axes, `jaxlm.layers.linear`) except
              the output head (as in HF PEFT) and the MoE routers
  ffn-keys    the first matrices of every FFN, its keys: w_gate and w_up of the SwiGLU (dense
              MLPs, routed and shared experts alike)
  ffn-values  the second matrices of every FFN, its values: w_down
(keys and values as in Geva et al. 2021's reading of the FFN as a key-value memory; tuning only
one of them: Qiu et al. 2024, "Empirical Study on Updating Key-Value Memories in Transformer
Feed-forward Layers", arXiv 2402.12233, who find tuning the values better than the keys.)
Routers are adapted only by a pattern that names them (contains "router"): adapting a router
changes which experts tokens reach, which is rarely what a fine-tune wants by accident. A pattern
that matches nothing is an error that shows what paths look like.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.layers.linear import fan_in_of

ALL_LINEAR = "all-linear"
EXCLUDED_FROM_ALL_LINEAR = ("lm_head", "router")
ALIASES = {  # a name -> the regex it stands for (every FFN sits under an `ffn/` path element)
    "ffn-keys": r"(.+/)?ffn/(.+/)?w_(gate|up)",
    "ffn-values": r"(.+/)?ffn/(.+/)?w_down",
}


def path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def get_node(root: Any, path: tuple[Any, ...]) -> Any:
  node = root
  for p in path:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  return node


def set_node(root: Any, path: tuple[Any, ...], value: Any) -> None:
  parent = get_node(root, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def linear_weights(model: nnx.Module) -> Iterator[tuple[str, tuple[Any, ...], nnx.Param]]:
  """(path string, path, variable) of every linear weight not yet adapted."""
  from jaxlm.peft.modules import Adapted

  adapted = {tuple(p) for p, n in nnx.iter_graph(model) if isinstance(n, Adapted)}
  for path, node in nnx.iter_graph(model):
    path = tuple(path)
    if isinstance(node, nnx.Param) and fan_in_of(node) is not None and path[:-1] not in adapted:
      yield path_str(path), path, node


def n_scan(path: tuple[Any, ...]) -> int:
  """Leading axes the scan over layers added to parameters under this path."""
  return 1 if path and path[0] == "units" else 0


def select(model: nnx.Module, patterns: tuple[str, ...]) -> list[tuple[str, tuple[Any, ...], nnx.Param]]:
  """The linear weights matched by `patterns` (in model order); ConfigError for a pattern that
  matches nothing or is not a valid regex."""
  weights = list(linear_weights(model))
  chosen: dict[str, tuple[str, tuple[Any, ...], nnx.Param]] = {}
  for pattern in patterns:
    hits = [w for w in weights if matches(pattern, w[0])]
    if not hits:
      examples = ", ".join(w[0] for w in weights[:6])
      what = f" (= {ALIASES[pattern]}: the model has no such FFN matrices)" if pattern in ALIASES else ""
      raise ConfigError(f"peft.targets: {pattern!r}{what} matches no linear weight (paths look like: {examples}, ...)")
    for w in hits:
      chosen[w[0]] = w
  order = {w[0]: i for i, w in enumerate(weights)}
  return sorted(chosen.values(), key=lambda w: order[w[0]])


def matches(pattern: str, path: str) -> bool:
  """Whether a target pattern (a regex, `all-linear` or an alias) selects the linear weight at `path`."""
  last = path.split("/")[-1]
  if pattern == ALL_LINEAR:
    return last not in EXCLUDED_FROM_ALL_LINEAR
  return bool(compile_pattern(ALIASES.get(pattern, pattern)).fullmatch(path)) and ("router" in pattern or last != "router")


def is_target(patterns: tuple[str, ...], path: tuple[Any, ...], variable: nnx.Variable) -> bool:
  """Whether `variable` (at `path`) is a linear weight that one of `patterns` selects."""
  return isinstance(variable, nnx.Param) and fan_in_of(variable) is not None and any(matches(p, path_str(path)) for p in patterns)


def compile_pattern(pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"peft: {pattern!r} is not a valid regex ({e})") from None


def first_match(patterns: dict[str, Any], path: str, default: Any) -> Any:
  """patterns[p] for the first regex p fully matching `path`, else `default`."""
  for p, v in patterns.items():
    if re.fullmatch(p, path):
      return v
  return default


def n_stack(variable: nnx.Param) -> int:
  """Stack axes of a linear weight (scanned layers, experts): those before its fan-in axes."""
  return len(variable.shape) + min(fan_in_of(variable))


def check_rank(path: str, variable: nnx.Param, rank: int) -> None:
  """A rank must not exceed the adapted weight's fan-in or fan-out size."""
  fan_in = fan_in_of(variable)
  shape = tuple(variable.shape)
  n_out = -fan_in[-1] - 1
  size_in = math.prod(shape[len(shape) - n_out - len(fan_in) : len(shape) - n_out])
  size_out = math.prod(shape[len(shape) - n_out :])
  if rank > min(size_in, size_out):
    raise ConfigError(f"peft: rank {rank} is larger than the adapted dimensions of {path} ({size_in} in, {size_out} out)")
