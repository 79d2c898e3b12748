"""Build a model with its parameters sharded at creation, never materialised unsharded.

`eval_shape` gives the parameter shapes and logical axes; the rule table turns those into
shardings; a jit with those output shardings runs the initialisers so that every device only
ever computes and holds its own shard.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.models.transformer import Transformer


def abstract_model(cfg: ModelConfig, *, seed: int = 0) -> Transformer:
  """The model with ShapeDtypeStructs for values: shapes, dtypes and logical axes, no memory.

  (`jax.eval_shape` rather than `nnx.eval_shape`: the latter reads the logical axis names as
  mesh axes when a mesh is set.)
  """
  graphdef = None

  def init():
    nonlocal graphdef
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
    return state

  state = jax.eval_shape(init)
  return nnx.merge(graphdef, state)


def build(cfg: ModelConfig, mesh: Mesh | None = None, *, seed: int = 0, rules: Mapping[str, Any] | None = None) -> Transformer:
  """A `Transformer` with parameters created directly in their sharded layout on `mesh`."""
  if mesh is None:
    return Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, abstract_state = nnx.split(abstract_model(cfg, seed=seed))
  shardings = sharding.state_shardings(abstract_state, mesh, rules)

  @jax.jit(out_shardings=shardings)
  def init():
    return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))

  with jax.set_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Total parameters, parameters used per token (MoE: only the routed top-k), embeddings."""
  from jaxlm.layers.ffn import FFN

  state = nnx.state(abstract_model(cfg), nnx.Param)
  total = sum(x.size for x in jax.tree.leaves(state))
  inactive = sum(FFN.get(k).inactive_params(cfg) for k in cfg.ffn_kinds)
  embed = cfg.vocab_size * cfg.d_model
  return {"total": total, "active": total - inactive, "embedding": embed}


def layer_trees(tree: dict, cfg: ModelConfig) -> list[dict]:
  """Per-layer parameter trees, in layer order, of the pure-dict state of a model of `cfg`.

  Unrolled: `blocks[i]`. With `scan_layers`: the dense prefix `prefix[i]` (i < first_k_dense),
  then layer first_k_dense + u * ffn_every + j is row u of the scanned unit's `units.blocks[j]`.
  """
  if not cfg.scan_layers:
    return [tree["blocks"][i] for i in range(cfg.n_layers)]
  out = [tree["prefix"][i] for i in range(cfg.first_k_dense)]
  for u in range(cfg.n_units):
    out += [jax.tree.map(lambda a: a[u], tree["units"]["blocks"][j]) for j in range(cfg.ffn_every)]
  return out


def set_layer_trees(tree: dict, cfg: ModelConfig, layers: list[dict]) -> None:
  """Write per-layer parameter trees (in layer order) into a pure-dict state; inverse of `layer_trees`."""
  if not cfg.scan_layers:
    for i, layer in enumerate(layers):
      tree["blocks"][i] = layer
    return
  k0, period = cfg.first_k_dense, cfg.ffn_every
  for i in range(k0):
    tree["prefix"][i] = layers[i]
  for j in range(period):
    tree["units"]["blocks"][j] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[k0 + u * period + j] for u in range(cfg.n_units)])


def update_from_pure_dict(model: nnx.Module, pure: dict) -> None:
  """Set `model`'s variables, in place, from a pure dict shaped like `nnx.to_pure_dict(nnx.state(model))`."""
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def load_unrolled_into_scanned(unrolled: Transformer, scanned: Transformer) -> None:
  """Copy an unrolled model's weights into a `scan_layers` model of the same config, in place."""
  src = nnx.to_pure_dict(nnx.state(unrolled))
  dst = nnx.to_pure_dict(nnx.state(scanned))
  set_layer_trees(dst, scanned.cfg, layer_trees(src, unrolled.cfg))
  dst.update({k: v for k, v in src.items() if k != "blocks"})
  update_from_pure_dict(scanned, dst)
