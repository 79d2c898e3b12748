"""The train state and the pure step functions: `train_step(state, batch)`, `eval_step(params, rest, batch)`.

The model is split once into a static graph definition, its trainable parameters and the rest
(non-trainable variables). The state is a plain pytree (step, params, rest, opt_state) so it
can be jitted with explicit shardings, donated, and checkpointed as is.
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

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: nnx.State  # trainable variables (nnx.Param)
  rest: nnx.State  # everything else the model holds (non-trainable state)
  opt_state: optax.OptState


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, rest)."""
  return nnx.split(model, nnx.Param, ...)


def state_shardings(graphdef_params_rest: tuple[Any, nnx.State, nnx.State], tx: optax.GradientTransformation, mesh: Mesh, rules=None) -> TrainState:
  """Shardings of every leaf of the train state: params by their logical axes, the optimizer's
  moments like their params, scalars replicated."""
  _, params, rest = graphdef_params_rest
  p_sh = sharding.state_shardings(params, mesh, rules)
  r_sh = sharding.state_shardings(rest, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, params)
  o_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_sh, transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return TrainState(step=replicated, params=p_sh, rest=r_sh, opt_state=o_sh)


def token_losses(logits_blv: jax.Array, targets_bl: jax.Array, mask_bl: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of cross-entropy, sum of logsumexp^2 (z-loss), number of tokens) over masked tokens."""
  logits = logits_blv.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_bl[..., None], axis=-1)[..., 0]
  m = mask_bl.astype(jnp.float32)
  return jnp.sum((lse - target_logit) * m), jnp.sum(lse * lse * m), jnp.sum(m)


def _forward(graphdef, params, rest, batch, *, train: bool):
  """Logits, aux and the model's non-trainable state after the call.

  Layers may update their own non-trainable variables in a training forward pass (like batch
  statistics: e.g. a router's load-balancing bias or an RNG counter); the updated `rest` is
  returned so the step can carry it. In evaluation (`model.eval()`: `deterministic=True` on
  every module that has the attribute) they must not.
  """
  model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables: layers may update them in this trace
  if not train:
    model.eval()
  logits, aux = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
  return logits, aux, nnx.state(model, nnx.Not(nnx.Param))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr: optax.Schedule, exp: Experiment) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The pure train step: gradient accumulation over `train.grad_accum` microbatches, AdamW update.

  The objective is token-weighted over the whole batch: every microbatch contributes its
  cross-entropy sum divided by the batch's token count, so accumulation gives exactly the
  full-batch gradient. Auxiliary losses (MoE balance, ...) are averaged over microbatches.
  """
  accum, z_weight = exp.train.grad_accum, exp.train.z_loss_weight

  def loss_fn(params, rest, mb, n_total):
    logits, aux, rest = _forward(graphdef, params, rest, mb, train=True)
    ce, z, n = token_losses(logits, mb["targets"], mb["loss_mask"])
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

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    n_total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    if accum == 1:
      grads, (stats, rest) = grad_fn(state.params, state.rest, batch, n_total)
    else:
      # Microbatch a takes rows a, a + A, a + 2A, ...: each microbatch stays spread over all
      # devices of the batch axes (a contiguous split would leave most devices idle).
      def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        return sharding.shard(x, None, "batch", *([None] * (x.ndim - 2)))

      mbs = jax.tree.map(split, batch)
      zeros = jax.tree.map(jnp.zeros_like, state.params)

      def body(carry, mb):
        g_acc, s_acc, rest = carry
        g, (s, rest) = grad_fn(state.params, rest, mb, n_total)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s), rest), None

      stats0 = jax.eval_shape(lambda: grad_fn(state.params, state.rest, jax.tree.map(lambda x: x[0], mbs), n_total)[1][0])
      init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats0), state.rest)
      (grads, stats, rest), _ = jax.lax.scan(body, init, mbs)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ce = stats.pop("ce_sum") / n_total
    metrics = {
        "loss": ce,
        "z_loss": stats.pop("z_sum") / n_total,
        "tokens": stats.pop("tokens"),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "lr": lr(state.step),
        **stats,
    }
    return TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[nnx.State, nnx.State, Batch], Metrics]:
  """Sum of cross-entropy and token count on one batch, plus the model's aux metrics."""

  def eval_step(params, rest, batch):
    logits, aux, _ = _forward(graphdef, params, rest, batch, train=False)
    ce, _, n = token_losses(logits, batch["targets"], batch["loss_mask"])
    return {"ce_sum": ce, "tokens": n, **{f"metrics/{k}": v for k, v in aux.get("metrics", {}).items()}}

  return eval_step
