"""Skipping bad updates: a NaN/Inf loss or gradient, and (optionally) a loss spike.

`guarded(tx, cfg)` wraps the optimizer. Its state, `Guarded(inner, guard)`, is the train state's
`opt_state`: the counters and the loss statistics are sharded, donated and checkpointed with the
optimizer's moments, so a resumed run judges spikes exactly as an uninterrupted one would.

An update is skipped when
  * the loss (the batch's mean cross-entropy), a gradient or an update holds a NaN or an Inf, or
  * `train.spike_sigma > 0` and the loss exceeds the rolling mean by more than spike_sigma
    rolling standard deviations, once `train.spike_window` losses have been seen.
A skipped update is zero and leaves the inner optimizer state (moments, step count, hence the
learning-rate schedule) bit-identical; the train step keeps the parameters and the model's
non-trainable state bit-identical too (`GuardState.applied`). The train state's own `step`
still advances: it counts batches, `train.steps` batches are consumed whatever is skipped, and
a skipped batch is not retried.

With `train.nonfinite="stop"` the update is skipped just the same; the loop stops the run,
naming the step, when it next reads the metrics (within `train.log_every` steps, and always
before a checkpoint: `jaxlm.train.loop`).

The rolling statistics are exponentially weighted over `spike_window` losses (an exact running
mean and variance over the first `spike_window`), fed with the loss of every step whose values
are finite, skipped spikes included: a lasting change of level (a new data stage) is absorbed
within about a window instead of being skipped for ever.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlm.config import TrainConfig
from jaxlm.errors import TrainingError


class GuardState(NamedTuple):
  skipped_nonfinite: jax.Array  # int32: updates skipped for a NaN/Inf loss, gradient or update, in total
  skipped_spikes: jax.Array  # int32: updates skipped for a loss spike, in total
  last_nonfinite_step: jax.Array  # int32: the train step of the latest non-finite one (-1: none yet)
  applied: jax.Array  # bool: whether the latest update was applied
  loss_mean: jax.Array  # float32: rolling mean of the loss
  loss_var: jax.Array  # float32: rolling variance of the loss
  losses_seen: jax.Array  # int32: losses fed into the rolling statistics

  @staticmethod
  def initial() -> "GuardState":
    i32, f32 = lambda v: jnp.asarray(v, jnp.int32), lambda v: jnp.asarray(v, jnp.float32)
    return GuardState(i32(0), i32(0), i32(-1), jnp.asarray(True), f32(0.0), f32(0.0), i32(0))


class Guarded(NamedTuple):
  inner: optax.OptState  # the wrapped optimizer's state
  guard: GuardState


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point leaf of `tree` is free of NaN and Inf (a bool scalar)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def judge(g: GuardState, cfg: TrainConfig, *, loss: jax.Array, finite: jax.Array, step: jax.Array) -> GuardState:
  """The guard's state after one step with this loss; `applied` says whether to apply its update."""
  loss = loss.astype(jnp.float32)
  spike = finite & (g.losses_seen >= cfg.spike_window) & (loss > g.loss_mean + cfg.spike_sigma * jnp.sqrt(g.loss_var)) if cfg.spike_sigma > 0 else jnp.asarray(False)
  # Exponentially weighted mean and variance (West 1979); alpha = 1 / n over the first window.
  alpha = 1.0 / jnp.minimum(g.losses_seen + 1, cfg.spike_window).astype(jnp.float32)
  diff = loss - g.loss_mean
  mean = g.loss_mean + alpha * diff
  var = (1.0 - alpha) * (g.loss_var + alpha * diff * diff)
  return GuardState(
      skipped_nonfinite=g.skipped_nonfinite + (~finite).astype(jnp.int32),
      skipped_spikes=g.skipped_spikes + spike.astype(jnp.int32),
      last_nonfinite_step=jnp.where(finite, g.last_nonfinite_step, step.astype(jnp.int32)),
      applied=finite & ~spike,
      loss_mean=jnp.where(finite, mean, g.loss_mean),
      loss_var=jnp.where(finite, var, g.loss_var),
      losses_seen=g.losses_seen + finite.astype(jnp.int32),
  )


def guarded(tx: optax.GradientTransformation, cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
  """`tx` that skips bad updates (module docstring). `update` takes the step's mean loss and
  train step number as keyword arguments: `tx.update(grads, state, params, loss=, step=)`."""

  def init(params: Any) -> Guarded:
    return Guarded(tx.init(params), GuardState.initial())

  def update(grads: Any, state: Guarded, params: Any = None, *, loss: jax.Array, step: jax.Array, **extra: Any) -> tuple[Any, Guarded]:
    updates, inner = tx.update(grads, state.inner, params, **extra)
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(updates)
    g = judge(state.guard, cfg, loss=loss, finite=finite, step=step)
    keep = lambda new, old: jnp.where(g.applied, new, old)
    updates = jax.tree.map(lambda u: jnp.where(g.applied, u, jnp.zeros_like(u)), updates)
    return updates, Guarded(jax.tree.map(keep, inner, state.inner), g)

  return optax.GradientTransformationExtraArgs(init, update)


class SkipReport:
  """The host's side: reports the updates skipped since it last looked (the guard's counters, as
  the train step's metrics or the state carry them) and, with train.nonfinite="stop", stops the
  run with a `TrainingError` naming the step."""

  def __init__(self, cfg: TrainConfig, initial: GuardState, print_fn: Callable[[str], None], last_checkpoint: Callable[[], int | None]):
    self.cfg, self.print, self.last_checkpoint = cfg, print_fn, last_checkpoint
    self.seen = (int(initial.skipped_nonfinite), int(initial.skipped_spikes))  # a resumed run's earlier skips are old news

  def __call__(self, step_no: int, skipped_nonfinite: Any, skipped_spikes: Any, last_nonfinite_step: Any) -> None:
    nonfinite, spikes, last = int(skipped_nonfinite), int(skipped_spikes), int(last_nonfinite_step)
    new_nonfinite, new_spikes = nonfinite - self.seen[0], spikes - self.seen[1]
    self.seen = (nonfinite, spikes)
    if new_nonfinite and self.cfg.nonfinite == "stop":
      ckpt = self.last_checkpoint()
      resume = f"rerunning resumes from the checkpoint of step {ckpt}" if ckpt is not None else "no checkpoint was written"
      raise TrainingError(f"step {last}: non-finite loss or gradient (train.nonfinite='stop'); its update was skipped and nothing after it is checkpointed; {resume}")
    if new_nonfinite:
      self.print(f"step {step_no:>6}  skipped {new_nonfinite} update(s) with a non-finite loss or gradient (latest at step {last}; {nonfinite} in the run)")
    if new_spikes:
      self.print(f"step {step_no:>6}  skipped {new_spikes} update(s) at a loss spike (train.spike_sigma={self.cfg.spike_sigma:g}; {spikes} in the run)")
