"""EMoE (Qiu, Huang & Fu 2023, "Emergent Mixture-of-Experts: Can Dense Pre-trained Transformers
Benefit from Emergent Modular Structures?" / "Unlocking Emergent Modularity in Large Language
Models", arXiv 2310.10908): a dense model's FFNs split into experts, with no new parameters.

Each MoE layer's dense SwiGLU FFN (w_gate [D, F], w_up [D, F], w_down [F, D]) is cut into E
experts of F/E hidden units. Hidden unit f is a key-value memory (Geva et al. 2021): its key is
the column w_gate[:, f], whose dot product with x decides through silu whether the unit fires.
The keys, normalised to unit length, are clustered by balanced k-means into E groups of exactly
F/E units; expert e holds its units' columns of w_gate and w_up and rows of w_down (in the dense
order), so the experts partition the FFN: summed over all experts they are the dense FFN.

Gating ("avg-k"): expert e's score is x . k_e with k_e the mean of its (unnormalised) keys,
i.e. the mean gate pre-activation of its units; each token takes the top-k experts and their
outputs are summed with weight 1, not weighted by a softmax: no gate parameter is learned (the
official code, github.com/qiuzh20/EMoE: `one_score_gate`, every gate 1, in the BERT/GPT-2/ViT
version; a 0/1 mask of the hidden units in the LLaMA version; the paper's learned-gate ablation
is "EMoE-learn"). That is `model.moe.router = "hard_topk"` with `router_from_keys`: the mean keys
come from the current experts at every step, as in the official code (the BERT/GPT-2/ViT version
copies them into the gate after every optimizer step; the LLaMA version averages the gate
projection's outputs on the fly). Without `router_from_keys` the split sets a `router [D, E]` to
the mean keys once and it trains like any router. The official settings: E = 64 (BERT, GPT-2 XL,
LLaMA-7B), top-k = E/4 (full fine-tuning) or E/2 (LoRA), EMoE in a few layers (one of BERT's;
every 2nd or 4th of LLaMA's last half or quarter), no load-balancing loss in the LLaMA code.

Choices where the paper leaves them open:
  - which key: w_gate's columns (SwiGLU has two first-layer matrices). The gate is the unit's
    nonlinearity, the paper's "key" in the two-matrix FFN; the official LLaMA code clusters
    gate_proj and routes by its outputs (`select='gate'`, their recommended setting).
  - balanced k-means: k-means++ seeding (seeded numpy generator), then Lloyd iterations whose
    assignment step is greedy by distance under the size constraint: each unassigned unit
    proposes to its nearest cluster with room, every cluster accepts its closest proposals up to
    its room, the rest propose again (at most E rounds). The paper uses KMeansConstrained (a
    min-cost-flow assignment); this greedy one is deterministic, vectorised and O(F E) per round
    (on a trained layer of experiments/emoe_quickstart.py its cost was 0.3% above the exact
    assignment's at the same centres; the mean cosine of a key to its cluster's mean, 0.38,
    against 0.21 for a random split into equal groups).
    Euclidean distance on the unit-normalised keys, as the official code.
  - expert order: by smallest hidden-unit index (so the result does not depend on label order).

  emoe(dense_model, moe_cfg) -> Transformer                    (Python)
  jaxlm convert emoe DENSE_RUN MOE_EXPERIMENT --run-dir OUT     (a run directory at step 0)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.models.build import build, layer_trees, set_layer_trees, update_from_pure_dict
from jaxlm.models.transformer import Transformer
from jaxlm.models.upcycle import FREE_FIELDS, _like, moe_state_from_dense


def check_compatible(dense: ModelConfig, moe: ModelConfig) -> None:
  """Raise ConfigError naming the first field that prevents splitting `dense` into `moe`."""
  if any(k != "dense" for k in dense.ffn_kinds):
    raise ConfigError(f"emoe: the source model must be dense in every layer, got FFN kinds {dense.ffn_kinds}")
  if "moe" not in moe.ffn_kinds:
    raise ConfigError("emoe: the target model has no MoE layer (set model.ffn=moe)")
  for f in dataclasses.fields(ModelConfig):
    if f.name not in FREE_FIELDS and getattr(dense, f.name) != getattr(moe, f.name):
      raise ConfigError(f"emoe: model.{f.name} is {getattr(moe, f.name)!r} but the dense model has {getattr(dense, f.name)!r}")
  m = moe.moe
  if dense.d_ff % m.n_experts:
    raise ConfigError(f"emoe: the dense d_ff ({dense.d_ff}) is not divisible by model.moe.n_experts ({m.n_experts})")
  if m.d_ff_expert != dense.d_ff // m.n_experts:
    raise ConfigError(f"emoe: model.moe.d_ff_expert ({m.d_ff_expert}) must be the dense d_ff / n_experts = {dense.d_ff // m.n_experts}")
  if m.n_shared_experts:
    raise ConfigError(f"emoe: model.moe.n_shared_experts must be 0, got {m.n_shared_experts} (the experts partition the dense FFN; a shared expert would be new parameters)")


def function_preserved(cfg: ModelConfig) -> bool:
  """Whether an EMoE model of this config computes the dense model's function: every expert
  active with weight 1, nothing dropped."""
  m = cfg.moe
  return m.router == "hard_topk" and m.top_k == m.n_experts and m.route_scale == 1.0 and m.mode == "dropless"


def balanced_kmeans(points: np.ndarray, k: int, *, seed: int = 0, iters: int = 50) -> np.ndarray:
  """int32 labels of a k-means clustering of the n rows of `points` into k clusters of exactly n/k."""
  x = np.asarray(points, np.float64)
  n = x.shape[0]
  if n % k:
    raise ConfigError(f"balanced k-means: {n} points do not split into {k} equal clusters")
  rng = np.random.default_rng(seed)
  centers = x[[rng.integers(n)]]
  d2 = np.sum((x - centers[0]) ** 2, axis=1)
  for _ in range(1, k):  # k-means++ seeding
    p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
    centers = np.concatenate([centers, x[[rng.choice(n, p=p)]]])
    d2 = np.minimum(d2, np.sum((x - centers[-1]) ** 2, axis=1))
  labels = None
  for _ in range(iters):
    dist = np.sum(x * x, axis=1)[:, None] - 2 * x @ centers.T + np.sum(centers * centers, axis=1)[None, :]
    new = _balanced_assign(dist, n // k)
    if labels is not None and np.array_equal(new, labels):
      break
    labels = new
    centers = np.stack([x[labels == c].mean(axis=0) for c in range(k)])
  return labels.astype(np.int32)


def _balanced_assign(dist: np.ndarray, size: int) -> np.ndarray:
  """Each point (row of dist [points, clusters]) to a cluster, `size` per cluster, greedy by distance."""
  n, k = dist.shape
  label = np.full(n, -1, np.int64)
  room = np.full(k, size, np.int64)
  while (free := np.flatnonzero(label < 0)).size:
    d = np.where(room[None, :] > 0, dist[free], np.inf)
    choice = np.argmin(d, axis=1)
    order = np.lexsort((free, d[np.arange(free.size), choice], choice))  # by cluster, distance, index
    c = choice[order]
    rank = np.arange(order.size) - np.searchsorted(c, c, side="left")  # place in its cluster's queue
    take = order[rank < room[c]]
    label[free[take]] = choice[take]
    room -= np.bincount(choice[take], minlength=k)
  return label


def partition(w_gate_df: Any, n_experts: int, *, seed: int = 0) -> np.ndarray:
  """int32 [E, F/E]: the hidden units of each expert, clustered by their unit-normalised keys
  w_gate[:, f]; units ascending within an expert, experts ordered by their first unit."""
  keys_fd = np.asarray(jax.device_get(w_gate_df), np.float64).T
  keys_fd = keys_fd / np.maximum(np.linalg.norm(keys_fd, axis=1, keepdims=True), 1e-12)
  labels = balanced_kmeans(keys_fd, n_experts, seed=seed)
  groups = sorted((np.flatnonzero(labels == e) for e in range(n_experts)), key=lambda g: g[0])
  return np.stack(groups).astype(np.int32)


def split_ffn(ffn: dict[str, Any], units_ef: np.ndarray) -> tuple[dict[str, jax.Array], jax.Array]:
  """The experts {w_gate [E, D, F/E], w_up [E, D, F/E], w_down [E, F/E, D]} holding the dense FFN's
  hidden units `units_ef`, and the avg-k router [D, E]: column e the mean of expert e's keys."""
  idx = jnp.asarray(units_ef)
  w_gate_def = jnp.asarray(ffn["w_gate"])[:, idx]
  experts = {
      "w_gate": w_gate_def.transpose(1, 0, 2),
      "w_up": jnp.asarray(ffn["w_up"])[:, idx].transpose(1, 0, 2),
      "w_down": jnp.asarray(ffn["w_down"])[idx],
  }
  return experts, jnp.mean(w_gate_def.astype(jnp.float32), axis=-1)


