"""MIGU: update only the weights that feed each linear layer's largest outputs.

MIGU, MagnItude-based Gradient Updating (Du et al. 2024, "Unlocking Continual Learning Abilities
in Language Models", arXiv 2406.17245): in the forward pass, cache the magnitude of every output
unit of every linear layer, its L1 norm over the batch's tokens (normalised over the layer's
outputs; the normalisation does not change their order); in the backward pass, zero the
gradient of every weight except those feeding the layer's largest outputs. The authors' code
(github.com/wenyudu/MIGU) keeps the outputs at or above the `ini_threshold = 0.7` quantile of a
layer's magnitudes, i.e. the top 30%: `optim.migu_ratio = 0.3` here (the share of outputs
updated; 0 or 1: off), the same count (n - ceil(0.7 (n - 1)) of n outputs, ties at the
threshold kept) by the same rule.

How the forward pass reports the magnitudes. Every weight reaches the activations through the
seam of `jaxlm.layers.linear` (`project`, `grouped`, `mix`), which applies any pytree with those
methods. For a MIGU step the train step replaces each trained linear weight of its (per-step)
copy of the model by a `Tap`: reading it gives a `Tapped` weight that computes the layer's output
as before and passes it through `_tap`, an identity whose custom VJP hands back, as the gradient
of a zero "probe" shaped like the weight's outputs [*stack, *fan_out], the output's L1 norm over
the tokens. So one `jax.grad` returns the statistics beside the gradients, in the parameters'
own layout: a scanned layer's probe [layers, ...] is sliced per layer by the scan and its
gradient stacked back; expert weights [E, D, F] get [E, F] (summed over each expert's rows of the
grouped matmul); microbatches of gradient accumulation add up like the gradients do (the
authors sum over accumulation steps too); under data or expert parallelism the partial sums of
the devices are added like any gradient. No layer knows about it.

  statistic  per output unit: sum over every token of the batch (padding included, as in the
             authors' hook) of |y|; a soft MoE's merged expert weights attribute each segment's
             output magnitude to the experts by its routing weights (the probe is merged like
             the weights; the router gets no gradient from it)
  mask       per linear weight and per stack index (each layer of a scanned stack, each expert
             on its own): the outputs whose magnitude is at least the k-th largest
  which      every trained parameter with fan-in axes (attention, MLP, experts, routers, an
             untied head); embeddings, the tied head, norms and biases train as usual (the
             authors hook `nn.Linear` modules and mask their `weight` only)

The update (`masked`). The paper zeroes the masked gradients and lets AdamW run, so a masked
weight still moves by its momentum and its decoupled weight decay. Here a masked coordinate
skips the step altogether: its gradient is zeroed before the inner optimizer (clipping sees the
masked gradient, as in the authors' code), its update is replaced by -0.0 (x + -0.0 == x
bitwise for every x, -0.0 included), and its optimizer state (AdamW's moments) keeps its old
values, like a sparse ("lazy") Adam. So masked weights and their moments are bitwise unchanged;
the shared step count of the bias correction advances.

With LoRA / DoRA (`peft.method` lora, dora). An adapted weight's output is the layer's output
x W + s (x A) B: B's output columns, the DoRA magnitudes and a trained base (`peft.train_also`)
are masked by its magnitudes; A trains in full (its outputs are the R rank units, which feed
every output; the authors' LoRA code also masks A by the magnitudes of x A, which is not done
here). The selected outputs' columns of s A B still change through A.
"""

from __future__ import annotations

import contextlib
import fractions
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxlm.config import OptimConfig
from jaxlm.layers import linear


def enabled(cfg: OptimConfig) -> bool:
  """MIGU is on for a ratio strictly between 0 and 1 (1 selects every output: plain training)."""
  return 0.0 < cfg.migu_ratio < 1.0


def kept(n: int, ratio: float) -> int:
  """Outputs kept of n: those at or above the (1 - ratio) quantile (linear interpolation, as
  `torch.quantile` in the authors' code): n - ceil((1 - ratio) (n - 1)), at least 1. Exact
  rational arithmetic, so a ratio like 0.3 does not land on the wrong side of an integer."""
  t = 1 - fractions.Fraction(repr(float(ratio)))
  return max(n - math.ceil(t * (n - 1)), 1)


