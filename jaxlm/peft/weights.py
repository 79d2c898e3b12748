"""Adapted weights: what a layer's `self.w[...]` returns once PEFT has adapted the weight.

Each is a pytree that applies itself through the seam of `jaxlm.layers.linear` (`project` for
einsum projections, `grouped` for the experts' grouped matmul, `mix` for the soft MoE's merge)
and can `dense()`-materialise itself for merging. The frozen weight W is never updated by them;
the training path is always the unmerged one, so the backward pass never forms W's gradient.

  LoRAWeight  y = x W + s (drop(x) A) B                      (Hu et al. 2021, arXiv 2106.09685)
              DoRA: y = m / ||W + s A B||_c * (x W + s drop(x) A B), the column norm over the
              fan-in axes detached (Liu et al. 2024, arXiv 2402.09353, Sec. 4.3); computed as
              ||W||^2 + 2 s <A^T W, B> + s^2 B^T (A^T A) B, never forming W + s A B.
  IA3Weight   y = (x W) * l (fan-out side: keys, values) or (x * l) W (fan-in side: the FFN's
              down projection) (Liu et al. 2022, arXiv 2205.05638).

Banks. With a leading-after-stack axis N, a weight holds N adapters (several loaded adapters,
MoLoRA / MoV experts, a library for Arrow / PHATGOOSE). They combine with gates g [..., N] per
token or per example: y = x W + sum_n g_n s_n (x A_n) B_n, computed as one rank-N*R product
((x A_cat) * g) B_cat. Gates come from a `Router` (per token, computed from x), from the
per-example adapter ids of `use_adapter` (one-hot), from the rows of a grouped matmul (the
sparse MoE dispatches them with the tokens), or from the soft MoE's routing weights.

Layout (`jaxlm.layers.linear`): W [*stack, *fan_in, *fan_out]; A [*stack, (N), *fan_in, R];
B [*stack, (N), R, *fan_out]; DoRA magnitude m [*stack, (N), *fan_out]; (IA)^3 l [*stack, (N),
*fan_out or *fan_in]. Stack axes (experts; scanned layers outside the scan) come first.
"""

from __future__ import annotations

import string
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxlm.errors import ConfigError
from jaxlm.layers.linear import Rows, current_adapter_ids

# -- einsum bookkeeping -----------------------------------------------------------------------


@struct.dataclass
class Eq:
  """The letters of a projection "X,W->Y": W = stack + fan_in + fan_out."""

  x: str
  y: str
  stack: str
  fan_in: str
  fan_out: str
  keep: str  # X without the fan-in letters (the axes gates broadcast against)
  r: str  # a free letter for the rank
  n: str  # a free letter for the bank axis


def parse(eq: str) -> Eq:
  lhs, y = eq.replace(" ", "").split("->")
  xs, ws = lhs.split(",")
  stack = "".join(c for c in ws if c in xs and c in y)
  fan_in = "".join(c for c in ws if c in xs and c not in y)
  fan_out = "".join(c for c in ws if c not in xs)
  if ws != stack + fan_in + fan_out:
    raise ValueError(f"adapted projection {eq!r}: the weight's letters must be stack, then fan-in, then fan-out")
  free = [c for c in string.ascii_letters if c not in xs + ws + y]
  return Eq(xs, y, stack, fan_in, fan_out, "".join(c for c in xs if c not in fan_in), free[0], free[1])


def expand_to(v: jax.Array, letters: str, target: str) -> jax.Array:
  """v (axes named by `letters`, each in `target`) transposed and unit-expanded to broadcast
  against an array whose axes are `target`: an elementwise scale, never a dot_general."""
  order = "".join(c for c in target if c in letters)
  v = jnp.einsum(f"{letters}->{order}", v) if order != letters else v
  return v.reshape(tuple(v.shape[order.index(c)] if c in order else 1 for c in target))


