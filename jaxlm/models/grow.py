"""Model growth (Du et al. 2024, "Stacking Your Transformers: A Closer Look at Model Growth for
Efficient LLM Pre-Training", arXiv 2405.15319): a trained small model becomes the start of a
larger one, which then trains on.

The paper sorts growth methods into four atomic operators (direct, learned, zero, random), each
in depth and in width, and finds the depthwise direct operator, G_stack, the one that speeds up
pre-training. The registry `OPERATORS` holds those that map weights to weights:

  stack        G_direct in depth = G_stack. The whole stack of the source's L layers repeated g
               times: layer i of the grown model is a copy of source layer i mod L, i.e. the order
               (0 .. L-1, 0 .. L-1, ...), the paper's `stacking_list` (its code's
               prts_configs/stacking_6L_24L.json: [0..5, 0..5, 0..5, 0..5]); not the interleaved
               (0, 0, 1, 1, ...) order. Not function preserving (each block's residual update now
               happens g times).
  zero         G_zero in depth. The source's layers keep their place at the bottom, (g-1) L new
               layers go on top; a new layer is the grown model's own initialisation with its
               output projections (attention w_o, every w_down of the FFN) zero, so each new
               block is the identity and the grown model computes the source's function. (The
               paper leaves open what the rest of a new layer holds; an all-zero layer gets zero
               gradients for ever, so only the output projections are zero, as in
               function-preserving depth growth since Net2DeeperNet.)
  random       G_random in depth: as `zero`, the new layers left at their fresh initialisation.
  split_ffn    G_direct in width, FFN hidden units: every hidden unit (of the dense MLP, of each
               routed and shared expert) copied g times, F -> g F. Unit f of the grown FFN is unit
               f mod F of the source; the copies' input weights (w_gate, w_up) are the same and
               their output rows (w_down) split into g shares that sum to 1, so the FFN computes
               the same function.
  split_model  G_direct in width, the residual width: D -> g D with the heads and head_dim kept.
               The residual stream becomes g copies of itself: weights that write to it (the
               embedding table, w_o, w_down, norm scales) are tiled along D, weights that read it
               (w_q/k/v, w_gate/w_up, routers, an untied head) are tiled and split into g shares;
               RMSNorm of g copies is the copy of the RMSNorm. With tied embeddings the final
               norm's scale is divided by g (the head reads the tiled table). Function preserving.

Width shares. The paper does not fix how a split weight's shares are drawn. Net2Net's equal
shares 1/g keep the copies identical for ever (equal weights, equal gradients), so by default the
shares are (1 + u_c - mean_c u) / g with u ~ U(-noise, noise) per element (`split_noise`,
default 0.1): they still sum to 1 (the function is kept, to float rounding) and the copies drift
apart. `split_noise=0` gives Net2Net's halving exactly. The noise comes from "rbg" keys (XLA's
RngBitGenerator; threefry over every leaf compiles ~5x slower on a CPU): a seed gives the same
shares on one backend, not necessarily across backends.

The FFN pattern. A copied layer keeps its FFN kind, so for `stack` layer i's kind in the grown
model (`first_k_dense`, `ffn_every` unchanged) must be that of source layer i mod L; MoE and
soft-MoE blocks stack like dense ones, a pattern that does not repeat (e.g. a dense prefix
followed by MoE layers) is a ConfigError naming the first layer that breaks it. `zero`/`random`
keep the pattern by construction.

Not here: G_learn (LiGO-style: the large model's weights a learned linear map of the small
one's, the map trained through the large model's loss for a while before growing). It is a
training procedure of its own, not a map from weights to weights, and the paper finds G_stack
ahead of it; it does not fit this interface.

  grow(model, "stack", 2) -> Transformer                                  (Python)
  jaxlm convert grow RUN_DIR DST --factor 2 [--operator stack]            (a run at step 0)
  Experiment(init_from=<a smaller run>, grow=GrowConfig(operator="stack"))  (grown on load)
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import GROW_OPERATORS, GrowConfig, ModelConfig, PeftConfig, to_dict
from jaxlm.errors import ConfigError
from jaxlm.models.build import abstract_model, build, layer_trees, set_layer_trees
from jaxlm.models.transformer import Transformer
from jaxlm.registry import Registry

# ModelConfig fields a grown model may set as it likes (how it computes, not what).
FREE_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl")
# FFN kinds whose parameters the operators know: the zero operator silences their output, the
# width operators split their hidden units / inputs (from the parameters' logical axes).
KNOWN_FFN_KINDS = ("dense", "moe", "soft_moe")
LAYER_KEYS = ("blocks", "prefix", "units")


@dataclasses.dataclass(frozen=True)
class Operator:
  """A growth operator: the grown config for a factor g, and the grown weights."""

  paper: str  # the paper's name
  direction: str  # "depth" or "width"
  function_preserving: bool  # the grown model computes the source's function at step 0
  target: Callable[[ModelConfig, int], ModelConfig]  # (source config, g) -> grown config
  factor_of: Callable[[ModelConfig, ModelConfig], tuple[int, int, str]]  # (src, dst) -> (dst size, src size, field)
  weights: Callable[..., dict]  # (src_tree, src_cfg, dst_tree, dst_cfg, g, *, noise, key) -> grown pure dict


OPERATORS: Registry[Operator] = Registry("growth operator")


# -- configs -----------------------------------------------------------------------------------


def _deeper(src: ModelConfig, g: int) -> ModelConfig:
  return dataclasses.replace(src, n_layers=src.n_layers * g)


def _wider_ffn(src: ModelConfig, g: int) -> ModelConfig:
  m = src.moe
  moe = dataclasses.replace(m, d_ff_expert=m.d_ff_expert * g, d_ff_shared=m.d_ff_shared * g)  # 0 (= follow d_ff) stays 0
  return dataclasses.replace(src, d_ff=src.d_ff * g, moe=moe)


def _wider_model(src: ModelConfig, g: int) -> ModelConfig:
  return dataclasses.replace(src, d_model=src.d_model * g, head_dim=src.resolved_head_dim)


def _flat(d: Any, prefix: str) -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def config_differences(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
  """(dotted key, a's value, b's value) for every leaf field where two config trees differ."""
  fa, fb = _flat(to_dict(a), prefix), _flat(to_dict(b), prefix)
  return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def check_growth(src: ModelConfig, dst: ModelConfig, grow: GrowConfig) -> int:
  """The growth factor g (grow.factor, or 0: read off the two configs); raises ConfigError
  unless growing `src` by g with grow.operator gives `dst` (up to FREE_FIELDS)."""
  name = grow.operator
  op = OPERATORS.get(name)
  big, small, field = op.factor_of(src, dst)
  g = grow.factor
  if g == 0:
    if big % small or big // small < 2:
      raise ConfigError(f"grow {name}: model.{field} = {big} is not a multiple >= 2 of the source model's {field} = {small}")
    g = big // small
  check_factor(name, g)
  expected = op.target(src, g)
  diffs = [d for d in config_differences(expected, dst, "model") if d[0].split(".")[1] not in FREE_FIELDS]
  if diffs:
    key, want, got = diffs[0]
    raise ConfigError(f"grow {name} x{g}: {key} is {got!r}, but growing the source model ({field} {small}) by {g} gives {want!r}")
  if name == "stack":
    check_stackable(src, dst)
  if name != "stack" and any(k not in KNOWN_FFN_KINDS for k in set(src.ffn_kinds)):
    odd = sorted(set(src.ffn_kinds) - set(KNOWN_FFN_KINDS))
    raise ConfigError(f"grow {name}: cannot grow FFN kind(s) {', '.join(odd)} (this operator knows {', '.join(KNOWN_FFN_KINDS)}; `stack` copies any kind)")
  return g


def check_factor(name: str, g: int) -> None:
  OPERATORS.get(name)
  if not isinstance(g, int) or isinstance(g, bool) or g < 2:
    raise ConfigError(f"grow {name}: the growth factor must be an integer >= 2, got {g!r}")


def check_stackable(src: ModelConfig, dst: ModelConfig) -> None:
  """Every layer of the stacked model keeps the FFN kind that the grown pattern puts there."""
  for i in range(dst.n_layers):
    j = i % src.n_layers
    if dst.layer_ffn(i) != src.layer_ffn(j):
      raise ConfigError(
          f"grow stack: layer {i} of the grown model would be a copy of source layer {j} (FFN {src.layer_ffn(j)!r}), but "
          f"model.first_k_dense={dst.first_k_dense}, model.ffn_every={dst.ffn_every} put {dst.layer_ffn(i)!r} there: this layer pattern does not stack"
      )


def target_config(src: ModelConfig, operator: str, factor: int) -> ModelConfig:
  """The config of `src` grown by `factor` with `operator` (validated: a ConfigError if invalid)."""
  check_factor(operator, factor)
  dst = OPERATORS.get(operator).target(src, factor)
  check_growth(src, dst, GrowConfig(operator=operator, factor=factor))
  return dst


# -- weights -----------------------------------------------------------------------------------


def _cast_like(src: Any, dst: Any) -> Any:
  """`src` in `dst`'s dtype (the weights are grown inside one jit whose outputs take dst's shardings)."""
  return jnp.asarray(src, dst.dtype)


def _copy_layer(src: Any, dst: Any) -> Any:
  """A source layer's variables in the grown layer's dtypes. Random-key state (leaves named
  `*_key`: router jitter, expert dropout) stays the grown layer's own, so copies draw apart."""
  if isinstance(dst, dict):
    return {k: (v if isinstance(k, str) and k.endswith("_key") else _copy_layer(src[k], v)) for k, v in dst.items()}
  return _cast_like(src, dst)


