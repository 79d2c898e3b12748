"""Orbax checkpoints: params, non-trainable state, optimizer state, data-iterator state and the
experiment config, saved together under one step so a resumed run continues exactly.

Layout of `<run_dir>/checkpoints/<step>/`:
  params/     trainable variables (what `jaxlm generate` and adapters read)
  rest/       non-trainable model variables
  opt_state/  optimizer state and step counter
  data/       grain iterator state, one JSON file per process
  config/     the experiment, as JSON
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm.config import CheckpointConfig


class _IteratorSnapshot:
  """The iterator's state captured now (the live iterator moves on while an async save runs)."""

  def __init__(self, iterator: Any):
    self._state = json.dumps(iterator.get_state()).encode()

  def get_state(self) -> bytes:
    return self._state


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each array's sharding: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """A thin layer over `ocp.CheckpointManager` with jaxlm's items."""

  def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig(), *, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep,
        enable_async_checkpointing=cfg.async_save,
        create=not read_only,
        read_only=read_only,
    )
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, params: Any, rest: Any, opt_state: Any, data_iterator: Any, config: dict) -> None:
    items = {
        "params": ocp.args.StandardSave(params),
        "opt_state": ocp.args.StandardSave({"step": step, "opt_state": opt_state}),
        "config": ocp.args.JsonSave(config),
    }
    if jax.tree.leaves(rest):
      items["rest"] = ocp.args.StandardSave(rest)
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, *, params: Any, rest: Any, opt_state: Any | None, data_iterator: Any | None) -> dict[str, Any]:
    """Restore into the layout (shapes, dtypes, shardings) of the given live trees."""
    items: dict[str, Any] = {"params": ocp.args.StandardRestore(_abstract(params))}
    if jax.tree.leaves(rest):
      items["rest"] = ocp.args.StandardRestore(_abstract(rest))
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore({"step": 0, "opt_state": _abstract(opt_state)})
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return {k: out[k] for k in items}

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
