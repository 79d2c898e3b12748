"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE model initialised from a dense one.

Every MoE layer's experts start as copies of that layer's dense MLP; the router is fresh
(its random init), the DeepSeek-V3 selection bias zero, shared experts fresh with a zero output
projection; attention, norms, embeddings, the head and the layers that stay dense are copied.
So at step 0 each MoE layer computes sum_k w_k * MLP(x) = MLP(x) whenever the combine weights
of a token sum to 1 (softmax or sigmoid router with `renormalize`, `route_scale` 1, dropless):
the upcycled model is the dense model. `function_preserved` says whether a config is such.

  upcycle(dense_model, moe_cfg) -> Transformer            (Python)
  jaxlm convert upcycle DENSE_RUN MOE_EXPERIMENT --run-dir OUT   (a run directory at step 0;
                                                           `jaxlm train MOE_EXPERIMENT --run-dir OUT` continues it)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.layers.experts import NAMES
from jaxlm.models.build import build, layer_trees, set_layer_trees, update_from_pure_dict
from jaxlm.models.transformer import Transformer

# ModelConfig fields an upcycled model may change; every other field must match the dense model.
FREE_FIELDS = ("ffn", "first_k_dense", "ffn_every", "moe", "soft_moe", "scan_layers", "remat", "attention_impl", "dtype", "param_dtype")


def check_compatible(dense: ModelConfig, moe: ModelConfig) -> None:
  """Raise ConfigError naming the first field that prevents copying `dense` into `moe`."""
  if any(k != "dense" for k in dense.ffn_kinds):
    raise ConfigError(f"upcycle: the source model must be dense in every layer, got FFN kinds {dense.ffn_kinds}")
  if "moe" not in moe.ffn_kinds:
    raise ConfigError("upcycle: the target model has no MoE layer (set model.ffn=moe)")
  for f in dataclasses.fields(ModelConfig):
    if f.name not in FREE_FIELDS and getattr(dense, f.name) != getattr(moe, f.name):
      raise ConfigError(f"upcycle: model.{f.name} is {getattr(moe, f.name)!r} but the dense model has {getattr(dense, f.name)!r}")
  if moe.moe.d_ff_expert not in (0, dense.d_ff):
    raise ConfigError(f"upcycle: model.moe.d_ff_expert ({moe.moe.d_ff_expert}) must equal the dense model's d_ff ({dense.d_ff}) (or 0)")


def function_preserved(cfg: ModelConfig) -> bool:
  """Whether an upcycled model of this config computes the dense model's function at step 0."""
  m = cfg.moe
  return m.router in ("softmax_topk", "sigmoid_bias") and m.renormalize and m.route_scale == 1.0 and m.mode == "dropless"


def _like(src: Any, dst: Any) -> Any:
  """`src` values in `dst`'s dtypes (and shardings, when dst's are arrays)."""

  def one(s, d):
    s = jnp.asarray(s, d.dtype)
    return jax.device_put(s, d.sharding) if isinstance(d, jax.Array) else s

  return jax.tree.map(one, src, dst)


def moe_state_from_dense(dense_state: dict, dense_cfg: ModelConfig, moe_state: dict, moe_cfg: ModelConfig, moe_ffn: Callable[[dict, dict], dict]) -> dict:
  """The freshly initialised `moe_state` with the dense model's weights copied in: everything but
  the MoE layers' FFNs as is, and each MoE layer's FFN from `moe_ffn(dense_ffn, fresh_moe_ffn)`
  (upcycling copies the MLP into every expert, EMoE splits it). The caller checks the configs."""
  src, dst = layer_trees(dense_state, dense_cfg), layer_trees(moe_state, moe_cfg)
  out = []
  for i, (s, d) in enumerate(zip(src, dst)):
    new = {k: _like(v, d[k]) for k, v in s.items() if k != "ffn"}
    new["ffn"] = _like(s["ffn"], d["ffn"]) if moe_cfg.layer_ffn(i) == "dense" else moe_ffn(s["ffn"], d["ffn"])
    out.append(new)
  result = dict(moe_state)
  for k in dense_state:
    if k not in ("blocks", "prefix", "units"):
      result[k] = _like(dense_state[k], moe_state[k])
  set_layer_trees(result, moe_cfg, out)
  return result


def upcycle_state(dense_state: dict, dense_cfg: ModelConfig, moe_state: dict, moe_cfg: ModelConfig) -> dict:
  """Pure-dict version: the freshly initialised `moe_state` with the dense weights copied in."""
  check_compatible(dense_cfg, moe_cfg)
  e = moe_cfg.moe.n_experts

  def copies(s: dict, d: dict) -> dict:
    ffn = dict(d)  # fresh router (and bias, jitter state, shared experts)
    ffn["experts"] = {name: _like(jnp.broadcast_to(jnp.asarray(s[name])[None], (e,) + tuple(jnp.shape(s[name]))), d["experts"][name]) for name in NAMES}
    if "shared" in ffn and ffn["shared"] is not None:
      ffn["shared"] = dict(ffn["shared"], w_down=jnp.zeros_like(ffn["shared"]["w_down"]))  # contributes 0 at step 0
    return ffn

  return moe_state_from_dense(dense_state, dense_cfg, moe_state, moe_cfg, copies)


def upcycle(dense: Transformer, moe_cfg: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """An MoE Transformer of `moe_cfg` whose experts are copies of `dense`'s MLPs (fresh routers)."""
  check_compatible(dense.cfg, moe_cfg)
  model = build(moe_cfg, mesh, seed=seed)
  update_from_pure_dict(model, upcycle_state(nnx.to_pure_dict(nnx.state(dense)), dense.cfg, nnx.to_pure_dict(nnx.state(model)), moe_cfg))
  return model


def upcycle_run(dense_run: Path, exp: Experiment, out_dir: Path, *, step: int | None = None) -> dict[str, Any]:
  """Write `out_dir` as a run of `exp` at step 0 whose model is the upcycled dense checkpoint."""
  from jaxlm.train.run import check_empty_run_dir, load_for_inference, write_initial_run

  dense_run, out_dir = Path(dense_run), Path(out_dir)
  check_empty_run_dir(out_dir)
  dense_exp, dense_model, _, dense_step = load_for_inference(dense_run, step=step, mesh_cfg=exp.mesh, merged=True)
  check_compatible(dense_exp.model, exp.model)

  def fill(model: nnx.Module) -> None:
    update_from_pure_dict(model, upcycle_state(nnx.to_pure_dict(nnx.state(dense_model)), dense_exp.model, nnx.to_pure_dict(nnx.state(model)), exp.model))

  write_initial_run(out_dir, exp, fill, tokenizer_from=dense_run)
  return {"dense_run": str(dense_run), "dense_step": dense_step, "run_dir": str(out_dir), "function_preserved": function_preserved(exp.model)}
