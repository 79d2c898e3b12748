"""Expert-specialised fine-tuning, ESFT (Wang et al. 2024, "Let the Expert Stick to His Last",
arXiv 2407.01906): train only the routed experts most relevant to the task, freeze the rest.

  1. measure  score every routed expert of every MoE layer on `peft.esft_batches` training
              batches with the base model (`measure`, run by the trainer before the adapters
              exist; recorded in the run directory as peft_inputs.json so a resumed run reuses it)
  2. select   per layer, the top-scored experts whose cumulative share of the layer's relevance
              first reaches `peft.esft_top_p` (`select_experts`; paper eq. 8)
  3. train    only those experts' w_gate, w_up, w_down (`ExpertDelta`); router, attention,
              norms, shared experts and the other experts stay frozen (`peft.train_also` can
              add the shared experts or other modules, as the paper's code options do)

Relevance scores (`peft.esft_score`), from the routed gate values g_{e,t} = s_{e,t} (the router
probability) when token t's routing chose expert e, else 0 (paper eq. 2):
  gate   average gate score, mean_t g_{e,t} (eq. 6): the `moe_gate_score` metric of the MoE layer
  token  token selection ratio, mean_t 1(g_{e,t} > 0) / K (eq. 7): `moe_expert_load`
Both are averaged over all valid tokens of the scored batches (padding excluded) and then
normalised to sum to 1 over the experts of each layer. The paper averages per sequence first
(1/N_s sum_j 1/L_j sum_k); its sequences are packed to one fixed length, where both averages
agree, and its released code sums over tokens, as here. (That code divides by the sum over
layers, `axis=0`; we follow the paper's text, whose Figure 2 normalises over the layer's
experts: "divided by the total across all experts".)

Selection. Experts are sorted by score, ties broken by the lower expert index, and taken until
the cumulative share is >= top_p (to within 1e-9, so 0.25 + 0.25 reaches 0.5); top_p = 1 takes
every expert, also ones with a zero score. At least one expert per layer is always trained.

The adapter. `ExpertDelta` replaces a stacked expert weight w [E, D, F] (or [E, F, D]; a
leading layer axis when scanned) by the frozen bank plus a trainable float32 delta for the K
chosen experts only, [K, D, F], with the chosen indices as non-trainable state [K]. The layers
read the plain array w.at[idx].add(delta) (added in float32 and rounded once to the bank's
dtype; the other experts come back bitwise), so every MoE path (grouped matmul, expert
parallelism) works unchanged, merging is exact, and the optimizer holds moments for the chosen
experts only (ESFT's memory saving). Scanned layers stack their own choices with K the largest
count, padded with index E, which the scatter drops. AdamW's decoupled weight decay acts on the
delta, so it pulls the chosen experts toward their pretrained values rather than toward zero.
The backward pass still forms the bank's full [E, D, F] weight gradient before gathering the
chosen rows (as full fine-tuning would); the optimizer state and update shrink, not that.

Abstract models (`jax.eval_shape`, ahead-of-time compiles) without a measurement get a
placeholder choice, the first ceil(top_p * E) experts of every layer, so that
`loop.prepare(exp, abstract=True)` works without data.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import sharding
from jaxlm.config import Experiment, ModelConfig, PeftConfig
from jaxlm.errors import ConfigError
from jaxlm.layers.experts import NAMES
from jaxlm.peft import targets as tg
from jaxlm.peft.methods import METHODS, Method, is_adapter
from jaxlm.peft.modules import Adapted, AdapterParam, AdapterState, new_variable
from jaxlm.plots import PLOTS, pyplot

SCORE_METRICS = {"gate": "moe_gate_score", "token": "moe_expert_load"}
_TOL = 1e-9  # a cumulative share this close below top_p counts as reaching it


# -- selection -----------------------------------------------------------------------------


def select_experts(scores: Any, top_p: float) -> list[list[int]]:
  """Per layer (a row of `scores` [layers, E]), the experts to train, in index order: the
  fewest top-scored experts whose share of the row's total is >= top_p (paper eq. 8)."""
  out = []
  for row in np.asarray(scores, np.float64).reshape(-1, np.shape(scores)[-1]):
    total = float(row.sum())
    if top_p >= 1 or total <= 0:
      out.append(list(range(row.size)))
      continue
    share = row / total
    chosen, reached = [], 0.0
    for e in np.argsort(-share, kind="stable"):  # stable: ties go to the lower index
      chosen.append(int(e))
      reached += share[e]
      if reached >= top_p - _TOL:
        break
    out.append(sorted(chosen))
  return out


