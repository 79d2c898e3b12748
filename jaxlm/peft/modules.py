"""The NNX side of PEFT: adapter variable types and the modules that replace an adapted weight.

`jaxlm.peft.apply` replaces a layer's weight attribute (an `nnx.Param`, e.g. `attn.w_q`) by a
module holding that weight as `base` plus the adapter's variables. The layer still reads
`self.w_q[...]`; the module answers with an adapted weight (`jaxlm.peft.weights`), which the
layer's projection applies through `jaxlm.layers.linear`. So the base weight keeps its values,
dtype and sharding, and the layers know nothing about PEFT.

Variable types (a separate hierarchy from `nnx.Param`, so filters tell base and adapters apart):
  AdapterParam  adapter weights (LoRA A, B; DoRA m; (IA)^3 l; prompts; bottlenecks; routers)
  AdapterState  non-trainable adapter state: dropout key and counter, DoRA's norm cached by a merge
Adapter weights get the logical axes of the weight they adapt (`lora_rank` for the rank), so they
are sharded like it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import sharding
from jaxlm.layers.linear import current_adapter_ids, fan_in_of
from jaxlm.peft.weights import IA3Weight, LoRAWeight, Router, dora_column_scale


class AdapterParam(nnx.Variable):
  """Adapter weights: trainable under PEFT, never confused with the base model's `nnx.Param`."""


class AdapterState(nnx.Variable):
  """Non-trainable adapter state (dropout RNG, caches)."""


def new_variable(kind: type[nnx.Variable], init: Callable[[], Any], shape: tuple[int, ...], dtype: Any, axes: tuple[str | None, ...], like: Any) -> nnx.Variable:
  """A variable of `shape` and `dtype` with logical axes `axes`, made like `like` (the adapted
  weight's value): abstract (a ShapeDtypeStruct; `init` not called) when `like` is, else `init()`
  placed on like's mesh, sharded by the current rule table."""
  if isinstance(like, jax.ShapeDtypeStruct):
    value = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
  else:
    value = jnp.asarray(init(), dtype)
    mesh = getattr(getattr(like, "sharding", None), "mesh", None)
    if isinstance(mesh, jax.sharding.Mesh) and not mesh.empty:
      spec = sharding.spec(axes, value.shape, dict(mesh.shape))
      value = jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))
  return kind(value, out_sharding=tuple(axes), eager_sharding=False)


def host_rng(key: jax.Array) -> np.random.Generator:
  """A numpy generator seeded from a jax key: adapters are initialised on the host (no compile
  per new shape) and then placed like their weight."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


class Adapted(nnx.Module):
  """A linear weight (`base`, kept frozen) with adapters; `self[...]` is the adapted weight.

  `n_scan`: leading axes that scanned layers added (1 under `units/`, else 0): the dropout state
  and routers get them too; the other stack axes (experts) belong to the weight itself.
  """

  def __init__(self, base: nnx.Param, *, n_scan: int = 0):
    self.base = base
    fan_in = fan_in_of(base)
    self.n_in = len(fan_in)
    self.n_out = -fan_in[-1] - 1
    self.n_scan = n_scan
    self.merged = False  # merge_adapters(): the base holds the adapted weight, the adapters idle
    self.deterministic = False  # model.eval(): no dropout

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.base.shape)

  @property
  def n_stack(self) -> int:
    return len(self.shape) - self.n_in - self.n_out

  def dims(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(stack, fan-in, fan-out) sizes of the base weight."""
    s, i = self.n_stack, self.n_in
    return self.shape[:s], self.shape[s : s + i], self.shape[s + i :]

  def axes(self) -> tuple[tuple, tuple, tuple]:
    names = sharding.logical_axes_of(self.base)
    s, i = self.n_stack, self.n_in
    return names[:s], names[s : s + i], names[s + i :]

  def __getitem__(self, idx: Any) -> Any:
    if idx is not Ellipsis:
      raise IndexError("an adapted weight is read whole: w[...]")
    if self.merged:
      return self.base[...]
    return self.adapted()

  def adapted(self, *, whole_bank: bool = False) -> Any:
    """The adapted weight (`whole_bank`: every adapter of a bank, not only the active one)."""
    raise NotImplementedError

  def dense(self, adapter: int | None = None) -> jax.Array:
    """The merged weight (the base's dtype)."""
    return self.adapted_for_merge().dense(adapter)

  def adapted_for_merge(self) -> Any:
    """The whole adapted weight without dropout (merging reads every adapter of a bank)."""
    was = self.deterministic
    self.deterministic = True
    try:
      return self.adapted(whole_bank=True)
    finally:
      self.deterministic = was