# -- the forward pass: taps that turn output magnitudes into gradients -----------------------------


@jax.custom_vjp
def _tap(y: jax.Array, probe: jax.Array, stat: jax.Array) -> jax.Array:
  """y unchanged; the gradient of `probe` is `stat` (whatever y's cotangent)."""
  del probe, stat
  return y


def _tap_fwd(y, probe, stat):
  del probe
  return y, stat


def _tap_bwd(stat, dy):
  return dy, stat, jnp.zeros_like(stat)


_tap.defvjp(_tap_fwd, _tap_bwd)


def _abs32(y: jax.Array) -> jax.Array:
  return jnp.abs(jax.lax.stop_gradient(y)).astype(jnp.float32)


def _varying_axes(x: jax.Array) -> frozenset:
  """The manual mesh axes (inside a `shard_map`) that x's value varies over."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)  # jax 0.10; older releases call it `vma`
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def _like_probe(stat: jax.Array, probe: jax.Array) -> jax.Array:
  """Inside a `shard_map` (expert parallelism): the devices' partial sums added over the axes the
  probe is replicated on (each holds other tokens), so the statistic varies like the probe."""
  extra = tuple(sorted(_varying_axes(stat) - _varying_axes(probe)))
  stat = jax.lax.psum(stat, extra) if extra else stat
  missing = tuple(sorted(_varying_axes(probe) - _varying_axes(stat)))
  return jax.lax.pcast(stat, missing, to="varying") if missing else stat


@jax.tree_util.register_pytree_node_class
class Tapped:
  """A linear weight (array or adapted weight) whose output magnitudes flow into `probe`
  [*stack, *fan_out] (float32 zeros) as its gradient. Applies itself like the weight."""

  def __init__(self, weight: Any, probe: jax.Array, n_in: int, n_out: int):
    self.weight, self.probe, self.n_in, self.n_out = weight, probe, n_in, n_out

  def tree_flatten(self):
    return (self.weight, self.probe), (self.n_in, self.n_out)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  # -- looks like its weight ----------------------------------------------------------------

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.weight.shape)

  @property
  def dtype(self):
    return self.weight.dtype

  @property
  def base(self) -> jax.Array:
    """The base array (EMoE's router and the soft MoE's sharding read it)."""
    return self.weight.base if linear.is_adapted(self.weight) else self.weight

  def replace(self, *, base: jax.Array) -> "Tapped":
    w = self.weight.replace(base=base) if linear.is_adapted(self.weight) else base
    return Tapped(w, self.probe, self.n_in, self.n_out)

  @property
  def bank_size(self) -> int:
    return linear.bank_size(self.weight)

  def logical_axes(self, base_axes: tuple[str | None, ...]) -> "Tapped":
    n_stack = len(base_axes) - self.n_in - self.n_out
    return Tapped(linear.logical_axes(self.weight, base_axes), base_axes[:n_stack] + base_axes[len(base_axes) - self.n_out :], self.n_in, self.n_out)

  def dense(self, adapter: int | None = None) -> jax.Array:
    return self.weight.dense(adapter) if linear.is_adapted(self.weight) else self.weight

  # -- the seam -----------------------------------------------------------------------------

  def project(self, eq: str, x: jax.Array, **kw: Any) -> jax.Array:
    y = linear.project(eq, x, self.weight, **kw)
    lhs, ys = eq.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    out = "".join(c for c in ws if c in ys)  # the weight's stack and fan-out letters, in its order
    return _tap(y, self.probe, _like_probe(jnp.einsum(f"{ys}->{out}", _abs32(y)), self.probe))

  def grouped(self, x_mk: jax.Array, mm: linear.GroupedMatmul, rows: linear.Rows) -> jax.Array:
    y_mn = linear.grouped(x_mk, self.weight, mm, rows)
    e = rows.n_experts
    stat_en = jax.ops.segment_sum(_abs32(y_mn), rows.expert_m(y_mn.shape[0]), num_segments=e + 1)[:e]  # rows past the groups: E
    return _tap(y_mn, self.probe, _like_probe(stat_en, self.probe))

  def mix(self, w_ge: jax.Array, merge: Callable[..., jax.Array], *, mlp_axis: int, dense: bool = False) -> Any:
    merged = linear.mix(w_ge, self.weight, merge, mlp_axis=mlp_axis, dense=dense)
    if dense:  # a merged array for decoding: no statistics there
      return merged
    probe_g = jnp.einsum("ge,e...->g...", jax.lax.stop_gradient(w_ge).astype(jnp.float32), self.probe)
    return Tapped(merged, probe_g, self.n_in, self.n_out)


class Probe(struct.PyTreeNode):
  """A tapped linear weight's probe: zeros [*stack, *fan_out] (its gradient: the magnitudes)."""

  value: jax.Array
  path: tuple[Any, ...] = struct.field(pytree_node=False)  # where the weight (or its adapted module) sits in the model
  n_in: int = struct.field(pytree_node=False)  # fan-in axes of the weight
  n_out: int = struct.field(pytree_node=False)  # fan-out axes of the weight