def placeholder_experts(cfg: ModelConfig, top_p: float) -> list[list[int]]:
  """The first ceil(top_p * E) experts of every MoE layer: shapes for abstract models."""
  n = max(1, math.ceil(top_p * cfg.moe.n_experts - _TOL))
  return [list(range(n)) for _ in moe_layers(cfg)]


# -- where the experts live ----------------------------------------------------------------


def moe_layers(cfg: ModelConfig) -> list[int]:
  """The model's MoE layers, in layer order: the order of the rows of their aux metrics."""
  return [i for i in range(cfg.n_layers) if cfg.layer_ffn(i) == "moe"]


def expert_bank(cfg: ModelConfig, layer: int) -> tuple[tuple[Any, ...], int | None]:
  """(path of layer `layer`'s Experts module, its row in the scanned stack or None when unrolled);
  with `scan_layers`, layer first_k_dense + u * ffn_every + j is row u of `units/blocks/j`
  (`jaxlm.models.build.layer_trees`)."""
  if not cfg.scan_layers:
    return ("blocks", layer, "ffn", "experts"), None
  u, j = divmod(layer - cfg.first_k_dense, cfg.ffn_every)
  return ("units", "blocks", j, "ffn", "experts"), u


def _check_moe(cfg: ModelConfig) -> None:
  if not moe_layers(cfg):
    raise ConfigError(f"peft.method='esft' fine-tunes routed experts, but the model has no sparse MoE layer (model.ffn={cfg.ffn!r}; use 'moe')")


# -- the adapter ---------------------------------------------------------------------------


def _add_rows(w: jax.Array, idx: jax.Array, delta: jax.Array) -> jax.Array:
  """w with delta[k] added to row idx[k] (indices >= E dropped), rounded once to w's dtype (the
  other rows come back bitwise); leading stack axes mapped."""
  if jnp.ndim(idx) > 1:
    return jax.vmap(_add_rows)(w, idx, delta)
  w, delta = jnp.asarray(w), jnp.asarray(delta)
  wide = jnp.promote_types(w.dtype, delta.dtype)
  return w.astype(wide).at[idx].add(delta.astype(wide), mode="drop").astype(w.dtype)


class ExpertDelta(Adapted):
  """A stacked expert weight [*scan, E, *fan_in, *fan_out] with a trainable delta for the chosen
  experts only: `delta` [*scan, K, *fan_in, *fan_out] (zero at the start: the base model),
  `chosen` int32 [*scan, K] (index E: padding, no expert). `self[...]` is the plain array."""

  def __init__(self, base: nnx.Param, chosen: np.ndarray, *, n_scan: int = 0):
    super().__init__(base, n_scan=n_scan)
    like = base.get_value()
    shape, names = self.shape, sharding.logical_axes_of(base)
    chosen = np.asarray(chosen, np.int32)
    if chosen.shape[:-1] != shape[:n_scan]:
      raise ValueError(f"chosen experts {chosen.shape} do not fit a weight {shape} with {n_scan} scan axes")
    dtype = jnp.float32  # trained: float32 master weights, whatever the frozen bank's dtype
    d_shape = shape[:n_scan] + chosen.shape[-1:] + shape[n_scan + 1 :]
    d_axes = names[:n_scan] + (None,) + names[n_scan + 1 :]  # K is not the expert axis: unsharded
    self.delta = new_variable(AdapterParam, lambda: np.zeros(d_shape), d_shape, dtype, d_axes, like)  # on the host: no compile
    self.chosen = new_variable(AdapterState, lambda: chosen, chosen.shape, jnp.int32, names[:n_scan] + (None,), like)

  def adapted(self, *, whole_bank: bool = False) -> jax.Array:
    return _add_rows(self.base[...], self.chosen[...], self.delta[...])

  def dense(self, adapter: int | None = None) -> jax.Array:
    del adapter
    return self.adapted()

  def adapted_for_merge(self) -> Any:
    raise ConfigError("esft: merge_adapters / unmerge_adapters do not apply (the adapted experts are already a plain array); use jaxlm.peft.merge")


