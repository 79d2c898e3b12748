"""Test setup: eight fake CPU devices and a compilation cache, set before jax is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep test runs from writing into the user's cache; the stdlib corpus is built once per session.
os.environ.setdefault("MPLBACKEND", "Agg")
# One persistent compilation cache per test session, shared by the xdist workers and the CLI
# subprocesses (they inherit the environment): many tests build the same small models and
# steps through separate jit objects, and a hit skips XLA's compile (the suite runs ~40% faster).
# It starts empty every session, so test times stay honest.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-test-compile-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
