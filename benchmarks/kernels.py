"""Kernel benchmarks: each pallas_kernels op against its XLA baseline, at the named shapes.

Figures (goals from issue 6), each a ratio measured in one interleaved run:

* gmm: grouped-matmul TFLOP/s / TFLOP/s of one dense matmul with the same FLOPs
  (goal >= 0.75), with `jax.lax.ragged_dot` shown beside it; also tgmm.
* merge: achieved GB/s of the merge (read E*D*F, write S*D*F) / the device's HBM peak
  (goal >= 0.7), with the XLA einsum beside it; also merged_matmul vs merge + einsum.
* routing: time of the fused routing op / time of the XLA reference (goal <= 0.5).

Runs on whatever backend jax finds. On TPU/GPU it times implementation="pallas" (the Mosaic
or Triton kernel) against the XLA baselines. On a CPU the kernels only exist in interpret mode,
so it times implementation="xla" there, the accelerator figures stay open, and the file records
interpret-mode correctness at the "tiny" shapes and the TPU/CUDA lowering checks instead.
Writes benchmarks/results/kernels.json.

Usage: python -m benchmarks.run kernels [--rounds=N] [--shapes=name,name]
"""

from __future__ import annotations

import argparse
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from benchmarks.common import interleaved_times
from benchmarks.common import write_result
from pallas_kernels import testing

GOALS = {
    "gmm_tflops_over_dense": ">= 0.75",
    "merge_gbps_over_hbm_peak": ">= 0.7",
    "routing_time_over_xla": "<= 0.5",
}

# Peak HBM bandwidth in bytes/s by device kind (vendor figures); matched by substring.
HBM_PEAK = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM (HBM3)
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,
    "TPU v5p": 2.765e12,
    "TPU v5 lite": 0.819e12,
    "TPU v6 lite": 1.64e12,
    "TPU v4": 1.2e12,
}


def hbm_peak(device_kind: str) -> float | None:
  for key, peak in HBM_PEAK.items():
    if key in device_kind:
      return peak
  return None


