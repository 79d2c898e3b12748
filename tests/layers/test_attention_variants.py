"""Attention variants of the Hugging Face families against transformers' own attention modules
(Qwen2 biases, Qwen3 head q/k norm, OLMoE projection q/k norm + clipping, Mistral sliding
window, Llama 3.1 and linear RoPE scaling), and the sliding window's meaning: which outputs an
input can reach, packed documents equal documents alone, cached decoding equals the full pass."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import QK_NORMS, AttentionConfig, ModelConfig, RopeScalingConfig
from jaxlm.layers import Attention, KVCache
from jaxlm.layers.attention import QK_NORM_AXES, attention
from jaxlm.layers.params import is_elementwise
from jaxlm.peft.methods import METHODS
from jaxlm.sharding import logical_axes_of
from jaxlm.train.optimizer import decay_mask

D, H, G, K = 32, 4, 2, 8
CFG = ModelConfig(d_model=D, n_heads=H, n_kv_heads=G, head_dim=K, d_ff=64, n_layers=1, vocab_size=16, dtype="float32", norm_eps=1e-6)


@nnx.jit
def call(layer: Attention, x, positions, segment_ids=None, cache=None):
  """The layer, compiled whole (faster on CPU than op by op)."""
  return layer(x, positions=positions, segment_ids=segment_ids, cache=cache)


def cfg_with(rope_scaling: RopeScalingConfig = RopeScalingConfig(), **attn) -> ModelConfig:
  return dataclasses.replace(CFG, attention=AttentionConfig(**attn), rope_scaling=rope_scaling)


# -- against transformers ----------------------------------------------------------------------

LLAMA3 = RopeScalingConfig(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=64)  # K=8: one frequency in each band
# family: (transformers model type, config kwargs, rope_parameters extras, jaxlm attention variants, jaxlm rope scaling)
FAMILIES = {
    "qwen2-bias": ("qwen2", {}, {}, dict(qkv_bias=True), RopeScalingConfig()),
    "qwen3-head-norm": ("qwen3", {}, {}, dict(qk_norm="head"), RopeScalingConfig()),
    "olmoe-proj-norm-clip": ("olmoe", dict(clip_qkv=0.8), {}, dict(qk_norm="proj", clip_qkv=0.8), RopeScalingConfig()),
    "mistral-window": ("mistral", dict(sliding_window=5), {}, dict(sliding_window=5), RopeScalingConfig()),
    "llama-rope-llama3": (
        "llama",
        {},
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
        {},
        LLAMA3,
    ),
    "llama-rope-linear": ("llama", {}, dict(rope_type="linear", factor=4.0), {}, RopeScalingConfig(kind="linear", factor=4.0)),
}


def hf_attention(model_type: str, config_kw: dict, rope_kw: dict):
  """A transformers attention module of `model_type` with random weights, and a function
  x [B, L, D] (torch) -> its output, computed with the model's own RoPE and mask functions."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from transformers import masking_utils
  from transformers.models.auto.configuration_auto import CONFIG_MAPPING

  rope = {"rope_type": "default", "rope_theta": 10_000.0, **rope_kw}
  hf_cfg = CONFIG_MAPPING[model_type](
      hidden_size=D, num_attention_heads=H, num_key_value_heads=G, head_dim=K, num_hidden_layers=1, intermediate_size=64,
      vocab_size=16, rms_norm_eps=1e-6, rope_parameters=rope, **config_kw,
  )
  hf_cfg._attn_implementation = "eager"
  mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
  prefix = {"qwen2": "Qwen2", "qwen3": "Qwen3", "olmoe": "Olmoe", "mistral": "Mistral", "llama": "Llama"}[model_type]
  attn = getattr(mod, f"{prefix}Attention")(hf_cfg, layer_idx=0).eval()
  rotary = getattr(mod, f"{prefix}RotaryEmbedding")(hf_cfg)
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in attn.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / D**0.5)
  make_mask = masking_utils.create_sliding_window_causal_mask if config_kw.get("sliding_window") else masking_utils.create_causal_mask

  def run(x):
    pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    mask = make_mask(config=hf_cfg, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos, allow_is_causal_skip=False)
    with torch.no_grad():
      return attn(x, position_embeddings=rotary(x, pos), attention_mask=mask)[0]

  return attn, run


