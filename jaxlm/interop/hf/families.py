"""Hugging Face model families: their `config.json` <-> `ModelConfig`, and their weight names.

A family is a registered `Family` keyed by HF `model_type`. It turns an HF config into a
`ModelConfig` (refusing, by name, any field that changes the math and that jaxlm does not
implement), turns a `ModelConfig` back into an HF config, and lists for each layer which HF
tensors hold which jaxlm parameters (`entries`).

Weight names (transformers 4.x/5.x on disk):
  model.embed_tokens.weight [V, D], model.norm.weight [D], lm_head.weight [V, D] (absent when tied)
  model.layers.{i}.input_layernorm.weight / post_attention_layernorm.weight [D]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight [out, in] (+ q/k/v .bias: Qwen2)
  model.layers.{i}.self_attn.{q,k}_norm.weight: [K] per head (Qwen3), [H*K] / [G*K] (OLMoE)
  model.layers.{i}.mlp.{gate,up,down}_proj.weight (dense layers)
  experts, legacy names (what `save_pretrained` writes by default, and what older tools load):
    Mixtral    model.layers.{i}.block_sparse_moe.gate.weight [E, D],
               ...block_sparse_moe.experts.{j}.w1 (gate) / w3 (up) [F, D], w2 (down) [D, F]
    Qwen, OLMoE model.layers.{i}.mlp.gate.weight [E, D], ...mlp.experts.{j}.{gate,up,down}_proj.weight
  experts, fused names (transformers 5 in memory; newer hub checkpoints on disk; every family):
    model.layers.{i}.mlp.gate.weight [E, D], mlp.experts.gate_up_proj [E, 2F, D] (gate rows,
    then up rows), mlp.experts.down_proj [E, D, F]
  Qwen2-MoE shared expert: mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight [1, D]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from jaxlm.config import AttentionConfig, ModelConfig, MoEConfig, RopeScalingConfig
from jaxlm.errors import ConfigError
from jaxlm.registry import Registry

FAMILIES: Registry = Registry("Hugging Face model_type")

Path = tuple[str | int, ...]  # a parameter's path in the model's pure-dict state


# -- weight layouts ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
  """Some jaxlm parameters held by some HF tensors, and the two conversions between them.

  `to_ours(hf_arrays) -> our arrays` and `to_hf(our_arrays) -> hf arrays`, each a list in the
  order of `ours` / `hf`. Most entries are one tensor each way; experts in legacy names are one
  jaxlm bank from E tensors, fused gate/up one HF tensor for two jaxlm banks.
  """

  ours: tuple[Path, ...]
  hf: tuple[str, ...]
  to_ours: Callable[[list[np.ndarray], list[tuple[int, ...]]], list[np.ndarray]]
  to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]


def _linear(ours: Path, hf: str, n_in: int = 1) -> Entry:
  """HF Linear [out, in] <-> jaxlm weight [*in, *out]: its first `n_in` axes contract with the
  input (w_q [D, H, K] from [H*K, D]; w_o [H, K, D] from [D, H*K], n_in=2)."""

  def to_hf(ws):
    w = ws[0]
    return [w.reshape(int(np.prod(w.shape[:n_in])), -1).T]

  return Entry((ours,), (hf,), lambda ws, shapes: [ws[0].T.reshape(shapes[0])], to_hf)


def _vector(ours: Path, hf: str) -> Entry:
  """Same values, jaxlm may split the axis (e.g. bias [H*K] <-> [H, K])."""
  return Entry((ours,), (hf,), lambda ws, shapes: [ws[0].reshape(shapes[0])], lambda ws: [ws[0].reshape(-1)])


def _table(ours: Path, hf: str) -> Entry:
  """Embedding table [V, D] both ways."""
  return Entry((ours,), (hf,), lambda ws, shapes: [ws[0]], lambda ws: [ws[0]])


def _head(ours: Path, hf: str) -> Entry:
  """lm_head [V, D] <-> jaxlm lm_head [D, V]."""
  return Entry((ours,), (hf,), lambda ws, shapes: [ws[0].T], lambda ws: [ws[0].T])


def _experts_legacy(ours: Path, names: list[str]) -> Entry:
  """E per-expert Linear weights [out, in] <-> one bank [E, in, out]."""
  return Entry(
      (ours,),
      tuple(names),
      lambda ws, shapes: [np.stack([w.T for w in ws])],
      lambda ws: [w.T for w in ws[0]],
  )


def _experts_fused_gate_up(gate: Path, up: Path, name: str) -> Entry:
  """gate_up_proj [E, 2F, D] (gate rows, then up rows) <-> w_gate, w_up [E, D, F]."""

  def to_ours(ws, shapes):
    f = shapes[0][-1]
    return [ws[0][:, :f].transpose(0, 2, 1), ws[0][:, f:].transpose(0, 2, 1)]

  return Entry((gate, up), (name,), to_ours, lambda ws: [np.concatenate([ws[0], ws[1]], axis=-1).transpose(0, 2, 1)])


def _experts_fused(ours: Path, name: str) -> Entry:
  """down_proj [E, D, F] <-> w_down [E, F, D]."""
  return Entry((ours,), (name,), lambda ws, shapes: [ws[0].transpose(0, 2, 1)], lambda ws: [ws[0].transpose(0, 2, 1)])


# -- families --------------------------------------------------------------------------------


def _get(hf: Mapping[str, Any], key: str, default: Any = None) -> Any:
  v = hf.get(key, default)
  return default if v is None else v


def _refuse(hf: Mapping[str, Any], key: str, ok: Callable[[Any], bool], why: str) -> None:
  if key in hf and hf[key] is not None and not ok(hf[key]):
    raise ConfigError(f"config field {key}={hf[key]!r} is not supported ({why})")


def rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScalingConfig]:
  """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind == "default":
    return theta, RopeScalingConfig()
  if kind == "linear":
    return theta, RopeScalingConfig(kind="linear", factor=float(merged["factor"]))
  if kind == "llama3":
    return theta, RopeScalingConfig(
        kind="llama3",
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_len=int(merged["original_max_position_embeddings"]),
    )
  raise ConfigError(f"{hf.get('model_type')}: rope scaling type {kind!r} is not supported (jaxlm implements default, linear, llama3)")


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  r = cfg.rope_scaling
  params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default" if r.kind == "none" else r.kind}
  if r.kind == "linear":
    params["factor"] = r.factor
  elif r.kind == "llama3":
    params.update(factor=r.factor, low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor, original_max_position_embeddings=r.original_max_len)
  # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
  return {"rope_parameters": params, "rope_theta": cfg.rope_theta, "rope_scaling": None if r.kind == "none" else {k: v for k, v in params.items() if k != "rope_theta"}}


