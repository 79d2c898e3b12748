"""`make bench`: run every benchmark module (or those named) and write benchmarks/results/*.json.

Each benchmark is a module `benchmarks/<name>.py` with a `main(argv: list[str]) -> None` that
calls `benchmarks.common.write_result`. Usage: python -m benchmarks.run [name ...]
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

SKIP = {"run", "common"}


def available() -> list[str]:
  here = Path(__file__).parent
  return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in SKIP)


def main(argv: list[str]) -> int:
  names = [a for a in argv if not a.startswith("-")] or available()
  unknown = sorted(set(names) - set(available()))
  if unknown:
    print(f"bench: unknown benchmark(s) {unknown}; known: {available()}", file=sys.stderr)
    return 2
  for name in names:
    print(f"== {name}")
    importlib.import_module(f"benchmarks.{name}").main([a for a in argv if a.startswith("-")])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
