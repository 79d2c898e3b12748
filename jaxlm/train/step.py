"""The train state and the pure step functions: `train_step(state, batch)`, `eval_step(params, frozen, rest, batch)`.

The model is split once into a static graph definition, its trainable parameters (the PEFT
config's `trainable` filter; every `nnx.Param` by default), its frozen parameters (the base
weights under PEFT, empty otherwise) and the rest (non-trainable state). The state is a plain
pytree (step, params, frozen, rest, opt_state): jitted with explicit shardings and checkpointed
as is. Gradients are taken only with respect to `params`, so the backward pass never forms the
frozen weights' gradients, and the optimizer holds moments for `params` only. `JittedStep`
donates the state except `frozen` (which is never rewritten). `opt_state` also holds the guard
that skips non-finite updates and loss spikes (`jaxlm.train.guard`), checkpointed with it.

The loss is computed from the model's final hidden states and its output head in chunks of
`train.loss_chunk` positions (`jaxlm.train.loss`): the float32 logits never exist whole.

A batch may carry `adapter_ids` [B]: the adapter of every example when the model holds a bank
of adapters (`jaxlm.peft.use_adapter`), in training as in evaluation.

With `optim.migu_ratio` (MIGU, `jaxlm.train.migu`) the trained linear weights are tapped in the
training forward pass: the same `jax.grad` returns, beside the gradients, every such weight's
output magnitudes (the gradients of zero probes), which the optimizer turns into its masks.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import sharding
from jaxlm.config import Experiment
from jaxlm.layers.linear import use_adapter
from jaxlm.train import guard, migu
from jaxlm.train.loss import chunked_token_losses, token_losses  # noqa: F401 (token_losses: re-exported)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: nnx.State  # trainable variables (the PEFT config's filter; every nnx.Param by default)
  frozen: nnx.State  # parameters that are not trained (the base model under PEFT): never donated or re-saved
  rest: nnx.State  # everything else the model holds (non-trainable state)
  opt_state: guard.Guarded  # the optimizer's state behind the guard against bad updates


def is_parameter(path: Any, v: Any) -> bool:
  """Base weights and adapter weights (the rest is state: counters, biases of routers, ...)."""
  from jaxlm.peft.modules import AdapterParam

  return isinstance(v, (nnx.Param, AdapterParam))


def split_model(model: nnx.Module, trainable: Any = nnx.Param) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
  """(graphdef, trainable params, frozen params, rest)."""
  return nnx.split(model, trainable, is_parameter, ...)


def state_shardings(split: tuple[Any, nnx.State, nnx.State, nnx.State], tx: optax.GradientTransformation, mesh: Mesh, rules=None) -> TrainState:
  """Shardings of every leaf of the train state: params by their logical axes, the optimizer's
  moments like their params, scalars replicated."""
  _, params, frozen, rest = split
  p_sh = sharding.state_shardings(params, mesh, rules)
  f_sh = sharding.state_shardings(frozen, mesh, rules)
  r_sh = sharding.state_shardings(rest, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, params)
  o_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_sh, transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return TrainState(step=replicated, params=p_sh, frozen=f_sh, rest=r_sh, opt_state=o_sh)


def guarded_optimizer(tx: optax.GradientTransformation, exp: Experiment) -> optax.GradientTransformationExtraArgs:
  """The optimizer whose state the train state holds: `tx` behind the guard that skips
  non-finite updates and loss spikes (`jaxlm.train.guard`)."""
  return guard.guarded(tx, exp.train)


def _model(graphdef, params, frozen, rest, *, train: bool) -> nnx.Module:
  model = nnx.merge(graphdef, params, frozen, rest, copy=True)  # fresh Variables: layers may update them in this trace
  if not train:
    model.eval()
  return model


def _forward(graphdef, params, frozen, rest, batch, *, train: bool):
  """Logits, aux and the model's non-trainable state after the call.

  Layers may update their own non-trainable variables in a training forward pass (like batch
  statistics: e.g. a router's load-balancing bias or an RNG counter); the updated `rest` is
  returned so the step can carry it. In evaluation (`model.eval()`: `deterministic=True` on
  every module that has the attribute) they must not.
  """
  model = _model(graphdef, params, frozen, rest, train=train)
  with use_adapter(batch.get("adapter_ids")):
    logits, aux = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
  return logits, aux, nnx.state(model, nnx.Not(is_parameter))


def _losses(graphdef, params, frozen, rest, batch, *, train: bool, chunk: int, probes=None):
  """(cross-entropy sum, z-loss sum, token count), aux and the model's non-trainable state after
  the call, like `_forward` but with the loss computed `chunk` positions at a time (`jaxlm.train.loss`).
  `probes`: MIGU's probes (`migu.probes`), whose weights are tapped during the call."""
  model = _model(graphdef, params, frozen, rest, train=train)
  with use_adapter(batch.get("adapter_ids")), migu.tapped(model, probes):
    x_bld, aux = model.hidden(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    losses = chunked_token_losses(model.head_fn(), x_bld, batch["targets"], batch["loss_mask"], chunk=chunk)
  return losses, aux, nnx.state(model, nnx.Not(is_parameter))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr: optax.Schedule, exp: Experiment) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The pure train step: gradient accumulation over `train.grad_accum` microbatches, AdamW update.

  The objective is token-weighted over the whole batch: every microbatch contributes its
  cross-entropy sum divided by the batch's token count, so accumulation gives exactly the
  full-batch gradient. Auxiliary losses (MoE balance, ...) are averaged over microbatches. The
  cross-entropy is computed `train.loss_chunk` positions at a time.

  `tx` is the plain optimizer; the state's `opt_state` is `guarded_optimizer(tx, exp)`'s. A
  skipped update (a non-finite loss or gradient, a loss spike: `jaxlm.train.guard`) leaves
  params, optimizer state and the model's non-trainable state bit-identical; `state.step` counts
  batches and advances anyway. The metrics count the skipped updates since the run began.
  """
  accum, z_weight, chunk = exp.train.grad_accum, exp.train.z_loss_weight, exp.train.loss_chunk
  tx = guarded_optimizer(tx, exp)
  use_migu = migu.enabled(exp.optim)

  def loss_fn(params, probes, frozen, rest, mb, n_total):
    (ce, z, n), aux, rest = _losses(graphdef, params, frozen, rest, mb, train=True, chunk=chunk, probes=probes)
    aux_losses = aux.get("losses", {})
    loss = ce / n_total + z_weight * z / n_total + sum(aux_losses.values(), jnp.float32(0)) / accum
    stats = {
        "ce_sum": ce,
        "z_sum": z,
        "tokens": n,
        **{f"aux/{k}": v / accum for k, v in aux_losses.items()},
        **{f"metrics/{k}": v.astype(jnp.float32) / accum for k, v in aux.get("metrics", {}).items()},
    }
    return loss, (stats, rest)

  grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)  # (params, MIGU probes: their gradients are the magnitudes)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    n_total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    probes = None
    if use_migu:
      trained = {tuple(path) for path, _ in state.params.flat_state()}
      probes = migu.probes(_model(graphdef, state.params, state.frozen, state.rest, train=True), trained)
    if accum == 1:
      grads, (stats, rest) = grad_fn(state.params, probes, state.frozen, state.rest, batch, n_total)
    else:
      # Microbatch a takes rows a, a + A, a + 2A, ...: each microbatch stays spread over all
      # devices of the batch axes (a contiguous split would leave most devices idle).
      def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        return sharding.shard(x, None, "batch", *([None] * (x.ndim - 2)))

      mbs = jax.tree.map(split, batch)
      zeros = jax.tree.map(jnp.zeros_like, (state.params, probes))

      def body(carry, mb):
        g_acc, s_acc, rest = carry
        g, (s, rest) = grad_fn(state.params, probes, state.frozen, rest, mb, n_total)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s), rest), None

      stats0 = jax.eval_shape(lambda: grad_fn(state.params, probes, state.frozen, state.rest, jax.tree.map(lambda x: x[0], mbs), n_total)[1][0])
      init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats0), state.rest)
      (grads, stats, rest), _ = jax.lax.scan(body, init, mbs)
    grads, magnitudes = grads
    ce = stats.pop("ce_sum") / n_total
    extra = {"migu_stats": magnitudes} if use_migu else {}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=ce, step=state.step + 1, **extra)
    g = opt_state.guard
    keep = lambda new, old: jnp.where(g.applied, new, old)  # bitwise the old values on a skipped update
    params = jax.tree.map(keep, optax.apply_updates(state.params, updates), state.params)
    rest = jax.tree.map(keep, rest, state.rest)
    skipped_before = state.opt_state.guard.skipped_nonfinite + state.opt_state.guard.skipped_spikes
    metrics = {
        "loss": ce,
        "z_loss": stats.pop("z_sum") / n_total,
        "tokens": stats.pop("tokens"),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "lr": lr(state.step - skipped_before),  # the schedule advances with applied updates only
        "skipped_nonfinite": g.skipped_nonfinite,
        "skipped_spikes": g.skipped_spikes,
        "last_nonfinite_step": g.last_nonfinite_step,
        **stats,
    }
    return state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_chunk: int = 0) -> Callable[[nnx.State, nnx.State, nnx.State, Batch], Metrics]:
  """Sum of cross-entropy and token count on one batch (`loss_chunk` positions at a time, as in
  training), plus the model's aux metrics."""

  def eval_step(params, frozen, rest, batch):
    (ce, _, n), aux, _ = _losses(graphdef, params, frozen, rest, batch, train=False, chunk=loss_chunk)
    return {"ce_sum": ce, "tokens": n, **{f"metrics/{k}": v for k, v in aux.get("metrics", {}).items()}}

  return eval_step


class JittedStep:
  """`jax.jit` of `train_step(state, batch)` that donates the state except its frozen part.

  Called like the step; `lower(state, batch).compile()` gives a compiled step called the same
  way (with `memory_analysis`, `cost_analysis` of the compiled executable).
  """

  def __init__(self, step_fn: Callable[[TrainState, Batch], tuple[TrainState, Metrics]], shardings: TrainState, batch_sharding: Any):
    def without_frozen(frozen, state, batch):
      new, metrics = step_fn(state.replace(frozen=frozen), batch)
      return new.replace(frozen=None), metrics

    mutable = shardings.replace(frozen=None)
    self._jit = jax.jit(without_frozen, in_shardings=(shardings.frozen, mutable, batch_sharding), out_shardings=(mutable, None), donate_argnums=1)

  @staticmethod
  def _args(state: TrainState, batch: Batch) -> tuple:
    return state.frozen, state.replace(frozen=None), batch

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    new, metrics = self._jit(*self._args(state, batch))
    return new.replace(frozen=state.frozen), metrics

  def lower(self, state: TrainState, batch: Batch) -> "_Lowered":
    return _Lowered(self._jit.lower(*self._args(state, batch)))


class _Lowered:
  def __init__(self, lowered: Any):
    self.lowered = lowered

  def compile(self) -> "_Compiled":
    return _Compiled(self.lowered.compile())

  def __getattr__(self, name: str) -> Any:
    return getattr(self.lowered, name)


class _Compiled:
  def __init__(self, compiled: Any):
    self.compiled = compiled

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    new, metrics = self.compiled(*JittedStep._args(state, batch))
    return new.replace(frozen=state.frozen), metrics

  def __getattr__(self, name: str) -> Any:
    return getattr(self.compiled, name)
