"""One small registry with namespaces: experiments, model presets, FFN kinds, routers, data sources.

    FFN = Registry("ffn")

    @FFN.register("dense")
    class MLP(nnx.Module): ...

    FFN.get("dense")  # -> MLP; a miss raises ConfigError listing the known keys.

Registering a name twice raises: two modules silently fighting over one key is a bug.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from jaxlm.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
  """A named mapping from string keys to objects (classes, functions, factories)."""

  def __init__(self, namespace: str):
    self.namespace = namespace
    self._entries: dict[str, T] = {}

  def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
    """Register `obj` under `name`; usable as a decorator when `obj` is omitted."""

    def add(o: T) -> T:
      if name in self._entries and self._entries[name] is not o:
        raise ValueError(f"{self.namespace} registry: {name!r} is already registered")
      self._entries[name] = o
      return o

    return add if obj is None else add(obj)

  def get(self, name: str) -> T:
    try:
      return self._entries[name]
    except KeyError:
      raise ConfigError(f"unknown {self.namespace} {name!r}; known: {', '.join(sorted(self._entries))}") from None

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._entries))

  def keys(self) -> list[str]:
    return sorted(self._entries)