def emoe_state(dense_state: dict, dense_cfg: ModelConfig, moe_state: dict, moe_cfg: ModelConfig, *, seed: int = 0) -> dict:
  """Pure-dict version: `moe_state` with every MoE layer's experts (and router, when the config
  has one) cut from that layer's dense FFN; every other weight copied from the dense model."""
  check_compatible(dense_cfg, moe_cfg)

  def split(s: dict, d: dict) -> dict:
    experts, router_de = split_ffn(s, partition(s["w_gate"], moe_cfg.moe.n_experts, seed=seed))
    ffn = dict(d)  # keeps the layer's fresh non-trainable state (selection bias, jitter)
    ffn["experts"] = _like(experts, d["experts"])
    if "router" in ffn:
      ffn["router"] = _like(router_de, ffn["router"])
    return ffn

  return moe_state_from_dense(dense_state, dense_cfg, moe_state, moe_cfg, split)


def emoe(dense: Transformer, moe_cfg: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """An MoE Transformer of `moe_cfg` whose experts partition `dense`'s FFNs (seed: the k-means')."""
  check_compatible(dense.cfg, moe_cfg)
  model = build(moe_cfg, mesh)
  update_from_pure_dict(model, emoe_state(nnx.to_pure_dict(nnx.state(dense)), dense.cfg, nnx.to_pure_dict(nnx.state(model)), moe_cfg, seed=seed))
  return model


def emoe_run(dense_run: Path, exp: Experiment, out_dir: Path, *, step: int | None = None, seed: int = 0) -> dict[str, Any]:
  """Write `out_dir` as a run of `exp` at step 0 whose model is the dense checkpoint split by EMoE."""
  from jaxlm.interop import hf
  from jaxlm.train.run import check_empty_run_dir, load_config, load_for_inference, write_initial_run

  dense_run, out_dir = Path(dense_run), Path(out_dir)
  check_empty_run_dir(out_dir)
  source = hf.experiment(dense_run, mesh=exp.mesh) if hf.is_hf_dir(dense_run) else load_config(dense_run)
  check_compatible(source.model, exp.model)  # before loading any weights
  dense_exp, dense_model, _, dense_step = load_for_inference(dense_run, step=step, mesh_cfg=exp.mesh, merged=True)

  def fill(model: nnx.Module) -> None:
    update_from_pure_dict(model, emoe_state(nnx.to_pure_dict(nnx.state(dense_model)), dense_exp.model, nnx.to_pure_dict(nnx.state(model)), exp.model, seed=seed))

  write_initial_run(out_dir, exp, fill, tokenizer_from=dense_run)
  m = exp.model.moe
  return {"dense_run": str(dense_run), "dense_step": dense_step, "run_dir": str(out_dir), "n_experts": m.n_experts, "top_k": m.top_k, "function_preserved": function_preserved(exp.model)}