def load_hf(layer: Attention, hf_attn) -> None:
  """Copy a transformers attention module's weights into `layer` (the layout of DESIGN.md)."""
  w = {n: p.detach().numpy() for n, p in hf_attn.named_parameters()}
  layer.w_q[...] = jnp.asarray(w["q_proj.weight"].T.reshape(D, H, K))
  layer.w_k[...] = jnp.asarray(w["k_proj.weight"].T.reshape(D, G, K))
  layer.w_v[...] = jnp.asarray(w["v_proj.weight"].T.reshape(D, G, K))
  layer.w_o[...] = jnp.asarray(w["o_proj.weight"].T.reshape(H, K, D))
  for ours, theirs, heads in (("b_q", "q_proj.bias", H), ("b_k", "k_proj.bias", G), ("b_v", "v_proj.bias", G)):
    if theirs in w:
      getattr(layer, ours)[...] = jnp.asarray(w[theirs].reshape(heads, K))
  for ours, theirs in (("q_norm", "q_norm.weight"), ("k_norm", "k_norm.weight")):
    if theirs in w:
      norm = getattr(layer, ours)
      norm.scale[...] = jnp.asarray(w[theirs].reshape(norm.scale.shape))
  assert not any(n.endswith("bias") for n in w if n.split(".")[0] not in ("q_proj", "k_proj", "v_proj")), "o_proj bias is not supported"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_transformers_attention(family):
  torch = pytest.importorskip("torch")
  model_type, config_kw, rope_kw, variants, scaling = FAMILIES[family]
  hf_attn, run = hf_attention(model_type, config_kw, rope_kw)
  layer = Attention(cfg_with(scaling, **variants), rngs=nnx.Rngs(0))
  load_hf(layer, hf_attn)
  x = np.array(jax.random.normal(jax.random.key(1), (2, 64, D)), np.float32)
  ref = run(torch.from_numpy(x)).numpy()
  y, _ = call(layer, jnp.asarray(x), jnp.broadcast_to(jnp.arange(64), (2, 64)))
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  # The packed path (segment ids, positions) computes the same mask for one document per row.
  y_seg, _ = call(layer, jnp.asarray(x), jnp.broadcast_to(jnp.arange(64), (2, 64)), jnp.ones((2, 64), jnp.int32))
  np.testing.assert_allclose(y_seg, ref, atol=1e-5, rtol=1e-5)


def test_clip_changes_the_output():
  """clip_qkv=0.8 changes the output (so the comparison above tests the clamp and its order)."""
  layer = Attention(cfg_with(qk_norm="proj", clip_qkv=0.8), rngs=nnx.Rngs(0))
  unclipped = Attention(cfg_with(qk_norm="proj"), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 16, D))
  pos = jnp.arange(16)[None]
  layer.w_v[...] = layer.w_v[...] * 50.0  # make |v| >> 0.8
  unclipped.w_v[...] = layer.w_v[...]
  y, _ = call(layer, x, pos)
  y0, _ = call(unclipped, x, pos)
  assert not np.allclose(y, y0, atol=1e-3)


# -- sliding window: meaning ------------------------------------------------------------------

WINDOW = 3


def test_sliding_window_reach():
  """x_t reaches exactly the outputs t .. t + window - 1 (query i sees keys i - window < j <= i)."""
  layer = Attention(cfg_with(sliding_window=WINDOW), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 12, D))
  pos = jnp.arange(12)[None]
  for segment_ids in (None, jnp.ones((1, 12), jnp.int32)):
    y0, _ = call(layer, x, pos, segment_ids)
    for t in (0, 4, 9):
      y1, _ = call(layer, x.at[:, t].add(3.0), pos, segment_ids)
      changed = ~np.all(np.isclose(y0, y1, rtol=0, atol=0), axis=-1)[0]
      np.testing.assert_array_equal(changed, (np.arange(12) >= t) & (np.arange(12) < t + WINDOW))