def _silenced(layer: dict) -> dict:
  """A fresh layer whose block is the identity: attention w_o and every FFN w_down zero."""

  def zero_w_down(tree: Any) -> Any:
    if not isinstance(tree, dict):
      return tree
    return {k: (jnp.zeros_like(v) if k == "w_down" else zero_w_down(v)) for k, v in tree.items()}

  out = dict(layer)
  out["attn"] = dict(layer["attn"], w_o=jnp.zeros_like(layer["attn"]["w_o"]))
  out["ffn"] = zero_w_down(layer["ffn"])
  return out


def _top_level(src_tree: dict, dst_tree: dict) -> dict:
  out = dict(dst_tree)
  for k in dst_tree:
    if k not in LAYER_KEYS:
      out[k] = jax.tree.map(_cast_like, src_tree[k], dst_tree[k])
  return out


def _depth(new_layer: Callable[[dict], dict] | None) -> Callable[..., dict]:
  """Depth growth: `new_layer` None stacks (layer i <- source layer i mod L); otherwise the
  source's layers stay at the bottom and each layer above is new_layer(its fresh init)."""

  def weights(src_tree: dict, src_cfg: ModelConfig, dst_tree: dict, dst_cfg: ModelConfig, g: int, **_: Any) -> dict:
    src_layers, dst_layers = layer_trees(src_tree, src_cfg), layer_trees(dst_tree, dst_cfg)
    n = src_cfg.n_layers
    layers = []
    for i, fresh in enumerate(dst_layers):
      if new_layer is None or i < n:
        layers.append(_copy_layer(src_layers[i % n], fresh))
      else:
        layers.append(new_layer(fresh))
    out = _top_level(src_tree, dst_tree)
    set_layer_trees(out, dst_cfg, layers)
    return out

  return weights


