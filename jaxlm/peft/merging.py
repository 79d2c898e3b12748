"""Model merging over parameter pytrees, and the exact weighted merge of LoRA adapters.

A checkpoint is a pytree of arrays (e.g. `nnx.to_pure_dict(nnx.state(model))`). Every merge
works leaf by leaf on the task vectors tau_i = theta_i - base of fine-tuned models theta_i
that share the base's structure and shapes. Leaves that are not floating point (step
counters, ...) are taken from `base` unchanged. Arithmetic runs in at least float32; each
merged leaf is cast back to the base leaf's dtype. All functions are pure and jittable (the
hyperparameters `density`, `drop`, `combine`, `rank`, `n_stack`, `n_in` are static).

  task_vectors(base, tasks)               tau_i = theta_i - base
  task_arithmetic(base, tasks, weights)   base + sum_i w_i tau_i
      Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089
  ties(base, tasks, density=)             trim, elect sign, disjoint mean
      Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
      arXiv:2306.01708
  dare(base, tasks, drop=, key=)          random drop and rescale, then linear or TIES
      Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
      Models as a Free Lunch", arXiv:2311.03099
  lora_delta, lora_cat, svd_truncate      LoRA adapters (Hu et al. 2022, arXiv:2106.09685)

LoRA layout: a [*stack, *fan_in, R], b [*stack, R, *fan_out]; the weight delta is
scale * sum_R a b. `lora_cat` merges adapters exactly. For TIES or DARE over adapters, merge
their dense deltas and re-factorise:

  deltas = [{"w": lora_delta(a, b, s)} for a, b, s in adapters]
  zero = jax.tree.map(jnp.zeros_like, deltas[0])
  a, b = svd_truncate(ties(zero, deltas, density=0.2)["w"], rank=8)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import zip_longest
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import keystr, tree_flatten_with_path

from jaxlm.errors import ConfigError

PyTree = Any
Weights = float | Sequence[float] | jax.Array


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _f32(x) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _nonempty(items, what: str = "task models") -> list:
  items = list(items)
  if not items:
    raise ConfigError(f"no {what} to merge")
  return items


def _weights(weights: Weights, n: int, what: str = "tasks") -> list:
  """One weight per item, from a scalar or a sequence of length n."""
  if not isinstance(weights, (list, tuple)) and jnp.ndim(weights) == 0:
    return [weights] * n
  ws = list(weights)
  if len(ws) != n:
    raise ConfigError(f"got {len(ws)} weights for {n} {what}")
  return ws


def _check_density(density: float) -> None:
  if not 0 < density <= 1:
    raise ConfigError(f"density must be in (0, 1], got {density}")


def _flatten(base: PyTree, tasks: list[PyTree]) -> tuple[list, list[list], Any]:
  """Leaves of base and of every task, checking each task has base's paths and shapes."""
  base_kv, treedef = tree_flatten_with_path(base)
  name = lambda p: "nothing" if p is None else keystr(p)
  task_leaves = []
  for i, task in enumerate(tasks):
    kv, _ = tree_flatten_with_path(task)
    for (p, x), (q, y) in zip_longest(base_kv, kv, fillvalue=(None, None)):
      if p != q:
        raise ConfigError(f"task {i} differs from base in structure: base has {name(p)}, task has {name(q)}")
      if jnp.shape(x) != jnp.shape(y):
        raise ConfigError(f"task {i} differs from base at {keystr(p)}: shape {jnp.shape(y)} != {jnp.shape(x)}")
    task_leaves.append([y for _, y in kv])
  return [x for _, x in base_kv], task_leaves, treedef


def _merge(base: PyTree, tasks: list[PyTree], delta: Callable[[int, list[jax.Array]], jax.Array]) -> PyTree:
  """base + delta(j, [tau_i of leaf j]) on every floating-point leaf j; other leaves from base.

  Flattens rather than `jax.tree.map`s so that DARE can fold the leaf index j into its key.
  """
  base_leaves, task_leaves, treedef = _flatten(base, tasks)
  out = []
  for j, b in enumerate(base_leaves):
    if _is_float(b):
      b32 = _f32(b)
      b = (b32 + delta(j, [_f32(t[j]) - b32 for t in task_leaves])).astype(jnp.result_type(b))
    out.append(b)
  return jax.tree.unflatten(treedef, out)


def _linear(taus: list[jax.Array], ws: list) -> jax.Array:
  return sum(w * t for w, t in zip(ws, taus))