def test_sliding_window_packed_documents_equal_documents_alone():
  layer = Attention(cfg_with(sliding_window=WINDOW), rngs=nnx.Rngs(0))
  a = jax.random.normal(jax.random.key(1), (1, 5, D))
  b = jax.random.normal(jax.random.key(2), (1, 9, D))
  seg = jnp.array([[1] * 5 + [2] * 9])
  pos = jnp.concatenate([jnp.arange(5), jnp.arange(9)])[None]
  packed, _ = call(layer, jnp.concatenate([a, b], 1), pos, seg)
  alone_a, _ = call(layer, a, jnp.arange(5)[None])
  alone_b, _ = call(layer, b, jnp.arange(9)[None])
  np.testing.assert_allclose(packed[:, :5], alone_a, atol=1e-6)
  np.testing.assert_allclose(packed[:, 5:], alone_b, atol=1e-6)


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_sliding_window_cache_decoding_equals_full_forward(prompt_len):
  layer = Attention(cfg_with(sliding_window=WINDOW, qkv_bias=True, qk_norm="head"), rngs=nnx.Rngs(0))
  layer.b_k[...] = jax.random.normal(jax.random.key(3), layer.b_k.shape)
  x = jax.random.normal(jax.random.key(1), (2, 10, D))
  full, _ = call(layer, x, jnp.broadcast_to(jnp.arange(10), (2, 10)))
  cache = KVCache.zeros(2, 10, G, K, jnp.float32)
  y, cache = call(layer, x[:, :prompt_len], jnp.broadcast_to(jnp.arange(prompt_len), (2, prompt_len)), cache=cache)
  outs = [y]
  for t in range(prompt_len, 10):
    y, cache = call(layer, x[:, t : t + 1], jnp.full((2, 1), t), cache=cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


# -- parameters: names, axes, pure function, weight decay and BitFit ----------------------------


def test_variant_parameters():
  layer = Attention(cfg_with(qkv_bias=True, qk_norm="proj"), rngs=nnx.Rngs(0))
  expected = {
      "b_q": ((H, K), ("heads", "head_dim")),
      "b_k": ((G, K), ("kv_heads", "head_dim")),
      "b_v": ((G, K), ("kv_heads", "head_dim")),
      "q_norm/scale": ((H, K), ("heads", "head_dim")),
      "k_norm/scale": ((G, K), ("kv_heads", "head_dim")),
  }
  params = {"/".join(map(str, p)): v for p, v in nnx.iter_graph(layer) if isinstance(v, nnx.Param)}
  for name, (shape, axes) in expected.items():
    v = params[name]
    assert (v.shape, logical_axes_of(v)) == (shape, axes), name
    assert is_elementwise(v) and "fan_in" not in v.get_metadata(), name
  np.testing.assert_array_equal(layer.b_q[...], 0.0)
  np.testing.assert_array_equal(layer.q_norm.scale[...], 1.0)
  head = Attention(cfg_with(qk_norm="head"), rngs=nnx.Rngs(0))
  assert (head.q_norm.scale.shape, logical_axes_of(head.q_norm.scale)) == ((K,), ("head_dim",))
  assert (head.k_norm.scale.shape, logical_axes_of(head.k_norm.scale)) == ((K,), ("head_dim",))
  assert set(QK_NORM_AXES) == set(QK_NORMS) - {"none"}


@pytest.mark.parametrize("scan", [False, True])
def test_biases_and_qk_norms_get_no_weight_decay_and_bitfit_trains_them(scan):
  from jaxlm.models import abstract_model
  from jaxlm.train.step import split_model

  cfg = dataclasses.replace(cfg_with(qkv_bias=True, qk_norm="proj"), n_layers=2, scan_layers=scan)
  model = abstract_model(cfg)
  _, params, _, _ = split_model(model)
  mask = nnx.to_pure_dict(decay_mask(params))
  attn = mask["units"]["blocks"][0]["attn"] if scan else mask["blocks"][0]["attn"]
  assert {n: attn[n] for n in ("b_q", "b_k", "b_v", "w_q", "w_o")} == {"b_q": False, "b_k": False, "b_v": False, "w_q": True, "w_o": True}
  assert attn["q_norm"]["scale"] is False and attn["k_norm"]["scale"] is False
  bitfit = METHODS.get("bitfit").trainable
  trained = {"/".join(map(str, p[-2:])) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and bitfit(p, v) and "attn" in p}
  assert trained == {"attn/b_q", "attn/b_k", "attn/b_v", "q_norm/scale", "k_norm/scale"}


def test_pure_function_matches_module_with_every_variant():
  cfg = cfg_with(LLAMA3, qkv_bias=True, qk_norm="proj", clip_qkv=2.0, sliding_window=4)
  layer = Attention(cfg, rngs=nnx.Rngs(3))
  layer.b_q[...] = jax.random.normal(jax.random.key(4), layer.b_q.shape)
  x = jax.random.normal(jax.random.key(1), (1, 6, D))
  pos = jnp.arange(6)[None]
  y_mod, _ = layer(x, positions=pos)
  weights = (layer.w_q[...], layer.w_k[...], layer.w_v[...], layer.w_o[...])
  kw = dict(positions_bl=pos, segment_ids_bl=None, rope_theta=cfg.rope_theta, rope_scaling=LLAMA3, cfg=cfg.attention, norm_eps=cfg.norm_eps)
  variant = dict(b_q_hk=layer.b_q[...], b_k_gk=layer.b_k[...], b_v_gk=layer.b_v[...], q_norm=layer.q_norm.scale[...], k_norm=layer.k_norm.scale[...])
  y_fn, _ = attention(x, *weights, **kw, **variant)
  np.testing.assert_array_equal(y_mod, y_fn)
  with pytest.raises(ValueError, match="qkv_bias.*b_q_hk"):
    attention(x, *weights, **kw)


def test_bitfit_trains_biases_and_norms_but_never_routers_or_gates():
  """A Qwen2-MoE-shaped model: BitFit takes the q/k/v biases and every norm scale; the router
  [D, E] and the shared-expert gate [D, 1] have one named axis too but are linear weights."""
  from jaxlm.config import MoEConfig
  from jaxlm.models import abstract_model

  moe = MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, shared_gate=True)
  cfg = dataclasses.replace(cfg_with(qkv_bias=True), n_layers=1, ffn="moe", moe=moe)
  bitfit = METHODS.get("bitfit").trainable
  trained = {"/".join(map(str, p[2:] if p[0] == "blocks" else p)) for p, v in nnx.iter_graph(abstract_model(cfg)) if isinstance(v, nnx.Param) and bitfit(p, v)}
  assert trained == {"attn/b_q", "attn/b_k", "attn/b_v", "attn_norm/scale", "ffn_norm/scale", "final_norm/scale"}