def bank_gates(x: jax.Array, e: Eq, n: int, *, gates: jax.Array | None, router: "Router | None") -> jax.Array:
  """Gates over a bank of n adapters, broadcastable to [*keep, n] (x's non-contracted axes): the
  fixed `gates`, else the router's per-token gates, else one-hot per example from `use_adapter`."""
  keep_ndim = len(e.keep)
  if gates is None and router is not None:
    gates = router.gates(x, len(e.fan_in))
  if gates is None:
    ids = current_adapter_ids()
    if ids is None:
      raise ConfigError("a bank of several adapters needs a choice: wrap the call in jaxlm.peft.use_adapter(ids) or set one active adapter")
    gates = jax.nn.one_hot(ids, n)
  if gates.ndim == keep_ndim + 1:
    return gates
  return gates.reshape(gates.shape[:1] + (1,) * (keep_ndim - 1) + gates.shape[-1:])  # [B, N] per example


class _WeightLike:
  """An adapted weight looks like its base weight: shape and dtype."""

  @property
  def shape(self) -> tuple[int, ...]:
    return self.base.shape

  @property
  def dtype(self):
    return self.base.dtype


# -- routers over a bank ----------------------------------------------------------------------


@struct.dataclass
class Router:
  """Per-token gates over a bank of N adapters, computed from the adapted layer's input.

  kind (static):
    softmax    MoLoRA / MoV (Zadouri et al. 2023, arXiv 2309.05444): softmax(x W_r), W_r [in, N]
               trained; top_k > 0 keeps the k largest, renormalised.
    arrow      Arrow (Ostapenko et al. 2024, arXiv 2405.11157): logits |<x, p_n>| with p_n the
               top right singular vector of adapter n's B A (unit norm, training-free); x is not
               normalised and the temperature is 1 (the authors' mttl code and HF PEFT); softmax
               over the top-k.
    phatgoose  PHATGOOSE (Muqeeth et al. 2024, arXiv 2402.05859): logits <LN(x), LN(v_n)> / sqrt(d)
               with v_n adapter n's trained gate vector, LN a layer norm without affine parameters
               over the d input features ((z - mean) / sqrt(var + 1e-5), as the authors' code's
               torch LayerNorm); softmax over the top-k (the authors renormalise the top-2 of a
               full softmax: the same weights).
    sigmoid    PHATGOOSE's gate training: one adapter (N = 1) scaled by sigmoid(<x, v>), v trained.
  """

  weight: jax.Array  # [*fan_in, N] (softmax) or [N, *fan_in] prototypes / gate vectors
  kind: str = struct.field(pytree_node=False, default="softmax")
  top_k: int = struct.field(pytree_node=False, default=0)

  def gates(self, x: jax.Array, n_in: int) -> jax.Array:
    """[*keep, N] float32 gates for x [*keep, *fan_in]."""
    xf = x.reshape(x.shape[: x.ndim - n_in] + (-1,)).astype(jnp.float32)
    w = self.weight.astype(jnp.float32)
    if self.kind == "softmax":
      logits = xf @ w.reshape(-1, w.shape[-1])
    elif self.kind == "arrow":
      logits = jnp.abs(xf @ w.reshape(w.shape[0], -1).T)
    elif self.kind == "sigmoid":  # weight [1, *fan_in]: a gate, not a choice
      return jax.nn.sigmoid(xf @ w.reshape(w.shape[0], -1).T)
    elif self.kind == "phatgoose":
      v = self.layer_norm(w.reshape(w.shape[0], -1))
      logits = self.layer_norm(xf) @ v.T / jnp.sqrt(xf.shape[-1])
    else:
      raise ConfigError(f"unknown adapter router {self.kind!r}")
    return top_k_softmax(logits, self.top_k)

  @staticmethod
  def layer_norm(z: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Standardise the last axis (zero mean, unit variance), no affine parameters."""
    z = z - z.mean(-1, keepdims=True)
    return z * jax.lax.rsqrt(jnp.mean(z * z, -1, keepdims=True) + eps)


def top_k_softmax(logits: jax.Array, k: int) -> jax.Array:
  """softmax over the k largest logits (all when k = 0 or k >= N), zeros elsewhere."""
  n = logits.shape[-1]
  if k <= 0 or k >= n:
    return jax.nn.softmax(logits, axis=-1)
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jax.nn.softmax(jnp.where(logits >= kth, logits, -jnp.inf), axis=-1)


# -- LoRA / DoRA ------------------------------------------------------------------------------


def dora_column_scale(base: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, magnitude: jax.Array, *, n_in: int, bank: bool) -> jax.Array:
  """DoRA's m / ||W + s A B|| per output column [*stack, (N), *fan_out], float32, the norm
  detached; ||W + s A B||^2 = ||W||^2 + 2 s <A^T W, B> + s^2 B^T (A^T A) B per column, so the
  adapted weight is never formed (cost ~ R / tokens of the projection)."""
  n_b = int(bank)
  n_stack = a.ndim - n_in - 1 - n_b
  n_out = b.ndim - n_stack - 1 - n_b
  s, i, o = "stuvw"[:n_stack], "ijkl"[:n_in], "opq"[:n_out]
  n = "n" if bank else ""
  w = base.astype(jnp.float32)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  sc = scale.astype(jnp.float32).reshape((-1,) + (1,) * n_out) if bank else scale.astype(jnp.float32)
  w_sq = jnp.einsum(f"{s}{i}{o},{s}{i}{o}->{s}{o}", w, w)
  if bank:
    w_sq = jnp.expand_dims(w_sq, n_stack)
  cross = jnp.einsum(f"{s}{n}{i}r,{s}{i}{o},{s}{n}r{o}->{s}{n}{o}", a, w, b)
  gram = jnp.einsum(f"{s}{n}{i}r,{s}{n}{i}z->{s}{n}rz", a, a)
  bb = jnp.einsum(f"{s}{n}rz,{s}{n}r{o},{s}{n}z{o}->{s}{n}{o}", gram, b, b)
  norm = jnp.sqrt(jnp.maximum(w_sq + 2 * sc * cross + sc * sc * bb, 1e-12))
  return magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)


def _low_rank(fn: Callable[..., jax.Array], x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """(x A) B with x A recomputed in the backward pass instead of saved: it costs R / out of the
  projection's FLOPs, while a saved [tokens, R] array is padded to 128 lanes on TPUs (16x for R = 8)."""
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)(x, a, b)