def _trim(x: jax.Array, density: float) -> jax.Array:
  """Zero all but the ceil(density * size) largest-magnitude entries of x (any shape).

  Exactly that many are kept; among equal magnitudes the lower flat index wins (`top_k` is
  stable). `round` keeps float noise such as 0.7 * 10 = 7.000000000000001 from adding one.
  """
  k = max(1, math.ceil(round(density * x.size, 6)))
  if k >= x.size:
    return x
  _, idx = jax.lax.top_k(jnp.abs(x).ravel(), k)
  keep = jnp.zeros(x.size, bool).at[idx].set(True).reshape(x.shape)
  return jnp.where(keep, x, 0)


def _ties(taus: list[jax.Array], ws: list, density: float) -> jax.Array:
  """TIES on one leaf: trim each w_i tau_i, elect sign(sum), mean of the agreeing entries."""
  trimmed = jnp.stack([w * _trim(t, density) for t, w in zip(taus, ws)])  # [N, *shape]
  sign = jnp.sign(trimmed.sum(0))
  agree = (jnp.sign(trimmed) == sign) & (trimmed != 0)
  return jnp.where(agree, trimmed, 0).sum(0) / jnp.maximum(agree.sum(0), 1)


def task_vectors(base: PyTree, tasks: Sequence[PyTree]) -> list[PyTree]:
  """tau_i = theta_i - base, in the base leaves' dtypes.

  Non-float leaves of tau_i are zeros (a counter has no meaningful difference), so that
  base + tau_i leaves them as they are in base.
  """
  tasks = _nonempty(tasks)
  base_leaves, task_leaves, treedef = _flatten(base, tasks)
  diff = lambda b, t: (_f32(t) - _f32(b)).astype(jnp.result_type(b)) if _is_float(b) else jnp.zeros_like(b)
  return [jax.tree.unflatten(treedef, [diff(b, t) for b, t in zip(base_leaves, leaves)]) for leaves in task_leaves]


def task_arithmetic(base: PyTree, tasks: Sequence[PyTree], weights: Weights = 1.0) -> PyTree:
  """base + sum_i w_i (theta_i - base) (Ilharco et al. 2023); one weight for all, or one per task."""
  tasks = _nonempty(tasks)
  ws = _weights(weights, len(tasks))
  return _merge(base, tasks, lambda j, taus: _linear(taus, ws))


def ties(base: PyTree, tasks: Sequence[PyTree], *, density: float, weights: Weights = 1.0) -> PyTree:
  """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

  Per entry of every leaf, with t_i = w_i * trim(tau_i):
    trim:  keep the ceil(density * size) largest |tau_i| entries of the leaf, zero the rest;
    elect: s = sign(sum_i t_i);
    merge: base + mean of those t_i with sign(t_i) == s (0 where none agree).
  Trimming is per tensor (leaf), as PEFT and mergekit do, not over the whole model as in the
  paper; it keeps every tensor's share of updates equal and needs no global sort.
  """
  tasks = _nonempty(tasks)
  ws = _weights(weights, len(tasks))
  _check_density(density)
  return _merge(base, tasks, lambda j, taus: _ties(taus, ws, density))


def dare(
    base: PyTree, tasks: Sequence[PyTree], *, drop: float, key: jax.Array, weights: Weights = 1.0,
    combine: str = "linear", density: float = 1.0,
) -> PyTree:
  """DARE (Yu et al. 2024): Drop And REscale every task vector, then combine.

  Each entry of tau_i is zeroed with probability `drop` and the kept ones are multiplied by
  1 / (1 - drop), so the expected task vector is unchanged. Task i, leaf j draws its mask from
  fold_in(fold_in(key, i), j). `combine`: "linear" (task arithmetic with `weights`) or "ties"
  (TIES with `density` and `weights`).
  """
  tasks = _nonempty(tasks)
  ws = _weights(weights, len(tasks))
  if not 0 <= drop < 1:
    raise ConfigError(f"DARE drop must be in [0, 1), got {drop}")
  _check_density(density)
  if combine not in ("linear", "ties"):
    raise ConfigError(f"unknown DARE combine {combine!r}; known: linear, ties")

  def delta(j: int, taus: list[jax.Array]) -> jax.Array:
    kept = []
    for i, t in enumerate(taus):
      mask = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, i), j), 1.0 - drop, t.shape)
      kept.append(jnp.where(mask, t / (1.0 - drop), 0))
    return _linear(kept, ws) if combine == "linear" else _ties(kept, ws, density)

  return _merge(base, tasks, delta)