def _ready(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
  """A no-argument callable that runs jit(fn)(*args) and blocks until the result is ready."""
  jitted = jax.jit(fn)
  return lambda: jax.block_until_ready(jitted(*args))


def _operands(shape_key: int, *shapes_dtypes):
  keys = jax.random.split(jax.random.key(shape_key), len(shapes_dtypes))
  return [testing.normal(k, s, d) for k, (s, d) in zip(keys, shapes_dtypes)]


def bench_gmm(
    name: str, shape: testing.GmmShape, dtype: Any, rounds: int, impl: str
) -> dict[str, Any]:
  m, k, n, e = shape.m, shape.k, shape.n, shape.experts
  x, w, dy = _operands(0, ((m, k), dtype), ((e, k, n), dtype), ((m, n), dtype))
  gs = jnp.full((e,), m // e, jnp.int32).at[0].add(m - (m // e) * e)  # balanced routing
  times = interleaved_times(
      {
          "gmm": _ready(
              lambda x, w, g: pk.grouped_matmul(x, w, g, implementation=impl), x, w, gs
          ),
          "ragged_dot": _ready(jax.lax.ragged_dot, x, w, gs),
          "dense": _ready(lambda x, w: x @ w[0], x, w),
          "tgmm": _ready(
              lambda x, d, g: pk.transposed_grouped_matmul(x, d, g, implementation=impl),
              x, dy, gs,
          ),
          "tgmm_xla": _ready(
              lambda x, d, g: pk.transposed_grouped_matmul(x, d, g, implementation="xla"),
              x, dy, gs,
          ),
          "dense_t": _ready(lambda x, d: x.T @ d, x, dy),
      },
      rounds=rounds,
  )
  tflops = {key: 2 * m * k * n / t / 1e12 for key, t in times.items()}
  return {
      "shape": name, "m": m, "k": k, "n": n, "experts": e, "dtype": jnp.dtype(dtype).name,
      "group_sizes": "balanced",
      "ms": {key: t * 1e3 for key, t in times.items()},
      "tflops": tflops,
      "gmm_over_dense": tflops["gmm"] / tflops["dense"],
      "ragged_dot_over_dense": tflops["ragged_dot"] / tflops["dense"],
      "tgmm_over_dense": tflops["tgmm"] / tflops["dense_t"],
      "tgmm_xla_over_dense": tflops["tgmm_xla"] / tflops["dense_t"],
  }


def bench_merge(
    name: str, shape: testing.MergeShape, dtype: Any, rounds: int, peak: float | None, impl: str
) -> dict[str, Any]:
  s, e, d, f, l = shape.segments, shape.experts, shape.d, shape.f, shape.length
  experts, x = _operands(1, ((e, d, f), dtype), ((s, l, d), dtype))
  weights = jax.nn.softmax(testing.normal(jax.random.key(2), (s, e), jnp.float32), axis=-1)
  times = interleaved_times(
      {
          "merge": _ready(
              lambda w, x: pk.merge_experts(w, x, implementation=impl), weights, experts
          ),
          "xla_einsum": _ready(
              lambda w, x: jnp.einsum(
                  "se,edf->sdf", w.astype(x.dtype), x, preferred_element_type=jnp.float32
              ).astype(x.dtype),
              weights, experts,
          ),
          "merged_matmul": _ready(
              lambda x, w, e: pk.merged_matmul(x, w, e, implementation=impl), x, weights, experts
          ),
          "xla_merge_then_einsum": _ready(pk.merged_matmul_reference, x, weights, experts),
      },
      rounds=rounds,
  )
  itemsize = jnp.dtype(dtype).itemsize
  merge_bytes = (e + s) * d * f * itemsize + s * e * 4
  gbps = {key: merge_bytes / times[key] / 1e9 for key in ("merge", "xla_einsum")}
  return {
      "shape": name, "segments": s, "experts": e, "d": d, "f": f, "length": l,
      "dtype": jnp.dtype(dtype).name,
      "ms": {key: t * 1e3 for key, t in times.items()},
      "merge_bytes": merge_bytes,
      "gbps": gbps,
      "hbm_peak_gbps": None if peak is None else peak / 1e9,
      "merge_over_peak": None if peak is None else gbps["merge"] * 1e9 / peak,
      "xla_einsum_over_peak": None if peak is None else gbps["xla_einsum"] * 1e9 / peak,
      "merged_matmul_time_over_xla": times["merged_matmul"] / times["xla_merge_then_einsum"],
  }


def bench_routing(
    name: str, shape: testing.RoutingShape, dtype: Any, rounds: int, impl: str
) -> dict[str, Any]:
  (logits,) = _operands(3, ((shape.tokens, shape.experts), dtype))
  bias = jnp.zeros((shape.experts,), jnp.float32) if shape.mode == "sigmoid" else None
  kw = dict(mode=shape.mode, bias_e=bias)
  times = interleaved_times(
      {
          "routing": _ready(
              lambda x: pk.topk_route(x, shape.k, implementation=impl, **kw), logits
          ),
          "xla_reference": _ready(lambda x: pk.topk_route_reference(x, shape.k, **kw), logits),
      },
      rounds=rounds,
  )
  return {
      "shape": name, "tokens": shape.tokens, "experts": shape.experts, "k": shape.k,
      "mode": shape.mode, "dtype": jnp.dtype(dtype).name,
      "ms": {key: t * 1e3 for key, t in times.items()},
      "routing_over_xla": times["routing"] / times["xla_reference"],
  }


def interpret_correctness() -> dict[str, Any]:
  """Each op under implementation="pallas" (interpret mode on CPU) vs its reference, "tiny"."""
  out: dict[str, Any] = {}
  r = testing.ROUTING_SHAPES["tiny"]
  (logits,) = _operands(4, ((r.tokens, r.experts), jnp.float32))
  got, want = pk.topk_route(logits, r.k, implementation="pallas"), pk.topk_route_reference(
      logits, r.k
  )
  out["routing"] = {
      "ids_equal": bool(np.array_equal(got.expert_ids, want.expert_ids)),
      "sort_perm_equal": bool(np.array_equal(got.sort_perm, want.sort_perm)),
      "max_abs_err_weights": float(jnp.max(jnp.abs(got.weights - want.weights))),
  }
  g = testing.GMM_SHAPES["tiny"]
  x, w, dy = _operands(5, ((g.m, g.k), jnp.float32), ((g.experts, g.k, g.n), jnp.float32),
                       ((g.m, g.n), jnp.float32))
  gs = testing.random_group_sizes(jax.random.key(6), g.m, g.experts, filled=g.m - 17, empty=1)
  out["gmm"] = {
      "max_abs_err": float(jnp.max(jnp.abs(
          pk.grouped_matmul(x, w, gs, implementation="pallas")
          - pk.grouped_matmul_reference(x, w, gs)))),
      "tgmm_max_abs_err": float(jnp.max(jnp.abs(
          pk.transposed_grouped_matmul(x, dy, gs, implementation="pallas")
          - pk.transposed_grouped_matmul_reference(x, dy, gs)))),
  }
  s = testing.MERGE_SHAPES["tiny"]
  experts, xs = _operands(7, ((s.experts, s.d, s.f), jnp.float32),
                          ((s.segments, s.length, s.d), jnp.float32))
  weights = jax.nn.softmax(testing.normal(jax.random.key(8), (s.segments, s.experts),
                                          jnp.float32), axis=-1)
  out["merge"] = {
      "max_abs_err": float(jnp.max(jnp.abs(
          pk.merge_experts(weights, experts, implementation="pallas")
          - pk.merge_experts_reference(weights, experts)))),
      "merged_matmul_max_abs_err": float(jnp.max(jnp.abs(
          pk.merged_matmul(xs, weights, experts, implementation="pallas")
          - pk.merged_matmul_reference(xs, weights, experts)))),
  }
  out["note"] = (
      "implementation='pallas' off TPU/GPU runs the Mosaic TPU kernel in interpret mode; the"
      " full suite (both kernels, f32/bf16, VJPs, ragged groups) is tests/pallas_kernels."
  )
  return out


def lowering_checks() -> dict[str, dict[str, str]]:
  """Export every op (forward and VJP) for TPU and CUDA; "ok (n kernels)" or the error."""
  report: dict[str, dict[str, str]] = {"tpu": {}, "cuda": {}}
  for platform in report:
    for case, (fn, args, launches) in testing.lowering_cases().items():
      try:
        text = testing.export_for(platform, fn, args).mlir_module()
        found = text.count(testing.KERNEL_CALL[platform])
        report[platform][case] = (
            f"ok ({found} kernels)" if found == launches
            else f"lowered, but {found} kernels where {launches} were expected"
        )
      except Exception as ex:  # noqa: BLE001  (a report, not a test: record and go on)
        report[platform][case] = f"failed: {type(ex).__name__}: {str(ex).splitlines()[0][:200]}"
  return report


def _selected(shapes: dict[str, Any], wanted: list[str] | None, on_cpu: bool) -> dict[str, Any]:
  if wanted:
    return {k: v for k, v in shapes.items() if k in wanted}
  if on_cpu:
    return {k: v for k, v in shapes.items() if k == "cpu"}
  return {k: v for k, v in shapes.items() if k != "tiny"}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="benchmarks.kernels")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--shapes", type=lambda s: s.split(","), default=None)
  args, _ = parser.parse_known_args(argv)

  backend = jax.default_backend()
  device_kind = jax.devices()[0].device_kind
  on_cpu = backend == "cpu"
  rounds = args.rounds or (5 if on_cpu else 20)
  dtype = jnp.float32 if on_cpu else jnp.bfloat16  # XLA:CPU has no fast bf16 matmul
  peak = hbm_peak(device_kind)
  impl = "xla" if on_cpu else "pallas"

  results: dict[str, Any] = {
      "goals": GOALS,
      "timed_implementation": {
          "tpu": "pallas (Mosaic TPU)", "gpu": "pallas (Triton)"
      }.get(backend, "xla (the kernels run only in interpret mode here)"),
      "status": (
          "CPU only: the timings are of the XLA paths; the GPU/TPU kernel figures are still"
          " open. Interpret-mode correctness and the TPU/CUDA lowering checks are recorded"
          " instead."
          if on_cpu else f"measured on {device_kind}"
      ),
      "gmm": [], "merge": [], "routing": [],
  }
  benches = [
      ("gmm", testing.GMM_SHAPES, lambda n, s: bench_gmm(n, s, dtype, rounds, impl)),
      ("merge", testing.MERGE_SHAPES, lambda n, s: bench_merge(n, s, dtype, rounds, peak, impl)),
      ("routing", testing.ROUTING_SHAPES, lambda n, s: bench_routing(n, s, dtype, rounds, impl)),
  ]
  for op, shapes, bench in benches:
    for name, shape in _selected(shapes, args.shapes, on_cpu).items():
      print(f"{op} {name}", flush=True)
      try:
        results[op].append(bench(name, shape))
      except Exception:  # noqa: BLE001  (one failing kernel must not lose the other figures)
        results[op].append({"shape": name, "failed": traceback.format_exc(limit=4)})
  if on_cpu:
    try:
      results["interpret_correctness"] = interpret_correctness()
    except Exception:  # noqa: BLE001
      results["interpret_correctness"] = {"failed": traceback.format_exc(limit=3)}
  results["lowering"] = lowering_checks()
  write_result("kernels", results)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