# -- LoRA / DoRA ------------------------------------------------------------------------------


class LoRA(Adapted):
  """LoRA (and DoRA with `dora`): A [*stack, (N), *fan_in, R] random, B [*stack, (N), R, *fan_out]
  zero, so a fresh adapter leaves the model unchanged. `bank` = N > 0 holds N adapters: loaded
  ones (`names`), MoLoRA experts (`router="softmax"`), or a library routed by Arrow/PHATGOOSE."""

  def __init__(
      self,
      base: nnx.Param,
      *,
      rank: int,
      scale: float | tuple[float, ...],
      key: jax.Array,
      dora: bool = False,
      dropout: float = 0.0,
      bank: int = 0,
      names: tuple[str, ...] = (),
      router: str | None = None,
      top_k: int = 0,
      n_scan: int = 0,
  ):
    super().__init__(base, n_scan=n_scan)
    like = base.get_value()
    (stack, fan_in, fan_out), (s_ax, i_ax, o_ax) = self.dims(), self.axes()
    nb, nb_ax = ((bank,), (None,)) if bank else ((), ())
    dtype = jnp.float32  # adapters are trained: float32 master weights, whatever the frozen base's dtype
    k_a, k_r, k_d = jax.random.split(key, 3)
    bound = 1.0 / math.sqrt(math.prod(fan_in))  # kaiming-uniform(a=sqrt(5)), the usual LoRA init of A
    a_shape = stack + nb + fan_in + (rank,)
    self.a = new_variable(AdapterParam, lambda: host_rng(k_a).uniform(-bound, bound, a_shape), a_shape, dtype, s_ax + nb_ax + i_ax + ("lora_rank",), like)
    b_shape = stack + nb + (rank,) + fan_out
    self.b = new_variable(AdapterParam, lambda: np.zeros(b_shape), b_shape, dtype, s_ax + nb_ax + ("lora_rank",) + o_ax, like)
    self.bank = bank
    self.names = tuple(names)
    self.scales = tuple(float(x) for x in scale) if isinstance(scale, (tuple, list)) else (float(scale),) * max(bank, 1)
    self.active: int | None = None  # a bank's adapter used when no per-example ids are given
    self.dropout = float(dropout)
    self.top_k = top_k
    self.router_kind = router
    if dora:
      fan_in_axes = tuple(range(len(stack), len(stack) + len(fan_in)))
      m_shape = stack + nb + fan_out
      def norm():  # DoRA starts from m = ||W|| per output column: the adapted weight is W
        n = jnp.sqrt(jnp.sum(jnp.square(like.astype(jnp.float32)), axis=fan_in_axes))
        return jnp.broadcast_to(jnp.expand_dims(n, len(stack)) if bank else n, m_shape)

      self.magnitude = new_variable(AdapterParam, norm, m_shape, jnp.float32, s_ax + nb_ax + o_ax, like)
    else:
      self.magnitude = None
    if router is not None:
      scan = stack[: self.n_scan]
      r_shape = scan + ((bank,) + fan_in if router != "softmax" else fan_in + (bank,))
      r_axes = s_ax[: self.n_scan] + ((None,) + i_ax if router != "softmax" else i_ax + (None,))
      init = lambda: host_rng(k_r).normal(0.0, 0.02, r_shape) if router == "softmax" else np.zeros(r_shape)
      self.router = new_variable(AdapterParam, init, r_shape, jnp.float32, r_axes, like)
    else:
      self.router = None
    if dropout > 0:
      scan = stack[: self.n_scan]
      keys = jax.random.split(k_d, math.prod(scan)) if scan else k_d
      axes = (None,) * (len(scan) + 1)
      self.dropout_key = new_variable(AdapterState, lambda: jax.random.key_data(keys).reshape(scan + (-1,)), scan + (2,), jnp.uint32, axes, like)
      self.dropout_step = new_variable(AdapterState, lambda: np.zeros(scan + (1,)), scan + (1,), jnp.uint32, axes, like)
    else:
      self.dropout_key = self.dropout_step = None

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  def _dropout_key(self) -> jax.Array | None:
    if self.dropout_key is None or self.deterministic:
      return None
    key = jax.random.fold_in(jax.random.wrap_key_data(self.dropout_key[...]), self.dropout_step[...][0])
    self.dropout_step[...] = self.dropout_step[...] + 1
    return key

  def adapted(self, *, whole_bank: bool = False) -> LoRAWeight:
    base, a, b = self.base[...], self.a[...], self.b[...]
    m = None if self.magnitude is None else self.magnitude[...]
    scale = jnp.asarray(self.scales, jnp.float32)
    bank = bool(self.bank)
    router = None
    if bank and self.router is not None:
      router = Router(self.router[...], self.router_kind, self.top_k)
    elif bank and self.active is not None and current_adapter_ids() is None and not whole_bank:
      s, i = len(self.shape) - self.n_in - self.n_out, self.active  # one adapter of the bank: slice it out
      a, b = jnp.take(a, i, axis=s), jnp.take(b, i, axis=s)
      m = None if m is None else jnp.take(m, i, axis=s)
      scale, bank = scale[i], False
    if not bank:
      scale = scale.reshape(()) if scale.ndim else scale
    col = None if m is None else dora_column_scale(base, a, b, scale, m, n_in=self.n_in, bank=bank)
    return LoRAWeight(base, a, b, scale, col, router, None, self._dropout_key(), n_in=self.n_in, bank=bank, dropout=self.dropout)


