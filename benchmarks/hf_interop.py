"""Hugging Face import: host memory and speed on the ~100M config, logit agreement per family.

  import_rss_ratio    (peak host RSS during `hf.load_model` - RSS before it) / checkpoint bytes,
                      for dense_100m written as a float32 Llama checkpoint in 5 shards. Goal <= 1.5
                      (tensors stream one at a time; two full copies would read 2.0). The absolute
                      peak, with the JAX runtime's own memory, is recorded beside it.
  load_vs_read        time of `hf.load_model` / time to read every tensor with safetensors alone,
                      each in a fresh process with the files in the page cache, alternated.
  max_logit_diff      per family, max |logits - transformers' logits| in float32 on 512 random
                      tokens of a tiny random model (jaxlm.interop.hf.tiny); needs torch.

Usage: python -m benchmarks.hf_interop [--quick]   (quick: skip the 100M checkpoint)
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import write_result

LOAD = r"""
import json, sys, time
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()  # the runtime is up: its memory is the baseline
from jaxlm.interop import hf
def rss():
  return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
t = time.perf_counter()
model = hf.load_model(sys.argv[1], show_progress=False)
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
seconds = time.perf_counter() - t
# VmHWM: this process image's peak (ru_maxrss would carry over the parent's RSS at fork)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "rss_before": before, "rss_peak": peak, "rss_after": rss()}))
"""

READ = r"""
import json, sys, time
from safetensors import safe_open
from pathlib import Path
t = time.perf_counter()
n = 0
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
  with safe_open(str(f), "np") as h:
    for k in h.keys():
      n += h.get_tensor(k).nbytes
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": n}))
"""


def _run(code: str, path: Path) -> dict:
  out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def import_figures(rounds: int = 3) -> dict:
  import jax

  from jaxlm import experiments
  from jaxlm.interop import hf
  from jaxlm.models import build

  cfg = dataclasses.replace(experiments.load("dense_100m").model, dtype="float32", param_dtype="float32")
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "llama_100m"
    model = build(cfg)
    hf.save(model, path, model_type="llama", max_shard_bytes=90 << 20, show_progress=False)
    del model
    jax.clear_caches()
    ckpt = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    shards = len(list(path.glob("*.safetensors")))
    _run(READ, path)  # page cache warm for both
    loads, reads = [], []
    for _ in range(rounds):
      loads.append(_run(LOAD, path))
      reads.append(_run(READ, path))
  load_s = statistics.median(r["seconds"] for r in loads)
  read_s = statistics.median(r["seconds"] for r in reads)
  delta = max(r["rss_peak"] - r["rss_before"] for r in loads)
  return {
      "checkpoint_bytes": ckpt,
      "shards": shards,
      "import_rss_ratio": delta / ckpt,
      "import_peak_rss_ratio_with_runtime": max(r["rss_peak"] for r in loads) / ckpt,
      "load_seconds": load_s,
      "read_seconds": read_s,
      "load_vs_read": load_s / read_s,
      "goal_import_rss_ratio": 1.5,
  }


def logit_diffs() -> dict:
  import jax.numpy as jnp
  import numpy as np

  from jaxlm.interop import hf
  from jaxlm.interop.hf import tiny

  out = {}
  tokens = np.random.default_rng(0).integers(3, 256, (1, 512))
  for name in tiny.CONFIGS:
    with tempfile.TemporaryDirectory() as tmp:
      ref = tiny.logits(tiny.make(name, tmp), tokens)
      ours, _ = hf.load_model(tmp, show_progress=False)(jnp.asarray(tokens))
      out[name] = float(np.abs(np.asarray(ours) - ref).max())
  return out


def main(argv: list[str]) -> None:
  result: dict = {}
  if "--quick" not in argv:
    result["import_100m"] = import_figures()
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    result["max_logit_diff"] = logit_diffs()
  except ImportError:
    result["max_logit_diff"] = "skipped: pip install 'jaxlm[hf]'"
  write_result("hf_interop", result)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main(sys.argv[1:])