def lora_delta(a: jax.Array, b: jax.Array, scale: float = 1.0, *, n_stack: int = 0) -> jax.Array:
  """Dense weight delta of one adapter: a [*stack, *fan_in, R], b [*stack, R, *fan_out]
  -> scale * sum_R a b: [*stack, *fan_in, *fan_out]."""
  if a.shape[-1] != b.shape[n_stack] or a.shape[:n_stack] != b.shape[:n_stack]:
    raise ConfigError(f"LoRA a {a.shape} and b {b.shape} do not match with n_stack={n_stack}")
  stack, fan_in, fan_out = a.shape[:n_stack], a.shape[n_stack:-1], b.shape[n_stack + 1 :]
  a_ir = a.reshape(*stack, math.prod(fan_in), a.shape[-1])
  b_ro = b.reshape(*stack, b.shape[n_stack], math.prod(fan_out))
  return scale * jnp.matmul(a_ir, b_ro, precision=jax.lax.Precision.HIGHEST).reshape(*stack, *fan_in, *fan_out)


def lora_cat(
    adapters: Sequence[tuple[jax.Array, jax.Array, float]], weights: Weights = 1.0, *, n_stack: int = 0, n_in: int = 1
) -> tuple[jax.Array, jax.Array]:
  """Exact weighted merge of LoRA adapters (a_i, b_i, scale_i) by concatenation along rank.

  a_cat = concat_i(w_i scale_i a_i) [*stack, *fan_in, sum R_i], b_cat = concat_i(b_i)
  [*stack, sum R_i, *fan_out]; the merged adapter has scale 1. Exact because the contraction
  over the concatenated rank axis is the sum of the per-block contractions:
  sum_R a_cat b_cat = sum_i w_i scale_i sum_{R_i} a_i b_i. Ranks may differ. PEFT's "linear"
  merge instead sums sqrt(w_i scale_i) a_i and sqrt(w_i scale_i) b_i separately: the product
  then has cross terms a_i b_j (i != j), needs equal ranks and cannot take negative weights.
  """
  adapters = _nonempty(adapters, "LoRA adapters")
  ws = _weights(weights, len(adapters), "adapters")
  a0, b0, _ = adapters[0]
  for i, (a, b, _) in enumerate(adapters):
    ok = a.ndim == n_stack + n_in + 1 and a.shape[:-1] == a0.shape[:-1] and a.shape[-1] == b.shape[n_stack]
    if not (ok and b.shape[:n_stack] == a.shape[:n_stack] and b.shape[n_stack + 1 :] == b0.shape[n_stack + 1 :]):
      raise ConfigError(
          f"LoRA adapter {i}: a {a.shape}, b {b.shape} do not fit adapter 0 (a {a0.shape}, b {b0.shape})"
          f" with n_stack={n_stack}, n_in={n_in}"
      )
  a_cat = jnp.concatenate([w * s * a for (a, _, s), w in zip(adapters, ws)], axis=-1)
  b_cat = jnp.concatenate([b for _, b, _ in adapters], axis=n_stack)
  return a_cat, b_cat


def svd_truncate(delta: jax.Array, rank: int, *, n_stack: int = 0, n_in: int = 1) -> tuple[jax.Array, jax.Array]:
  """Best rank-`rank` factorisation (Eckart-Young) of a dense delta [*stack, *fan_in, *fan_out].

  Per stack index, fan_in axes are flattened to rows and fan_out to columns; with
  delta = U S V^T, a = U_r sqrt(S_r) [*stack, *fan_in, rank] and b = sqrt(S_r) V_r^T
  [*stack, rank, *fan_out], an adapter of scale 1 with balanced factors.
  """
  stack, fan_in, fan_out = delta.shape[:n_stack], delta.shape[n_stack : n_stack + n_in], delta.shape[n_stack + n_in :]
  rows, cols = math.prod(fan_in), math.prod(fan_out)
  if not 1 <= rank <= min(rows, cols):
    raise ConfigError(f"SVD rank must be in [1, {min(rows, cols)}] for a {rows}x{cols} delta, got {rank}")
  u, s, vt = jnp.linalg.svd(_f32(delta).reshape(*stack, rows, cols), full_matrices=False)
  root = jnp.sqrt(s[..., :rank])
  a = u[..., :rank] * root[..., None, :]
  b = root[..., :, None] * vt[..., :rank, :]
  dtype = jnp.result_type(delta)
  return a.reshape(*stack, *fan_in, rank).astype(dtype), b.reshape(*stack, rank, *fan_out).astype(dtype)
