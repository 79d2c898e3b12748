"""One process of the multi-host test: a few train steps on fixed global batches.

  python tests/multihost_worker.py OUT.json [COORDINATOR NUM_PROCESSES PROCESS_ID]

Each process builds the same global batch and hands jax only the rows its devices hold, so
a 2-process x 2-device run and a 1-process x 4-device run must produce the same numbers. Several
processes also checkpoint after step 3 (into OUT.ckpt/) and resume from it in a fresh state, as a
restarted job would; one process trains straight through.
"""

import json
import sys

import jax
import numpy as np


def main(argv):
  out = argv[0]
  if len(argv) > 1:
    from jaxlm import distributed

    assert distributed.initialize(argv[1], int(argv[2]), int(argv[3]))
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "train"))
  from test_step import EXP, batch  # the single-process sharded test's experiment and batches

  from jaxlm.train import loop

  assert jax.device_count() == 4
  import dataclasses

  from jaxlm.config import MeshConfig

  from jaxlm.train.checkpoint import Checkpointer

  exp = dataclasses.replace(EXP, mesh=MeshConfig(data=2, fsdp=2))
  setup = loop.prepare(exp)
  state, losses = setup.state, []

  def train(state, steps):
    with jax.set_mesh(setup.mesh):
      for i in steps:
        b = batch(i)
        g = {k: jax.make_array_from_callback(v.shape, setup.batch_sharding, lambda idx, v=v: v[idx]) for k, v in b.items()}
        state, metrics = setup.train_step(state, g)
        losses.append(float(metrics["loss"]))
    return state

  state = train(state, range(3))
  if jax.process_count() > 1:  # checkpoint, then restore into a fresh (abstract) state as a restarted job would
    ckpt = Checkpointer(out + ".ckpt", exp.checkpoint)
    ckpt.save(3, params=state.params, rest=state.rest, opt_state=state.opt_state, data_iterator=None, config={})
    ckpt.wait()
    for x in jax.tree.leaves(state):
      x.delete()
    state, start = loop.resume(loop.prepare(exp, abstract=True), ckpt, None)
    assert start == 3
    ckpt.close()
  state = train(state, range(3, 5))
  norm = float(jax.jit(lambda p: sum(jax.numpy.sum(x.astype(np.float32) ** 2) for x in jax.tree.leaves(p)))(state.params))
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump({"losses": losses, "param_sq_norm": norm, "processes": jax.process_count()}, f)


if __name__ == "__main__":
  main(sys.argv[1:])
