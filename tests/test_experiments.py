"""Every experiment file (and each of its variants) builds: eval_shape on a mesh of its size."""

import inspect
import math

import jax
import pytest
from flax import nnx

from jaxlm import experiments, sharding
from jaxlm.config import Experiment
from jaxlm.experiments import REPO_EXPERIMENTS
from jaxlm.models import abstract_model
from jaxlm.report import report


def variants():
  out = []
  for path in sorted(REPO_EXPERIMENTS.glob("*.py")):
    module = experiments._import_file(path)
    for name, fn in vars(module).items():
      if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_") and not inspect.signature(fn).parameters:
        out.append(f"{path.stem}:{name}")
  return out


@pytest.mark.parametrize("name", variants())
def test_experiment_builds_on_its_mesh(name):
  exp = experiments.load(name)
  assert isinstance(exp, Experiment)
  n_devices = exp.mesh.devices or 8
  mesh_shape = exp.mesh.shape(n_devices)
  rules = sharding.make_rules(exp.mesh.rules)
  state = nnx.state(abstract_model(exp.model), nnx.Param)
  specs = sharding.state_specs(state, mesh_shape, rules)
  if mesh_shape["fsdp"] * mesh_shape["tensor"] > 1:
    # With a parameter-sharding axis, the rule table must split every large parameter; a
    # replicated one would cost a full copy per device. (Pure expert-parallel meshes replicate
    # the dense weights by design.)
    for path, var, spec in zip(
        jax.tree_util.tree_leaves_with_path(state),
        jax.tree.leaves(state),
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
    ):
      axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
      if var.size >= 2**20:
        assert math.prod(mesh_shape[a] for a in axes) > 1, f"{jax.tree_util.keystr(path[0])} is replicated"
  r = report(exp, n_devices)
  # Only routed or merged experts make parameters inactive: dense models are all active.
  assert (r["params_active"] < r["params_total"]) == any(k != "dense" for k in exp.model.ffn_kinds)
  assert r["params_active"] > 0

def test_real_scale_files_have_their_advertised_size():
  r = report(experiments.load("dense_1b_v5p64"))
  assert r["devices"] == 32 and 1.0e9 < r["params_total"] < 1.2e9
  r = report(experiments.load("llama3_8b_8xh100"))
  assert r["devices"] == 8 and 7.9e9 < r["params_total"] < 8.1e9
  # FSDP over 8 GPUs: bf16-compute model with f32 master weights and Adam fits in 80 GB.
  assert sum(r["memory_per_device"].values()) < 80 * 2**30