def _check_choice(experts: Sequence[Sequence[int]], cfg: ModelConfig) -> list[list[int]]:
  n, e = len(moe_layers(cfg)), cfg.moe.n_experts
  if len(experts) != n:
    raise ConfigError(f"esft: the measured experts cover {len(experts)} MoE layers but the model has {n}; measure again (delete peft_inputs.json)")
  out = []
  for layer, row in zip(moe_layers(cfg), experts):
    row = [int(x) for x in row]
    if not row or len(set(row)) != len(row) or not all(0 <= x < e for x in row):
      raise ConfigError(f"esft: layer {layer}'s chosen experts {row} must be distinct indices in [0, {e})")
    out.append(sorted(row))
  return out


def _apply(model: nnx.Module, cfg: PeftConfig, key: jax.Array, *, experts: Sequence[Sequence[int]] | None = None, **_: Any) -> nnx.Module:
  del key  # the deltas start at zero
  mcfg: ModelConfig = model.cfg
  _check_moe(mcfg)
  first = tg.get_node(model, expert_bank(mcfg, moe_layers(mcfg)[0])[0] + (NAMES[0],))
  if isinstance(first, Adapted):
    raise ConfigError("esft: the experts are adapted already; apply ESFT to the base model")
  if experts is None:
    if not isinstance(first.get_value(), jax.ShapeDtypeStruct):
      raise ConfigError("peft.method='esft' needs its measured experts (peft.apply(..., experts=...)); `jaxlm train` measures them into peft_inputs.json")
    experts = placeholder_experts(mcfg, cfg.esft_top_p)
  experts = _check_choice(experts, mcfg)
  banks: dict[tuple[Any, ...], list[tuple[int | None, list[int]]]] = {}
  for layer, row in zip(moe_layers(mcfg), experts):
    path, u = expert_bank(mcfg, layer)
    banks.setdefault(path, []).append((u, row))
  e = mcfg.moe.n_experts
  for path, rows in banks.items():
    k = max(len(r) for _, r in rows)
    chosen = np.full((len(rows), k), e, np.int32)  # rows come in unit order (layer order)
    for i, (_, r) in enumerate(rows):
      chosen[i, : len(r)] = r
    scanned = rows[0][0] is not None
    for name in NAMES:
      var = tg.get_node(model, path + (name,))
      tg.set_node(model, path + (name,), ExpertDelta(var, chosen if scanned else chosen[0], n_scan=int(scanned)))
  return model


METHODS.register("esft", Method(_apply, is_adapter))


# -- measuring -----------------------------------------------------------------------------


