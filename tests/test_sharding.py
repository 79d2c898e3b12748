"""The rule table: first dimension wins a mesh axis, non-dividing axes are dropped, overrides checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm import sharding
from jaxlm.config import MeshConfig
from jaxlm.errors import ConfigError

MESH = {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}


def test_weight_and_activation_specs_from_one_table():
  assert sharding.spec(("embed", "mlp"), (64, 128), MESH) == P("fsdp", "tensor")
  # An activation's batch takes data and fsdp first, so its embed is left unsharded.
  assert sharding.spec(("batch", "seq", "embed"), (8, 16, 64), MESH) == P(("data", "fsdp"))
  assert sharding.spec(("expert", "embed", "mlp"), (8, 64, 128), {**MESH, "expert": 2}) == P("expert", "fsdp", "tensor")


def test_axes_that_do_not_divide_are_dropped():
  assert sharding.spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), MESH) == P("fsdp")
  assert sharding.spec(("batch", "seq"), (2, 16), MESH) == P("data")  # 2 rows: only data fits


def test_rule_overrides_are_checked():
  rules = sharding.make_rules([("batch", ("data",)), ("embed", None)])
  assert sharding.spec(("embed", "mlp"), (64, 128), MESH, rules) == P(None, "tensor")
  with pytest.raises(ConfigError, match="unknown logical axis 'embd'"):
    sharding.make_rules([("embd", "fsdp")])
  with pytest.raises(ConfigError, match="unknown mesh axes"):
    sharding.make_rules([("embed", "model")])


def test_shard_is_a_no_op_without_mesh_and_constrains_under_one():
  x = jnp.ones((8, 4, 16))
  assert sharding.shard(x, "batch", "seq", "embed") is x
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: sharding.shard(x * 2, "batch", "seq", "embed"))(x)
  assert y.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(y, 2 * x)


def test_mesh_uses_every_device_with_named_axes():
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
  assert mesh.devices.size == jax.device_count()
  with pytest.raises(ConfigError, match="there are 8 devices"):
    sharding.make_mesh(MeshConfig(data=3, fsdp=1))