@struct.dataclass
class LoRAWeight(_WeightLike):
  """W + s A B, unmerged (see the module docstring for shapes); a bank when `bank`."""

  base: jax.Array
  a: jax.Array
  b: jax.Array
  scale: jax.Array  # [] or [N] (per adapter of a bank)
  col_scale: jax.Array | None = None  # DoRA: m / ||W + s A B|| [*stack, (N), *fan_out] (dora_column_scale)
  router: Router | None = None  # per-token gates of a bank
  gates: jax.Array | None = None  # fixed gates of a bank (the soft MoE's routing weights)
  dropout_key: jax.Array | None = None  # training: dropout on the LoRA branch's input
  n_in: int = struct.field(pytree_node=False, default=1)  # fan-in axes
  bank: bool = struct.field(pytree_node=False, default=False)
  dropout: float = struct.field(pytree_node=False, default=0.0)
  shared_stack: bool = struct.field(pytree_node=False, default=True)  # A and B have the base's stack axes (False: a merged base [G, ...])

  @property
  def n_stack(self) -> int:
    """Stack axes of A and B."""
    return self.a.ndim - self.n_in - 1 - int(self.bank)

  @property
  def n_out(self) -> int:
    return self.b.ndim - self.n_stack - 1 - int(self.bank)

  @property
  def bank_size(self) -> int:
    """Adapters chosen per example by `use_adapter` ids (0 when gates come from elsewhere)."""
    return self.a.shape[self.n_stack] if self.bank and self.router is None and self.gates is None else 0

  def logical_axes(self, base_axes: tuple[str | None, ...]) -> "LoRAWeight":
    st, fi, fo = base_axes[: self.n_stack], base_axes[self.n_stack : self.n_stack + self.n_in], base_axes[self.n_stack + self.n_in :]
    nb = (None,) * int(self.bank)
    leaf = lambda v, axes: None if v is None else axes
    return LoRAWeight(
        base_axes,
        st + nb + fi + ("lora_rank",),
        st + nb + ("lora_rank",) + fo,
        nb,
        leaf(self.col_scale, st + nb + fo),
        None if self.router is None else jax.tree.map(lambda x: (None,) * x.ndim, self.router),
        None if self.gates is None else (None,) * self.gates.ndim,
        None if self.dropout_key is None else (),
        self.n_in,
        self.bank,
        self.dropout,
    )

  def _drop(self, x: jax.Array) -> jax.Array:
    if self.dropout_key is None or self.dropout == 0:
      return x
    keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

  # -- the seam ---------------------------------------------------------------------------------

  def project(self, eq: str, x: jax.Array, **kw: Any) -> jax.Array:
    e = parse(eq)
    dt = x.dtype
    y = jnp.einsum(eq, x, self.base.astype(dt), **kw)
    if not self.shared_stack:  # the adapters have no stack axes of their own
      e = e.replace(stack="")
    xd = self._drop(x)
    gates = None
    if not self.bank:
      a_eq, b_eq = f"{e.x},{e.stack}{e.fan_in}{e.r}->{e.keep}{e.r}", f"{e.keep}{e.r},{e.stack}{e.r}{e.fan_out}->{e.y}"
      # s folded into B: one pass less over [tokens, out]
      lora = _low_rank(lambda x, a, b: jnp.einsum(b_eq, jnp.einsum(a_eq, x, a, **kw), b, **kw), xd, self.a.astype(dt), (self.b * self.scale).astype(dt))
    else:
      gates = bank_gates(x, e, self.a.shape[self.n_stack], gates=self.gates, router=self.router)
      h = jnp.einsum(f"{e.x},{e.stack}{e.n}{e.fan_in}{e.r}->{e.keep}{e.n}{e.r}", xd, self.a.astype(dt), **kw)
      h = h * (gates * self.scale).astype(h.dtype)[..., None]
      lora = jnp.einsum(f"{e.keep}{e.n}{e.r},{e.stack}{e.n}{e.r}{e.fan_out}->{e.y}", h, self.b.astype(dt), **kw)
    y = y + lora.astype(y.dtype)
    if self.col_scale is None:
      return y
    if self.bank:  # per token: the column scale of its adapter (one-hot gates)
      col = jnp.einsum(f"{e.keep}{e.n},{e.stack}{e.n}{e.fan_out}->{e.y}", gates.astype(jnp.float32), self.col_scale)
      return y * col.astype(y.dtype)
    return (y * expand_to(self.col_scale, e.stack + e.fan_out, e.y).astype(y.dtype)).astype(y.dtype)

  def grouped(self, x_mk: jax.Array, mm: Callable[[jax.Array, jax.Array], jax.Array], rows: Rows) -> jax.Array:
    """Stacked experts [E, K, N]: A_e and B_e as two more grouped matmuls of rank R."""
    dt = x_mk.dtype
    y = mm(x_mk, self.base.astype(dt))
    xd = self._drop(x_mk)
    if not self.bank:
      lora = _low_rank(lambda x, a, b: mm(mm(x, a), b), xd, self.a.astype(dt), (self.b * self.scale).astype(dt))
    else:  # a [E, N, K, R] -> [E, K, N R]; b [E, N, R, F] -> [E, N R, F]; gates ride with the rows
      g = rows.gates_mn
      if g is None:
        raise ConfigError("a bank of expert adapters needs per-row gates (the MoE layer dispatches them from use_adapter ids)")
      e_, n, k, r = self.a.shape
      h = mm(xd, jnp.moveaxis(self.a, 1, 2).reshape(e_, k, n * r).astype(dt)).reshape(-1, n, r)
      h = h * (g * self.scale).astype(dt)[..., None]
      lora = mm(h.reshape(-1, n * r), self.b.reshape(e_, n * r, -1).astype(dt))
    y = y + lora
    if self.col_scale is None:
      return y
    col_m = jnp.take(self.col_scale, rows.expert_m(x_mk.shape[0]), axis=0, mode="fill", fill_value=0)  # [M, (N), F]
    if self.bank:
      col_m = jnp.einsum("mn,mnf->mf", rows.gates_mn.astype(jnp.float32), col_m)
    return (y.astype(jnp.float32) * col_m).astype(y.dtype)

  def mix(self, w_ge: jax.Array, merge: Callable[..., jax.Array], *, mlp_axis: int, dense: bool = False) -> Any:
    """Soft merge of stacked experts: sum_e w_e (W_e + s A_e B_e) = the merged W plus a rank-E R
    product whose gates are the routing weights (with `dense`: materialised per group)."""
    if self.bank or self.col_scale is not None:  # DoRA's column norm does not factor: materialise
      return merge(w_ge, self.dense(), mlp_axis=mlp_axis)
    base = merge(w_ge, self.base, mlp_axis=mlp_axis)
    if dense:
      delta = jnp.einsum("ge,exr,ery->gxy", w_ge.astype(jnp.float32), self.a.astype(jnp.float32), self.b.astype(jnp.float32)) * self.scale
      return (base.astype(jnp.float32) + delta).astype(base.dtype)
    # The experts become the bank axis: A [E, X, R] is a bank of E adapters with no stack axis.
    e = self.a.shape[0]
    return LoRAWeight(base, self.a, self.b, jnp.broadcast_to(self.scale, (e,)), gates=w_ge[:, None, :], dropout_key=self.dropout_key, n_in=self.n_in, bank=True, dropout=self.dropout, shared_stack=False)

  # -- materialising ------------------------------------------------------------------------------

  def delta(self) -> jax.Array:
    """s A B as a dense float32 [*stack, (N), *fan_in, *fan_out] array."""
    s, i, o = "stuvw"[: self.n_stack], "ijkl"[: self.n_in], "opq"[: self.n_out]
    n = "n" if self.bank else ""
    scale = self.scale.astype(jnp.float32)
    if self.bank:
      scale = scale.reshape((-1,) + (1,) * (self.n_in + self.n_out))
    return jnp.einsum(f"{s}{n}{i}r,{s}{n}r{o}->{s}{n}{i}{o}", self.a.astype(jnp.float32), self.b.astype(jnp.float32)) * scale

  def dense(self, adapter: int | None = None) -> jax.Array:
    """The merged weight, exact for LoRA and DoRA; a bank merges the one adapter `adapter`."""
    delta, col = self.delta(), self.col_scale
    if self.bank:
      if adapter is None:
        raise ConfigError("merging a bank of adapters needs one adapter chosen (or combine them with jaxlm.peft.merging)")
      delta = jnp.take(delta, adapter, axis=self.n_stack)
      col = None if col is None else jnp.take(col, adapter, axis=self.n_stack)
    merged = self.base.astype(jnp.float32) + delta
    if col is not None:  # broadcast the column scale over the fan-in axes
      merged = merged * col.reshape(col.shape[: self.n_stack] + (1,) * self.n_in + col.shape[self.n_stack :])
    return merged.astype(self.base.dtype)


