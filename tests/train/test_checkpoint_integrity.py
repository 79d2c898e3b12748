"""Damaged checkpoints: each kind is detected, reported in one line, and the one before restored."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config import CheckpointConfig
from jaxlm.train.checkpoint import COMMIT_FILE, QUARANTINE, TMP_SUFFIX, Checkpointer, CheckpointError, digests

CFG = CheckpointConfig(max_to_keep=5, async_save=True)


def state(step: int) -> dict:
  """A small train-state-like tree sharded over the 8 devices. Random float32 does not compress,
  so zstd stores it raw and a flipped byte there restores without any error from Orbax."""
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))
  rng = np.random.default_rng(step)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  return {
      "params": {"w": put(rng.standard_normal((64, 512), np.float32), P(None, "fsdp")), "scale": put(jnp.full((8,), step, jnp.bfloat16), P())},
      "rest": {"counter": put(jnp.int32(step), P())},
      "opt_state": {"mu": put(rng.standard_normal((64, 512), np.float32), P("fsdp")), "count": put(jnp.int32(step), P())},
  }


def save(directory: Path, step: int) -> None:
  ckpt = Checkpointer(directory, CFG)
  ckpt.save(step, **state(step), data_iterator=None, config={"step": step})
  ckpt.wait()
  ckpt.close()


def largest_file(path: Path) -> Path:
  return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(step_dir: Path) -> None:
  f = largest_file(step_dir / "params")
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def drop_commit_marker(step_dir: Path) -> None:
  (step_dir / COMMIT_FILE).unlink()


def leave_temporary(step_dir: Path) -> None:
  """What a process killed while writing leaves behind (Orbax renames it only when done)."""
  (step_dir / COMMIT_FILE).unlink()
  step_dir.rename(step_dir.with_name(step_dir.name + TMP_SUFFIX))


def flip_byte(step_dir: Path) -> None:
  f = largest_file(step_dir / "params")
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reported",
    [
        (truncate, "cannot be read"),
        (drop_commit_marker, "no commit marker"),
        (leave_temporary, "unfinished checkpoint save"),
        (flip_byte, "does not match the digest"),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage, reported):
  directory = tmp_path / "checkpoints"
  for step in (1, 2):
    save(directory, step)
  capsys.readouterr()
  damage(directory / "2")

  ckpt = Checkpointer(directory, CFG)  # a restarted run opens the directory
  target = state(0)
  step, restored = ckpt.restore_latest(**target, data_iterator=None)
  lines = capsys.readouterr().err.strip().splitlines()

  assert step == 1
  assert len(lines) == 1 and reported in lines[0] and "2" in lines[0], lines
  for name in ("params", "rest"):
    for a, b in zip(jax.tree.leaves(restored[name]), jax.tree.leaves(state(1)[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert a.sharding == b.sharding
  if damage is not leave_temporary:
    assert (directory / QUARANTINE / "2").is_dir() and not (directory / "2").exists()
  assert not list(directory.glob(f"*{TMP_SUFFIX}*"))

  # The run goes on and writes step 2 again: nothing left behind blocks it.
  ckpt.save(2, **state(2), data_iterator=None, config={})
  ckpt.wait()
  assert ckpt.latest_step() == 2
  restored = ckpt.restore(2, **target, data_iterator=None)
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state(2)["params"]["w"]))
  ckpt.close()


def test_no_good_checkpoint_is_an_error_and_moves_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  save(directory, 1)
  flip_byte(directory / "1")
  ckpt = Checkpointer(directory, CFG)
  with pytest.raises(CheckpointError, match="no usable checkpoint.*does not match the digest"):
    ckpt.restore_latest(**state(0), data_iterator=None)
  assert (directory / "1").is_dir()
  ckpt.close()


def test_digest_sees_one_changed_word_and_ignores_the_sharding():
  x = np.random.default_rng(0).standard_normal((16, 24), np.float32)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
  d = digests({"x": jnp.asarray(x)})
  for spec in (P("a", "b"), P("b", None), P(None, "a")):
    assert digests({"x": jax.device_put(x, NamedSharding(mesh, spec))}) == d
  y = x.copy()
  y.view(np.uint32)[3, 5] ^= 1 << 7
  assert digests({"x": jnp.asarray(y)})["['x']"][0] != d["['x']"][0]
  swapped = x.copy()
  swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
  assert digests({"x": jnp.asarray(swapped)})["['x']"] != d["['x']"]
