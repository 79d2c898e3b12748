"""The `implementation=` switch shared by every op.

An op is written once against three callables with the same operands: `xla(*args)` (plain
XLA), `tpu(*args, interpret)` (Mosaic TPU kernel) and `gpu(*args, interpret)` (Triton kernel).
`select` turns an implementation name into one function of the operands. Where it has a choice
it uses `jax.lax.platform_dependent`, so the platform is chosen when the function is *lowered*,
not when it is traced: one jitted function runs the XLA path on CPU, the Mosaic kernel on TPU
and the Triton kernel on CUDA, and `jax.export(..., platforms=["tpu"])` on a CPU-only machine
lowers the real Mosaic kernel rather than the CPU fallback.

Implementation names:

* `None` (auto): the kernel on the platforms in `AUTO_KERNEL_PLATFORMS`, XLA elsewhere.
* `"xla"`: the XLA implementation everywhere.
* `"pallas"`: Mosaic on TPU, Triton on CUDA, the Mosaic kernel in interpret mode elsewhere
  (so `"pallas"` on CPU runs the kernel in interpret mode).
* `"pallas_tpu"` / `"pallas_gpu"`: that one kernel, compiled on its own platform and
  interpreted on any other; the tests use these to check both kernels on CPU.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import jax

# Platforms where implementation=None runs the Pallas kernel. TPU: the Mosaic kernels compile
# with libtpu for a real topology (tests/pallas_kernels/test_tpu_aot.py). CUDA: the Triton
# kernels lower to Triton IR and pass in interpret mode, but have not yet been compiled or
# timed on a GPU; add "cuda" once benchmarks/kernels.py on an H100 shows them correct and
# faster than XLA. "pallas" selects them explicitly meanwhile.
AUTO_KERNEL_PLATFORMS: tuple[str, ...] = ("tpu",)

Implementation = Literal["xla", "pallas", "pallas_tpu", "pallas_gpu"] | None
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "pallas", "pallas_tpu", "pallas_gpu")


def check_implementation(implementation: Any) -> None:
  """Raise ValueError for an unknown implementation name."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be None or one of {IMPLEMENTATIONS}; got {implementation!r}"
    )


def select(
    implementation: Implementation,
    *,
    xla: Callable[..., Any],
    tpu: Callable[..., Any],
    gpu: Callable[..., Any],
) -> Callable[..., Any]:
  """One function of the operands that runs the named implementation.

  Args:
    implementation: see the module docstring.
    xla: `xla(*operands)`, the XLA implementation.
    tpu: `tpu(*operands, interpret=bool)`, the Mosaic TPU kernel.
    gpu: `gpu(*operands, interpret=bool)`, the Triton kernel.

  Returns:
    `fn(*operands)`; operands must be arrays (bind static arguments beforehand).
  """
  check_implementation(implementation)
  if implementation == "xla":
    return xla

  def kernel(fn: Callable[..., Any], interpret: bool) -> Callable[..., Any]:
    return functools.partial(fn, interpret=interpret)

  compiled_tpu, compiled_gpu = kernel(tpu, False), kernel(gpu, False)
  branches: dict[str, Callable[..., Any]]
  if implementation is None:
    branches = dict(tpu=compiled_tpu, cuda=compiled_gpu, default=xla)
    branches = {p: fn for p, fn in branches.items() if p in (*AUTO_KERNEL_PLATFORMS, "default")}
  elif implementation == "pallas":
    branches = dict(tpu=compiled_tpu, cuda=compiled_gpu, default=kernel(tpu, True))
  elif implementation == "pallas_tpu":
    branches = dict(tpu=compiled_tpu, default=kernel(tpu, True))
  else:  # "pallas_gpu"
    branches = dict(cuda=compiled_gpu, default=kernel(gpu, True))

  def run(*operands: Any) -> Any:
    return jax.lax.platform_dependent(*operands, **branches)

  return run