def leaf_axes(cfg: ModelConfig) -> dict[tuple, tuple[tuple, tuple]]:
  """{path in the unrolled model's pure dict: (logical axes, fan-in axes >= 0)} of every variable."""
  state = nnx.state(abstract_model(dataclasses.replace(cfg, scan_layers=False)))
  out = {}
  for path, var in nnx.to_flat_state(state):
    md = var.get_metadata()
    axes = tuple(md.get("out_sharding") or ())
    n = len(var.shape)
    out[tuple(path)] = (axes, tuple(sorted(a % n for a in md.get("fan_in") or ())))
  return out


def _shares(key: jax.Array, g: int, shape: tuple[int, ...], noise: float) -> jax.Array:
  """[g, *shape] shares that sum to 1 over the first axis: (1 + u_c - mean u) / g."""
  if noise == 0:
    return jnp.full((g,) + shape, 1.0 / g, jnp.float32)
  u = jax.random.uniform(key, (g,) + shape, jnp.float32, -noise, noise)
  return (1.0 + u - u.mean(0, keepdims=True)) / g


def _widen_leaf(a: Any, path: tuple, want: tuple[int, ...], axes: tuple, fan_in: tuple, name: str, g: int, noise: float, key: jax.Array) -> jax.Array:
  """Tile `a` g times along every axis called `name`; along an input (fan-in) axis also split
  the g copies into shares that sum to 1."""
  a = jnp.asarray(a, jnp.float32)
  for k, ax in enumerate(axes):
    if ax != name:
      continue
    if k in fan_in:
      pieces = _shares(jax.random.fold_in(key, k), g, a.shape, noise) * a[None]
      a = jnp.concatenate(list(pieces), axis=k)  # copy c holds [c F, (c + 1) F)
    else:
      a = jnp.concatenate([a] * g, axis=k)
  if a.shape != tuple(want):
    raise ConfigError(f"grow: cannot widen {'/'.join(map(str, path))} {tuple(a.shape)} -> {tuple(want)} along {name!r} (its axes: {axes})")
  return a