def _moe_pattern(hf: Mapping[str, Any], n_layers: int) -> tuple[int, int]:
  """(first_k_dense, ffn_every) reproducing Qwen-MoE's `mlp_only_layers` + `decoder_sparse_step`.

  HF: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
  jaxlm: layer i is sparse iff i >= k and (i - k) % every == 0.
  """
  only = set(_get(hf, "mlp_only_layers", []))
  step = int(_get(hf, "decoder_sparse_step", 1))
  want = [i not in only and (i + 1) % step == 0 for i in range(n_layers)]
  for every in range(1, n_layers + 1):
    for k in range(n_layers + 1):
      if want == [i >= k and (i - k) % every == 0 for i in range(n_layers)]:
        return k, every
  raise ConfigError(
      f"{hf.get('model_type')}: mlp_only_layers={sorted(only)} with decoder_sparse_step={step} is not a pattern jaxlm can "
      "express (a dense prefix, then a sparse layer every n)"
  )


@dataclasses.dataclass(frozen=True)
class Family:
  """One HF `model_type`. Subclasses set the class attributes and override what differs."""

  model_type: str = ""
  architecture: str = ""
  moe: bool = False
  qkv_bias: bool = False  # Qwen2: q/k/v projections always have a bias
  qk_norm: str = "none"
  legacy_expert: tuple[str, str, str, str] = ("mlp", "gate_proj", "up_proj", "down_proj")  # module, gate, up, down
  shared_expert: bool = False  # one sigmoid-gated shared expert (Qwen2-MoE)
  optional_bias: bool = False  # q/k/v biases follow the config's `qkv_bias` field (Qwen2-MoE in transformers 5)
  expert_width_key: str = "moe_intermediate_size"  # OLMoE's experts are intermediate_size wide

  # -- config ------------------------------------------------------------------------------

  def check(self, hf: Mapping[str, Any]) -> None:
    """Refuse config fields that change the math and that jaxlm does not implement."""
    _refuse(hf, "hidden_act", lambda v: v == "silu", "jaxlm's MLPs are SwiGLU: hidden_act must be silu")
    _refuse(hf, "mlp_bias", lambda v: not v, "MLP biases are not implemented")
    if not self.qkv_bias:
      _refuse(hf, "attention_bias", lambda v: not v, "attention biases are implemented for Qwen2's q/k/v only")
    _refuse(hf, "use_sliding_window", lambda v: not v, "per-layer sliding windows (max_window_layers) are not implemented")
    _refuse(hf, "pretraining_tp", lambda v: v == 1, "tensor-parallel slicing of the pre-training run is not reproduced")
    _refuse(hf, "partial_rotary_factor", lambda v: v == 1, "RoPE rotates every channel of a head in jaxlm")
    _refuse(hf.get("rope_parameters") or {}, "partial_rotary_factor", lambda v: v == 1, "RoPE rotates every channel of a head in jaxlm")
    if self.model_type not in ("mistral", "mixtral"):
      _refuse(hf, "layer_types", lambda v: set(v) <= {"full_attention"}, "per-layer sliding-window attention is not implemented")

  def model_config(self, hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    self.check(hf)
    d, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(_get(hf, "head_dim", d // n_heads))
    theta, scaling = rope_from_hf(hf)
    n_layers = int(hf["num_hidden_layers"])
    dtype = str(_get(hf, "dtype", _get(hf, "torch_dtype", "float32")))
    dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    clip = _get(hf, "clip_qkv", 0.0)
    window = _get(hf, "sliding_window", 0) if self.model_type in ("mistral", "mixtral") else 0
    kw: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(_get(hf, "num_key_value_heads", n_heads)),
        head_dim=0 if head_dim * n_heads == d else head_dim,
        d_ff=int(hf["intermediate_size"]),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
        attention=AttentionConfig(
            qkv_bias=self.qkv_bias and (not self.optional_bias or bool(_get(hf, "qkv_bias", True))),
            qk_norm=self.qk_norm,
            clip_qkv=float(clip),
            sliding_window=int(window),
        ),
    )
    if self.moe:
      kw.update(ffn="moe", moe=self.moe_config(hf))
      kw["first_k_dense"], kw["ffn_every"] = self.moe_pattern(hf, n_layers)
    kw.update(overrides)
    return ModelConfig(**kw)

  def moe_pattern(self, hf: Mapping[str, Any], n_layers: int) -> tuple[int, int]:
    return _moe_pattern(hf, n_layers)

  def moe_config(self, hf: Mapping[str, Any]) -> MoEConfig:
    return MoEConfig(
        n_experts=int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]),  # transformers 5 renamed Qwen3-MoE's
        top_k=int(hf["num_experts_per_tok"]),
        d_ff_expert=int(hf["moe_intermediate_size"]) if self.expert_width_key == "moe_intermediate_size" else 0,
        renormalize=bool(_get(hf, "norm_topk_prob", False)),
        load_balance_weight=float(_get(hf, "router_aux_loss_coef", 0.01)),
        router_z_weight=0.0,
    )

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json of a jaxlm model (ConfigError when the family cannot hold it)."""
    self.exportable(cfg)
    out: dict[str, Any] = {
        "architectures": [self.architecture],
        "model_type": self.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": 4096,
        "attention_bias": False,
        "dtype": cfg.param_dtype,
        **rope_to_hf(cfg),
    }
    if self.moe:
      m = cfg.moe
      out.update(
          num_experts=m.n_experts,
          num_experts_per_tok=m.top_k,
          moe_intermediate_size=m.d_ff_expert or cfg.d_ff,
          norm_topk_prob=m.renormalize,
          router_aux_loss_coef=m.load_balance_weight,
          decoder_sparse_step=1,
          mlp_only_layers=[i for i, k in enumerate(cfg.ffn_kinds) if k != "moe"],
      )
    return out

  def exportable(self, cfg: ModelConfig) -> None:
    """ConfigError naming the first jaxlm setting this family cannot express."""
    kinds = set(cfg.ffn_kinds)
    want = {"moe", "dense"} if self.moe else {"dense"}
    if not kinds <= want:
      raise ConfigError(f"{self.model_type} cannot hold FFN kind(s) {sorted(kinds - want)}")
    a = cfg.attention
    if a.qkv_bias != self.qkv_bias and not (self.optional_bias and not a.qkv_bias):
      raise ConfigError(f"{self.model_type} {'needs' if self.qkv_bias else 'has no'} q/k/v biases (model.attention.qkv_bias={a.qkv_bias})")
    if a.qk_norm != self.qk_norm:
      raise ConfigError(f"{self.model_type} has q/k norm {self.qk_norm!r}, the model has {a.qk_norm!r}")
    if a.clip_qkv and self.model_type != "olmoe":
      raise ConfigError(f"{self.model_type} cannot clip q/k/v (model.attention.clip_qkv)")
    if a.sliding_window and self.model_type not in ("mistral", "mixtral"):
      raise ConfigError(f"{self.model_type} has no sliding window (model.attention.sliding_window)")
    if "moe" in kinds:
      m = cfg.moe
      if m.router != "softmax_topk" or m.route_scale != 1.0 or m.mode != "dropless":
        raise ConfigError(f"{self.model_type} routes by softmax top-k without capacity or scale (model.moe.router={m.router!r}, route_scale={m.route_scale}, mode={m.mode!r})")
      if m.router_from_keys:
        raise ConfigError(f"{self.model_type} has a trained router: model.moe.router_from_keys (EMoE) cannot be exported")
      if m.n_shared_experts and not (self.shared_expert and m.shared_gate):
        raise ConfigError(
            f"{self.model_type} has no shared experts (model.moe.n_shared_experts={m.n_shared_experts})"
            if not self.shared_expert
            else f"{self.model_type}'s shared expert is sigmoid-gated: model.moe.shared_gate must be true"
        )


  # -- weights -----------------------------------------------------------------------------

  def entries(self, cfg: ModelConfig, tree: Mapping[str, Any], *, fused: bool) -> list[Entry]:
    """Every jaxlm parameter of a (pure-dict, unrolled) model of `cfg` with its HF tensors."""
    out = [_table(("embed", "w_vd"), "model.embed_tokens.weight"), _vector(("final_norm", "scale"), "model.norm.weight")]
    if not cfg.tie_embeddings:
      out.append(_head(("lm_head",), "lm_head.weight"))
    for i, kind in enumerate(cfg.ffn_kinds):
      out += self.layer_entries(cfg, tree["blocks"][i], i, kind, fused=fused)
    return out

  def layer_entries(self, cfg: ModelConfig, layer: Mapping[str, Any], i: int, kind: str, *, fused: bool) -> list[Entry]:
    p = f"model.layers.{i}."
    b: Path = ("blocks", i)
    out = [
        _vector(b + ("attn_norm", "scale"), p + "input_layernorm.weight"),
        _vector(b + ("ffn_norm", "scale"), p + "post_attention_layernorm.weight"),
    ]
    for x in "qkvo":
      out.append(_linear(b + ("attn", f"w_{x}"), p + f"self_attn.{x}_proj.weight", n_in=2 if x == "o" else 1))
    if cfg.attention.qkv_bias:
      out += [_vector(b + ("attn", f"b_{x}"), p + f"self_attn.{x}_proj.bias") for x in "qkv"]
    if cfg.attention.qk_norm != "none":
      out += [_vector(b + ("attn", f"{x}_norm", "scale"), p + f"self_attn.{x}_norm.weight") for x in "qk"]
    if kind == "dense":
      out += [_linear(b + ("ffn", f"w_{x}"), p + f"mlp.{x}_proj.weight") for x in ("gate", "up", "down")]
      return out
    module, gate, up, down = self.legacy_expert
    e = cfg.moe.n_experts
    f = b + ("ffn",)
    out.append(_linear(f + ("router",), p + f"{'mlp' if fused else module}.gate.weight"))
    if fused:
      out.append(_experts_fused_gate_up(f + ("experts", "w_gate"), f + ("experts", "w_up"), p + "mlp.experts.gate_up_proj"))
      out.append(_experts_fused(f + ("experts", "w_down"), p + "mlp.experts.down_proj"))
    else:
      for ours, name in (("w_gate", gate), ("w_up", up), ("w_down", down)):
        out.append(_experts_legacy(f + ("experts", ours), [p + f"{module}.experts.{j}.{name}.weight" for j in range(e)]))
    if cfg.moe.n_shared_experts:
      out += [_linear(f + ("shared", f"w_{x}"), p + f"mlp.shared_expert.{x}_proj.weight") for x in ("gate", "up", "down")]
      if cfg.moe.shared_gate:
        out.append(_linear(f + ("shared_gate",), p + "mlp.shared_expert_gate.weight"))
    return out


@FAMILIES.register("llama")
@dataclasses.dataclass(frozen=True)
class Llama(Family):
  model_type: str = "llama"
  architecture: str = "LlamaForCausalLM"

  def hf_config(self, cfg):
    return {**super().hf_config(cfg), "mlp_bias": False}


@FAMILIES.register("mistral")
@dataclasses.dataclass(frozen=True)
class Mistral(Family):
  model_type: str = "mistral"
  architecture: str = "MistralForCausalLM"

  def hf_config(self, cfg):
    return {**super().hf_config(cfg), "sliding_window": cfg.attention.sliding_window or None}


@FAMILIES.register("mixtral")
@dataclasses.dataclass(frozen=True)
class Mixtral(Family):
  model_type: str = "mixtral"
  architecture: str = "MixtralForCausalLM"
  moe: bool = True
  legacy_expert: tuple[str, str, str, str] = ("block_sparse_moe", "w1", "w3", "w2")

  def moe_pattern(self, hf, n_layers):
    return 0, 1

  def moe_config(self, hf):
    # Mixtral: softmax over the E logits, top-k, renormalised over the k (= softmax of the top-k logits).
    # Its router_jitter_noise multiplies the hidden states in training, like moe.jitter (which jitters the router input only).
    return MoEConfig(
        n_experts=int(hf["num_local_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        renormalize=True,
        jitter=float(_get(hf, "router_jitter_noise", 0.0)),
        load_balance_weight=float(_get(hf, "router_aux_loss_coef", 0.02)),
        router_z_weight=0.0,
    )

  def exportable(self, cfg):
    super().exportable(cfg)
    if set(cfg.ffn_kinds) != {"moe"} or cfg.moe.d_ff_expert not in (0, cfg.d_ff) or not cfg.moe.renormalize:
      raise ConfigError("mixtral needs an MoE in every layer, experts of width model.d_ff and renormalised top-k weights")

  def hf_config(self, cfg):
    out = super().hf_config(cfg)
    for k in ("num_experts", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
      out.pop(k)
    return {**out, "num_local_experts": cfg.moe.n_experts, "router_jitter_noise": cfg.moe.jitter, "sliding_window": cfg.attention.sliding_window or None}


@FAMILIES.register("qwen2")
@dataclasses.dataclass(frozen=True)
class Qwen2(Family):
  model_type: str = "qwen2"
  architecture: str = "Qwen2ForCausalLM"
  qkv_bias: bool = True

  def hf_config(self, cfg):
    out = super().hf_config(cfg)
    out.pop("attention_bias")
    return {**out, "use_sliding_window": False}


@FAMILIES.register("qwen2_moe")
@dataclasses.dataclass(frozen=True)
class Qwen2MoE(Family):
  model_type: str = "qwen2_moe"
  architecture: str = "Qwen2MoeForCausalLM"
  moe: bool = True
  qkv_bias: bool = True
  shared_expert: bool = True
  optional_bias: bool = True

  def moe_config(self, hf):
    shared = int(_get(hf, "shared_expert_intermediate_size", 0))
    # Qwen2-MoE's shared expert is one SwiGLU of its own width, gated by sigmoid(x w), w [1, D].
    return dataclasses.replace(super().moe_config(hf), n_shared_experts=1 if shared else 0, d_ff_shared=shared, shared_gate=bool(shared))

  def hf_config(self, cfg):
    out = super().hf_config(cfg)
    out.pop("attention_bias")
    m = cfg.moe
    shared = (m.d_ff_shared or m.n_shared_experts * (m.d_ff_expert or cfg.d_ff)) if m.n_shared_experts else 0
    return {**out, "qkv_bias": cfg.attention.qkv_bias, "shared_expert_intermediate_size": shared, "use_sliding_window": False}


@FAMILIES.register("qwen3")
@dataclasses.dataclass(frozen=True)
class Qwen3(Family):
  model_type: str = "qwen3"
  architecture: str = "Qwen3ForCausalLM"
  qk_norm: str = "head"

  def hf_config(self, cfg):
    return {**super().hf_config(cfg), "use_sliding_window": False}


@FAMILIES.register("qwen3_moe")
@dataclasses.dataclass(frozen=True)
class Qwen3MoE(Family):
  model_type: str = "qwen3_moe"
  architecture: str = "Qwen3MoeForCausalLM"
  moe: bool = True
  qk_norm: str = "head"

  def hf_config(self, cfg):
    return {**super().hf_config(cfg), "use_sliding_window": False}


@FAMILIES.register("olmoe")
@dataclasses.dataclass(frozen=True)
class OLMoE(Family):
  model_type: str = "olmoe"
  architecture: str = "OlmoeForCausalLM"
  moe: bool = True
  qk_norm: str = "proj"
  expert_width_key: str = "intermediate_size"

  def moe_pattern(self, hf, n_layers):
    return 0, 1

  def hf_config(self, cfg):
    out = super().hf_config(cfg)
    for k in ("decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size"):
      out.pop(k)
    return {**out, "clip_qkv": cfg.attention.clip_qkv or None}

  def exportable(self, cfg):
    super().exportable(cfg)
    if set(cfg.ffn_kinds) != {"moe"} or cfg.moe.d_ff_expert not in (0, cfg.d_ff):
      raise ConfigError("olmoe needs an MoE in every layer with experts of width model.d_ff")


def family(model_type: str) -> Family:
  if model_type not in FAMILIES:
    raise ConfigError(f"model_type {model_type!r} is not supported; jaxlm reads {', '.join(FAMILIES.keys())}")
  return FAMILIES.get(model_type)()


def family_for(cfg: ModelConfig) -> Family:
  """The HF family a jaxlm model exports to by default (the first whose layout holds it)."""
  a, moe = cfg.attention, "moe" in cfg.ffn_kinds
  if a.qk_norm == "proj":
    name = "olmoe"
  elif a.qk_norm == "head":
    name = "qwen3_moe" if moe else "qwen3"
  elif a.qkv_bias:
    name = "qwen2_moe" if moe else "qwen2"
  elif moe:
    mixtral = not cfg.moe.n_shared_experts and cfg.moe.renormalize and set(cfg.ffn_kinds) == {"moe"} and cfg.moe.d_ff_expert in (0, cfg.d_ff)
    name = "mixtral" if mixtral else "qwen2_moe"
  else:
    name = "mistral" if a.sliding_window else "llama"
  return family(name)