def measure(exp: Experiment, init: dict[str, Any] | None, batches: Iterable[dict[str, np.ndarray]], *, model: nnx.Module | None = None) -> dict[str, Any]:
  """Score the experts of the base model (`init`'s weights, or a fresh init) on `batches` (host
  numpy batches as `jaxlm.data.pipeline` yields them) and choose the ones to train. `model`:
  score this plain model instead of building the run's (`run.initial_model` without adapters).

  Returns (JSON-serialisable; passed to `peft.apply` as keyword arguments):
    experts  [n_moe_layers][k_l] the chosen experts of each MoE layer (the adapter's input)
    gate     [n_moe_layers][E] average gate scores, normalised per layer
    token    [n_moe_layers][E] token selection ratios (sum to 1 per layer)
    score, top_p, layers (the model layer of each row), tokens (valid tokens scored)
  """
  from jaxlm.train.loop import to_global
  from jaxlm.train.run import initial_model

  _check_moe(exp.model)
  mesh = sharding.make_mesh(exp.mesh)
  rules = sharding.make_rules(exp.mesh.rules)
  if model is None:
    model = initial_model(dataclasses.replace(exp, peft=PeftConfig()), mesh, rules, init=init)
  model.eval()  # no router jitter, no bias update
  graphdef, state = nnx.split(model)

  @jax.jit
  def scores(state, batch):
    _, aux = nnx.merge(graphdef, state)(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    n = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
    return {k: aux["metrics"][m] * n for k, m in SCORE_METRICS.items()}, n

  batch_sh = sharding.batch_sharding(mesh)
  sums: dict[str, np.ndarray] = {}
  total = 0.0
  with sharding.use_rules(rules), jax.set_mesh(mesh):
    for batch in batches:
      weighted, n = jax.device_get(scores(state, to_global(batch, batch_sh)))
      sums = {k: sums.get(k, 0.0) + np.asarray(v, np.float64) for k, v in weighted.items()}
      total += float(n)
  if total <= 0:
    raise ConfigError("esft: the scored batches hold no tokens (peft.esft_batches, data)")
  out: dict[str, Any] = {"score": exp.peft.esft_score, "top_p": exp.peft.esft_top_p, "layers": moe_layers(exp.model), "tokens": int(total)}
  for k, s in sums.items():
    out[k] = (s / np.maximum(s.sum(-1, keepdims=True), 1e-30)).tolist()
  out["experts"] = select_experts(out[exp.peft.esft_score], exp.peft.esft_top_p)
  return out


# -- picture -------------------------------------------------------------------------------


@PLOTS.register("esft_experts")
def experts_heatmap(run_dir: Path, history: list[dict[str, Any]]) -> Path | None:
  """ESFT's relevance scores (MoE layers x experts) with the experts chosen for training boxed."""
  from jaxlm.train.run import PEFT_INPUTS_FILE, read_record

  del history
  inputs = read_record(run_dir, PEFT_INPUTS_FILE)
  if not inputs or "experts" not in inputs or inputs.get("score") not in inputs:
    return None
  scores, chosen = np.asarray(inputs[inputs["score"]], np.float64), inputs["experts"]
  n_layers, n_experts = scores.shape
  plt = pyplot()
  from matplotlib.patches import Rectangle

  fig, ax = plt.subplots(figsize=(min(16.0, 3.0 + 0.5 * n_experts), 2.0 + 0.45 * n_layers), dpi=120, layout="constrained")
  im = ax.imshow(scores, cmap="viridis", vmin=0, aspect="auto")
  for i, row in enumerate(chosen):
    for e in row:
      ax.add_patch(Rectangle((e - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
  if n_layers * n_experts <= 256:
    top = float(scores.max()) or 1.0
    for i in range(n_layers):
      for j in range(n_experts):
        ax.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", color="k" if scores[i, j] > 0.6 * top else "w", fontsize=6)
  ax.set_xticks(range(0, n_experts, max(1, n_experts // 16)))
  ax.set_yticks(range(n_layers), [str(l) for l in inputs.get("layers", range(n_layers))])
  ax.set_xlabel("expert")
  ax.set_ylabel("layer")
  n_chosen = sum(len(r) for r in chosen)
  ax.set_title(f"{run_dir.name}: ESFT-{inputs['score']} scores, top_p {inputs.get('top_p')}: {n_chosen} of {n_layers * n_experts} experts trained (boxed)", fontsize=9)
  fig.colorbar(im, ax=ax, label="share of the layer's relevance")
  path = run_dir / "esft_experts.png"
  fig.savefig(path)
  plt.close(fig)
  return path