# -- (IA)^3 -----------------------------------------------------------------------------------


@struct.dataclass
class IA3Weight(_WeightLike):
  """Learned rescaling of W's fan-out (`side="out"`) or fan-in (`side="in"`) units."""

  base: jax.Array
  scale: jax.Array  # l [*stack, (N), *fan_out] (side "out") or [*stack, (N), *fan_in] (side "in")
  router: Router | None = None
  n_in: int = struct.field(pytree_node=False, default=1)
  n_out: int = struct.field(pytree_node=False, default=1)
  side: str = struct.field(pytree_node=False, default="out")
  bank: bool = struct.field(pytree_node=False, default=False)

  @property
  def n_stack(self) -> int:
    return self.base.ndim - self.n_in - self.n_out

  @property
  def bank_size(self) -> int:
    return self.scale.shape[self.n_stack] if self.bank and self.router is None else 0

  def logical_axes(self, base_axes: tuple[str | None, ...]) -> "IA3Weight":
    s = self.n_stack
    scaled = base_axes[s + self.n_in :] if self.side == "out" else base_axes[s : s + self.n_in]
    router = None if self.router is None else jax.tree.map(lambda x: (None,) * x.ndim, self.router)
    return IA3Weight(base_axes, base_axes[:s] + (None,) * int(self.bank) + scaled, router, self.n_in, self.n_out, self.side, self.bank)

  def _vec(self, x: jax.Array, e: Eq, axes: str) -> tuple[jax.Array, str]:
    """(scaling vector, its letters): stack + axes, or for a bank per token keep + axes."""
    if not self.bank:
      return self.scale, e.stack + axes
    g = bank_gates(x, e, self.scale.shape[len(e.stack)], gates=None, router=self.router)
    letters = e.keep + "".join(c for c in e.stack if c not in e.keep) + axes
    return jnp.einsum(f"{e.keep}{e.n},{e.stack}{e.n}{axes}->{letters}", g.astype(jnp.float32), self.scale.astype(jnp.float32)), letters

  def project(self, eq: str, x: jax.Array, **kw: Any) -> jax.Array:
    e = parse(eq)
    dt = x.dtype
    if self.side == "in":
      l, letters = self._vec(x, e, e.fan_in)
      x = x * expand_to(l, letters, e.x).astype(dt)
      return jnp.einsum(eq, x, self.base.astype(dt), **kw)
    y = jnp.einsum(eq, x, self.base.astype(dt), **kw)
    l, letters = self._vec(x, e, e.fan_out)
    return y * expand_to(l, letters, e.y).astype(y.dtype)

  def grouped(self, x_mk: jax.Array, mm: Callable[[jax.Array, jax.Array], jax.Array], rows: Rows) -> jax.Array:
    if self.bank:
      raise ConfigError("(IA)^3 banks on routed experts are not supported")
    l_m = jnp.take(self.scale, rows.expert_m(x_mk.shape[0]), axis=0, mode="fill", fill_value=0).astype(x_mk.dtype)
    if self.side == "in":
      return mm(x_mk * l_m, self.base.astype(x_mk.dtype))
    return mm(x_mk, self.base.astype(x_mk.dtype)) * l_m

  def mix(self, w_ge: jax.Array, merge: Callable[..., jax.Array], *, mlp_axis: int, dense: bool = False) -> jax.Array:
    del dense
    return merge(w_ge, self.dense(), mlp_axis=mlp_axis)

  def dense(self, adapter: int | None = None) -> jax.Array:
    """W * l, broadcast over the fan-in (side "out") or fan-out (side "in") axes: exact."""
    l = self.scale.astype(jnp.float32)
    s = self.n_stack
    if self.bank:
      if adapter is None:
        raise ConfigError("merging a bank of (IA)^3 vectors needs one adapter chosen")
      l = jnp.take(l, adapter, axis=s)
    if self.side == "out":
      l = l.reshape(l.shape[:s] + (1,) * self.n_in + l.shape[s:])
    else:
      l = l.reshape(l.shape + (1,) * self.n_out)
    return (self.base.astype(jnp.float32) * l).astype(self.base.dtype)
