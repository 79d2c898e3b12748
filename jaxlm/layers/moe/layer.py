"""The `moe` FFN kind: token-choice (or expert-choice) sparse mixture of SwiGLU experts.

    y = sum_{e in topk(x)} w_e(x) * SwiGLU_e(x)  [+ SwiGLU_shared(x)]

Parameters (one layout for every MoE kind, DESIGN.md): router [D, E] (float32 math),
w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D] with F = moe.d_ff_expert (fine-grained
experts when small), and `n_shared_experts` always-on experts (DeepSeekMoE, Dai et al. 2024)
held as one dense SwiGLU of width `moe.d_ff_shared or n_shared * F`, optionally scaled per token by
sigmoid(x @ shared_gate), shared_gate [D, 1] (Qwen2-MoE, `moe.shared_gate`). Non-trainable state: the DeepSeek-V3 selection
bias [E] (router "sigmoid_bias") and a step counter for the router jitter; both change only in
training forward passes (`deterministic=False`), never in evaluation or decoding.

`moe(params, x, cfg)` is the same layer as a pure function of an explicit parameter pytree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.layers import linear
from jaxlm.layers.experts import Experts, ExpertWeights
from jaxlm.layers.ffn import FFN, FFNKind
from jaxlm.layers.mlp import MLP, swiglu
from jaxlm.layers.moe import gw
from jaxlm.layers.moe.gmm import resolve_backend, target_platform
from jaxlm.layers.moe.losses import Stats, aux_from_stats
from jaxlm.layers.moe.parallel import routed_experts
from jaxlm.layers.moe.routing import avg_keys, jitter_noise, update_bias
from jaxlm.layers.params import normal, param
from jaxlm.sharding import shard

Aux = dict[str, dict[str, jax.Array]]


class RouterState(nnx.Variable):
  """Non-trainable router state (selection bias, jitter counter): updated outside the optimizer."""


def resolve_all_to_all(name: str, platform: str | None = None) -> str:
  """'auto' -> padded on CPU, else ragged; `platform` defaults to `target_platform()` (gmm.py)."""
  if name != "auto":
    return name
  return "padded" if (platform or target_platform()) == "cpu" else "ragged"


def moe(
    params: dict[str, Any],
    x_bld: jax.Array,
    cfg: ModelConfig,
    *,
    segment_ids: jax.Array | None = None,
    jitter_key: jax.Array | None = None,
) -> tuple[jax.Array, Aux, Stats]:
  """Pure MoE layer: (y [B, L, D], aux, stats) from explicit params.

  params: {"router": [D, E] (absent with moe.router_from_keys: EMoE's `avg_keys(w_gate)` routes),
  "w_gate": [E, D, F], "w_up": [E, D, F], "w_down": [E, F, D],
  optionally "bias": [E] (sigmoid_bias router), "shared": {"w_gate", "w_up", "w_down"} and
  "shared_gate": [D, 1] (Qwen2-MoE; gate logit in float32)}.
  `jitter_key` enables the router jitter (training only). `stats` holds the batch-global
  router sums, e.g. `stats["counts_e"]` for the DeepSeek-V3 bias update (`update_bias`), and one
  per-token entry, `stats["selected_ble"]` [B, L, E]: 1 where the router chose the expert.
  """
  m = cfg.moe
  dt = jnp.dtype(cfg.dtype)
  x_bld = x_bld.astype(dt)
  mask_bl = jnp.ones(x_bld.shape[:2], bool) if segment_ids is None else segment_ids != 0  # 0 = padding (< 0: shared prompt tokens)
  jitter = None
  if jitter_key is not None and m.jitter > 0:
    jitter = shard(jitter_noise(jitter_key, x_bld.shape, m.jitter), "batch", "seq", "embed")
  experts = ExpertWeights.of(params)
  y_bld, stats = routed_experts(
      x_bld,
      mask_bl,
      avg_keys(experts.w_gate) if m.router_from_keys else params["router"],
      experts,
      cfg=m,
      backend=resolve_backend(m.gmm_backend),
      all_to_all=resolve_all_to_all(m.all_to_all),
      bias_e=params.get("bias"),
      jitter_bld=jitter,
      gates_bln=_adapter_gates(experts, x_bld.shape[:2]),
  )
  y_bld = y_bld.astype(dt)
  if "shared" in params:
    s = params["shared"]
    shared_bld = swiglu(x_bld, s["w_gate"], s["w_up"], s["w_down"])
    if "shared_gate" in params:
      logit_bl1 = linear.project("bld,do->blo", x_bld.astype(jnp.float32), params["shared_gate"], precision=jax.lax.Precision.HIGHEST)
      shared_bld = (jax.nn.sigmoid(logit_bl1) * shared_bld.astype(jnp.float32)).astype(dt)
    y_bld = y_bld + shared_bld
  return shard(y_bld, "batch", "seq", "embed"), aux_from_stats(stats, m), stats


def _adapter_gates(experts: ExpertWeights, bl: tuple[int, int]) -> jax.Array | None:
  """[B, L, N] one-hot gates of each token's adapter when the experts hold a bank of adapters
  chosen per example (`jaxlm.peft.use_adapter`); they travel with the tokens' rows."""
  n = max(linear.bank_size(w) for w in experts)
  if not n:
    return None
  ids = linear.current_adapter_ids()
  if ids is None:
    raise ConfigError("the experts hold a bank of adapters: choose one per example with jaxlm.peft.use_adapter(ids)")
  return jnp.broadcast_to(jax.nn.one_hot(ids, n, dtype=jnp.float32)[:, None, :], bl + (n,))


@FFN.register("moe")
class MoE(FFNKind):
  """Sparse MoE FFN; `__call__(x_bld, segment_ids=None) -> (y_bld, aux)`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    m = cfg.moe
    d, f, e = cfg.d_model, m.d_ff_expert or cfg.d_ff, m.n_experts
    self.cfg = cfg
    self.router = None if m.router_from_keys else param(rngs, normal(cfg.init_std), (d, e), ("embed", None), cfg.param_dtype, fan_in=(0,))
    self.experts = Experts(cfg, e, f, expert_axis="expert", rngs=rngs)
    self.shared = MLP(cfg, d_ff=MoE.d_ff_shared(cfg), rngs=rngs) if m.n_shared_experts else None
    self.shared_gate = param(rngs, normal(cfg.init_std), (d, 1), ("embed", None), cfg.param_dtype, fan_in=(0,)) if m.shared_gate else None
    self.bias = RouterState(jnp.zeros((e,), jnp.float32), out_sharding=(None,), eager_sharding=False) if m.router == "sigmoid_bias" else None
    if m.jitter > 0:  # raw key data and a counter (plain integer arrays checkpoint anywhere)
      self.jitter_key = RouterState(jax.random.key_data(rngs.params()), out_sharding=(None,), eager_sharding=False)
      self.jitter_step = RouterState(jnp.zeros((1,), jnp.uint32), out_sharding=(None,), eager_sharding=False)
    else:
      self.jitter_key = self.jitter_step = None
    self.deterministic = False  # model.eval() sets True: no jitter, no bias update

  # -- the FFN protocol ----------------------------------------------------------------------

  @staticmethod
  def d_ff_expert(cfg: ModelConfig) -> int:
    return cfg.moe.d_ff_expert or cfg.d_ff

  @staticmethod
  def d_ff_shared(cfg: ModelConfig) -> int:
    """Hidden width of the shared experts together (0: none)."""
    m = cfg.moe
    return (m.d_ff_shared or m.n_shared_experts * MoE.d_ff_expert(cfg)) if m.n_shared_experts else 0

  @staticmethod
  def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Router + top-k routed experts + shared experts and their gate (matmul FLOPs only)."""
    m, d = cfg.moe, cfg.d_model
    f = MoE.d_ff_expert(cfg)
    gate = 2 * d if m.shared_gate else 0
    return 2 * d * m.n_experts + 2 * 3 * d * (f * m.top_k + MoE.d_ff_shared(cfg)) + gate

  @staticmethod
  def inactive_params(cfg: ModelConfig) -> int:
    m = cfg.moe
    return (m.n_experts - m.top_k) * 3 * cfg.d_model * MoE.d_ff_expert(cfg)

  @staticmethod
  def validate(exp: Experiment, mesh_shape: dict[str, int]) -> None:
    """Mesh-dependent checks (ConfigError naming the field), run before a run writes anything."""
    m = exp.model.moe
    ep = mesh_shape.get("expert", 1)
    if m.n_experts % ep:
      raise ConfigError(f"model.moe.n_experts ({m.n_experts}) must be divisible by the expert mesh axis (mesh.expert = {ep})")

  def __call__(self, x_bld: jax.Array, *, segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    del positions
    y, aux, _ = self.forward(x_bld, segment_ids=segment_ids)
    return y, aux

  def forward(self, x_bld: jax.Array, *, segment_ids: jax.Array | None = None) -> tuple[jax.Array, Aux, Stats]:
    """(y, aux, stats): the layer and its router stats, where kinds built on the MoE read the
    routing (stats["selected_ble"], each token's chosen experts: `jaxlm.layers.moe.hyper`)."""
    with jax.named_scope("moe"):
      params: dict[str, Any] = self.experts.params()
      if self.router is not None:
        params["router"] = self.router[...]
      if self.bias is not None:
        params["bias"] = self.bias[...]
      if self.shared is not None:
        params["shared"] = {"w_gate": self.shared.w_gate[...], "w_up": self.shared.w_up[...], "w_down": self.shared.w_down[...]}
      if self.shared_gate is not None:
        params["shared_gate"] = self.shared_gate[...]
      key = None
      if self.jitter_key is not None and not self.deterministic:
        key = jax.random.fold_in(jax.random.wrap_key_data(self.jitter_key[...]), self.jitter_step[0])
        self.jitter_step[...] = self.jitter_step[...] + 1
      cfg = gw.without(self.cfg) if self.deterministic else self.cfg  # GW-MoE broadcasts in training only
      y, aux, stats = moe(params, x_bld, cfg, segment_ids=segment_ids, jitter_key=key)
      if self.bias is not None and not self.deterministic:
        self.bias[...] = update_bias(self.bias[...], stats["counts_e"], self.cfg.moe.bias_update_rate)
      return y, aux, stats