def _width(axis_name: str) -> Callable[..., dict]:
  """Width growth along the logical axis `axis_name` ("mlp": FFN hidden units, "embed": D)."""

  def weights(src_tree: dict, src_cfg: ModelConfig, dst_tree: dict, dst_cfg: ModelConfig, g: int, *, noise: float, key: jax.Array) -> dict:
    meta = leaf_axes(dst_cfg)

    def widen(src: Any, dst: Any, path: tuple) -> Any:
      if isinstance(dst, dict):
        return {k: widen(src[k], v, path + (k,)) for k, v in dst.items()}
      axes, fan_in = meta[path]
      leaf_key = jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()))
      return _cast_like(_widen_leaf(src, path, dst.shape, axes, fan_in, axis_name, g, noise, leaf_key), dst)

    out = dict(dst_tree)
    for k in dst_tree:
      if k not in LAYER_KEYS:
        out[k] = widen(src_tree[k], dst_tree[k], (k,))
    src_layers, dst_layers = layer_trees(src_tree, src_cfg), layer_trees(dst_tree, dst_cfg)
    set_layer_trees(out, dst_cfg, [widen(s, d, ("blocks", i)) for i, (s, d) in enumerate(zip(src_layers, dst_layers))])
    if axis_name == "embed" and dst_cfg.tie_embeddings:  # the head reads the g-fold table: scale its input by 1/g
      out["final_norm"] = {"scale": _cast_like(jnp.asarray(out["final_norm"]["scale"], jnp.float32) / g, dst_tree["final_norm"]["scale"])}
    return out

  return weights


def _layers_of(src: ModelConfig, dst: ModelConfig) -> tuple[int, int, str]:
  return dst.n_layers, src.n_layers, "n_layers"


OPERATORS.register("stack", Operator("G_stack (G_direct, depth)", "depth", False, _deeper, _layers_of, _depth(None)))
OPERATORS.register("zero", Operator("G_zero (depth)", "depth", True, _deeper, _layers_of, _depth(_silenced)))
OPERATORS.register("random", Operator("G_random (depth)", "depth", False, _deeper, _layers_of, _depth(lambda fresh: fresh)))
OPERATORS.register("split_ffn", Operator("G_direct (width, FFN)", "width", True, _wider_ffn, lambda s, d: (d.d_ff, s.d_ff, "d_ff"), _width("mlp")))
OPERATORS.register("split_model", Operator("G_direct (width, d_model)", "width", True, _wider_model, lambda s, d: (d.d_model, s.d_model, "d_model"), _width("embed")))
assert set(OPERATORS.keys()) == set(GROW_OPERATORS) - {"none"}, "config.GROW_OPERATORS and the registry disagree"


def grow_state(src_tree: dict, src_cfg: ModelConfig, dst_tree: dict, dst_cfg: ModelConfig, grow: GrowConfig, *, seed: int = 0) -> dict:
  """Pure-dict version: the freshly initialised `dst_tree` (a model of `dst_cfg`) with `src_tree`
  grown into it (unrolled or scanned, either way), computed in one jit whose outputs take the
  shardings of dst's arrays."""
  g = check_growth(src_cfg, dst_cfg, grow)
  weights = OPERATORS.get(grow.operator).weights
  key = jax.random.key(seed, impl="rbg")  # see "Width shares" above
  on_devices = all(isinstance(d, jax.Array) for d in jax.tree.leaves(dst_tree))
  shardings = jax.tree.map(lambda d: d.sharding, dst_tree) if on_devices else None
  run = jax.jit(lambda s, d, k: weights(s, src_cfg, d, dst_cfg, g, noise=grow.split_noise, key=k), out_shardings=shardings)
  return run(src_tree, dst_tree, key)