class MiguProbe(nnx.Variable):
  """The probe inside the model while a tap is in place (never trained, never saved)."""


class Tap(nnx.Module):
  """Stands in for a linear weight (an `nnx.Param` or an adapted module) during a MIGU step."""

  def __init__(self, inner: Any, probe: jax.Array, n_in: int, n_out: int):
    self.inner = inner
    self.probe = MiguProbe(probe)
    self.n_in, self.n_out = n_in, n_out

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.inner.shape)

  def __getitem__(self, idx: Any) -> Tapped:
    if idx is not Ellipsis:
      raise IndexError("a tapped weight is read whole: w[...]")
    return Tapped(self.inner[...], self.probe[...], self.n_in, self.n_out)


def _key(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def probes(model: nnx.Module, trained: set[tuple[Any, ...]]) -> dict[str, Probe]:
  """A zero probe for every linear weight whose update MIGU masks: a trained `nnx.Param` with
  fan-in axes, or an adapted weight whose output-side variables (LoRA B, DoRA magnitudes, its
  base) are trained. `trained`: the paths of the trained variables."""
  from jaxlm.peft.modules import Adapted

  out: dict[str, Probe] = {}
  nodes = [(tuple(path), node) for path, node in nnx.iter_graph(model)]
  adapted = {path for path, node in nodes if isinstance(node, Adapted)}
  for path, node in nodes:
    if isinstance(node, Adapted):
      if any(path + (leaf,) in trained for leaf in OUTPUT_SIDE):
        shape = node.shape
        out[_key(path)] = Probe(jnp.zeros(shape[: len(shape) - node.n_in - node.n_out] + shape[len(shape) - node.n_out :], jnp.float32), path, node.n_in, node.n_out)
    elif isinstance(node, nnx.Param) and path in trained and path[:-1] not in adapted and (fan_in := linear.fan_in_of(node)) is not None:
      n_in, n_out = len(fan_in), -fan_in[-1] - 1
      shape = tuple(node.shape)
      out[_key(path)] = Probe(jnp.zeros(shape[: len(shape) - n_in - n_out] + shape[len(shape) - n_out :], jnp.float32), path, n_in, n_out)
  return out


OUTPUT_SIDE = ("b", "magnitude", "base")  # an adapted module's variables masked by its outputs (LoRA B, DoRA m, a trained base)


def _get(root: Any, path: tuple[Any, ...]) -> Any:
  for p in path:
    root = root[p] if isinstance(p, int) else getattr(root, p)
  return root


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
  parent = _get(root, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


@contextlib.contextmanager
def tapped(model: nnx.Module, probes_: dict[str, Probe] | None) -> Iterator[nnx.Module]:
  """Inside the block the probed weights of `model` are `Tap`s; on leaving, the model holds its
  own weights again (so its state has its usual structure). None: nothing is tapped."""
  originals = []
  for p in (probes_ or {}).values():
    inner = _get(model, p.path)
    originals.append((p.path, inner))
    _set(model, p.path, Tap(inner, p.value, p.n_in, p.n_out))
  try:
    yield model
  finally:
    for path, inner in reversed(originals):
      _set(model, path, inner)


def magnitudes(graphdef: nnx.GraphDef, params: Any, frozen: Any, rest: Any, batch: dict[str, jax.Array], *, chunk: int = 0) -> dict[str, jax.Array]:
  """{weight path: [*stack, *fan_out] float32}: the output magnitudes a MIGU train step sees on
  `batch` (sum over its tokens of |y|) for every trained linear weight (for tests and analysis)."""
  from jaxlm.train.step import _losses, _model

  trained = {tuple(path) for path, _ in params.flat_state()}
  probes_ = probes(_model(graphdef, params, frozen, rest, train=True), trained)
  grads = jax.grad(lambda pr: _losses(graphdef, params, frozen, rest, batch, train=True, chunk=chunk, probes=pr)[0][0])(probes_)
  return {k: p.value for k, p in grads.items()}


# -- the update: masks from the magnitudes -------------------------------------------------------


def output_mask(stat: jax.Array, n_out: int, ratio: float) -> jax.Array:
  """bool [*stack, *fan_out]: per stack index, the outputs whose magnitude is at least the
  k-th largest of the n outputs (k = `kept(n, ratio)`; ties at the threshold are kept)."""
  n_stack = stat.ndim - n_out
  flat = stat.reshape(stat.shape[:n_stack] + (-1,))
  kth = jax.lax.top_k(flat, kept(flat.shape[-1], ratio))[0][..., -1:]
  return (flat >= kth).reshape(stat.shape)


def _path_of(keypath: tuple[Any, ...]) -> tuple[Any, ...]:
  return tuple(k.key for k in keypath if isinstance(k, jax.tree_util.DictKey))


def masks(params: Any, stats: dict[str, Probe], ratio: float) -> Any:
  """A tree like `params`: for every masked parameter a bool array broadcastable to it (its
  weight's output mask with unit axes for the fan-in, rank and bank axes), True elsewhere."""
  out_masks = {k: output_mask(p.value, p.n_out, ratio) for k, p in stats.items()}

  def one(keypath: tuple[Any, ...], leaf: jax.Array) -> Any:
    path = _path_of(keypath)
    key = _key(path) if _key(path) in stats else _key(path[:-1]) if path[-1] in OUTPUT_SIDE else None
    if key not in stats:
      return True
    m, n_out = out_masks[key], stats[key].n_out
    n_stack = m.ndim - n_out
    shape = tuple(leaf.shape)
    if shape[:n_stack] != m.shape[:n_stack] or shape[len(shape) - n_out :] != m.shape[n_stack:]:
      raise ValueError(f"MIGU: {_key(path)} {shape} does not end in the outputs {m.shape[n_stack:]} of its weight")
    return m.reshape(m.shape[:n_stack] + (1,) * (len(shape) - m.ndim) + m.shape[n_stack:])

  return jax.tree_util.tree_map_with_path(one, params)


def _where(mask: Any, new: jax.Array, old: Any) -> jax.Array:
  return new if mask is True else jnp.where(mask, new, old)


def masked(inner: optax.GradientTransformation, ratio: float) -> optax.GradientTransformationExtraArgs:
  """`inner` restricted to the coordinates MIGU selects (module docstring). Its state is
  `inner`'s; `update` takes the step's magnitudes as `migu_stats` ({path: Probe} with the
  gradients of `probes`; None: no masking)."""

  def init(params: Any) -> optax.OptState:
    return inner.init(params)

  def update(grads: Any, state: optax.OptState, params: Any = None, *, migu_stats: dict[str, Probe] | None = None, **extra: Any):
    if not migu_stats:
      return inner.update(grads, state, params, **extra)
    m = masks(grads, migu_stats, ratio)
    grads = jax.tree.map(lambda g, k: _where(k, g, jnp.zeros((), g.dtype)), grads, m)
    updates, new_state = inner.update(grads, state, params, **extra)
    updates = jax.tree.map(lambda u, k: _where(k, u, jnp.asarray(-0.0, u.dtype)), updates, m)
    # The inner state's parameter-shaped parts (moments) keep their old values where masked.
    state_masks = optax.tree_map_params(inner, lambda _, k: k, new_state, m, transform_non_params=lambda _: True)
    new_leaves, treedef = jax.tree.flatten(new_state)
    old_leaves = treedef.flatten_up_to(state)
    mask_leaves = treedef.flatten_up_to(state_masks)
    new_state = treedef.unflatten([_where(k, n, o) for n, o, k in zip(new_leaves, old_leaves, mask_leaves)])
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)