# -- (IA)^3 -----------------------------------------------------------------------------------


class IA3(Adapted):
  """(IA)^3: a learned vector l (ones at the start) rescaling W's fan-out units (`side="out"`:
  keys, values) or fan-in units (`side="in"`: the FFN's down projection, i.e. its hidden units).
  A bank (`bank` > 0, `router="softmax"`) is MoV: a per-token soft mixture of vectors."""

  def __init__(self, base: nnx.Param, *, side: str, key: jax.Array, bank: int = 0, names: tuple[str, ...] = (), router: str | None = None, top_k: int = 0, n_scan: int = 0):
    super().__init__(base, n_scan=n_scan)
    like = base.get_value()
    (stack, fan_in, fan_out), (s_ax, i_ax, o_ax) = self.dims(), self.axes()
    dims, d_ax = (fan_out, o_ax) if side == "out" else (fan_in, i_ax)
    nb, nb_ax = ((bank,), (None,)) if bank else ((), ())
    shape = stack + nb + dims
    self.scale = new_variable(AdapterParam, lambda: np.ones(shape), shape, jnp.float32, s_ax + nb_ax + d_ax, like)
    self.side = side
    self.bank = bank
    self.names = tuple(names)
    self.active: int | None = None
    self.top_k = top_k
    self.router_kind = router
    if router is not None:
      scan = stack[: self.n_scan]
      r_shape = scan + fan_in + (bank,)
      self.router = new_variable(AdapterParam, lambda: host_rng(key).normal(0.0, 0.02, r_shape), r_shape, jnp.float32, s_ax[: self.n_scan] + i_ax + (None,), like)
    else:
      self.router = None

  def adapted(self, *, whole_bank: bool = False) -> IA3Weight:
    l = self.scale[...]
    bank = bool(self.bank)
    router = Router(self.router[...], self.router_kind, self.top_k) if self.router is not None else None
    if bank and router is None and self.active is not None and current_adapter_ids() is None and not whole_bank:
      l, bank = jnp.take(l, self.active, axis=self.n_stack), False
    return IA3Weight(self.base[...], l, router, n_in=self.n_in, n_out=self.n_out, side=self.side, bank=bank)