def grow_into(src: nnx.Module, dst: nnx.Module, grow: GrowConfig, *, seed: int = 0) -> None:
  """Set `dst`'s variables, in place, to `src` grown by `grow` (dst's shardings and dtypes kept).
  `dst` must be a plain model (adapters attach after)."""
  dst_state = nnx.state(dst)
  out = grow_state(nnx.to_pure_dict(nnx.state(src)), src.cfg, nnx.to_pure_dict(dst_state), dst.cfg, grow, seed=seed)
  nnx.replace_by_pure_dict(dst_state, out)
  nnx.update(dst, dst_state)


def init(cfg: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """A freshly initialised model, its initialisers run in one jit (`build`; on no mesh: unsharded)."""
  if mesh is not None:
    return build(cfg, mesh, seed=seed)
  graphdef, _ = nnx.split(abstract_model(cfg, seed=seed))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed))))())


def grow(model: Transformer, operator: str = "stack", factor: int = 2, *, split_noise: float = 0.1, seed: int = 0, cfg: ModelConfig | None = None, mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """A new Transformer: `model` grown by `factor` with `operator` (`cfg`: the grown config, e.g.
  with scan_layers changed; default the operator's)."""
  cfg = cfg or target_config(model.cfg, operator, factor)
  spec = GrowConfig(operator=operator, factor=factor, split_noise=split_noise)
  check_growth(model.cfg, cfg, spec)
  new = init(cfg, seed=seed, mesh=mesh)
  grow_into(model, new, spec, seed=seed)
  return new


def grow_run(run_dir: Path, out_dir: Path, *, operator: str, factor: int, step: int | None = None, overrides: tuple[str, ...] = (), split_noise: float = 0.1) -> dict[str, Any]:
  """Write `out_dir` as a run at step 0 of the source run's experiment with its model grown
  (`overrides` applied after growing: train.steps, name, scan_layers, ...)."""
  from jaxlm.experiments import apply_overrides
  from jaxlm.train.run import CONFIG_FILE, check_empty_run_dir, load_config, load_for_inference, write_initial_run

  run_dir, out_dir = Path(run_dir), Path(out_dir)
  check_empty_run_dir(out_dir)
  if not (run_dir / CONFIG_FILE).is_file():
    raise ConfigError(f"grow: {run_dir} is not a jaxlm run directory (no {CONFIG_FILE})")
  check_factor(operator, factor)
  spec = GrowConfig(operator=operator, factor=factor, split_noise=split_noise)
  src_exp = load_config(run_dir)
  grown = dataclasses.replace(src_exp, model=OPERATORS.get(operator).target(src_exp.model, factor), init_from="", grow=GrowConfig(), peft=PeftConfig())
  exp = apply_overrides(grown, overrides)
  check_growth(src_exp.model, exp.model, spec)
  _, src_model, _, src_step = load_for_inference(run_dir, step=step, mesh_cfg=exp.mesh, merged=True)
  write_initial_run(out_dir, exp, lambda model: grow_into(src_model, model, spec, seed=exp.train.seed), tokenizer_from=run_dir)
  return {
      "run_dir": str(out_dir),
      "source": str(run_dir),
      "source_step": src_step,
      "operator": operator,
      "paper": OPERATORS.get(operator).paper,
      "factor": factor,
      "function_preserving": OPERATORS.get(operator).function_preserving,
      "source_name": src_exp.name,
      "n_layers": (src_exp.model.n_layers, exp.model.n_layers),
      "overrides": [f"{k}={_show(v)}" for k, _, v in config_differences(src_exp, grown, "")] + list(overrides),  # to continue it from the source's experiment
  }


def _show(v: Any) -> str:
  if isinstance(v, bool):
    return str(v).lower()
  if isinstance(v, (list, tuple)):
    return "[" + ",".join(_show(x) for x in v) + "]"
  return str(v)
