"""Shared experts of their own width and the Qwen2-MoE sigmoid gate on their output: the layer
equals transformers' Qwen2MoeSparseMoeBlock, the parameters and FLOP count follow the config."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.layers.moe import MoE, moe
from jaxlm.layers.mlp import swiglu
from jaxlm.sharding import logical_axes_of

D, E, TOP_K, F, F_SHARED = 16, 4, 2, 8, 24
MOE = MoEConfig(n_experts=E, top_k=TOP_K, d_ff_expert=F, n_shared_experts=1, d_ff_shared=F_SHARED, shared_gate=True, renormalize=False)
CFG = ModelConfig(vocab_size=16, d_model=D, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, ffn="moe", dtype="float32", moe=MOE)


@functools.cache
def _built() -> MoE:
  return nnx.jit(lambda: MoE(CFG, rngs=nnx.Rngs(0)))()  # one compiled init, not one per op


def new_layer() -> MoE:
  return nnx.clone(_built())


def test_matches_transformers_qwen2_moe_block():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

  hf_cfg = transformers.Qwen2MoeConfig(
      hidden_size=D, num_experts=E, num_experts_per_tok=TOP_K, moe_intermediate_size=F, shared_expert_intermediate_size=F_SHARED, norm_topk_prob=False
  )
  block = Qwen2MoeSparseMoeBlock(hf_cfg).eval()
  torch.manual_seed(0)
  with torch.no_grad():
    for _, p in block.named_parameters():
      p.copy_(torch.randn_like(p) / D**0.5)
  w = {n: p.detach().numpy() for n, p in block.named_parameters()}

  layer = new_layer()
  layer.router[...] = jnp.asarray(w["gate.weight"].T)  # [E, D] -> [D, E]
  gate_up = w["experts.gate_up_proj"]  # [E, 2F, D]: gate rows, then up rows
  layer.experts.w_gate[...] = jnp.asarray(gate_up[:, :F].transpose(0, 2, 1))
  layer.experts.w_up[...] = jnp.asarray(gate_up[:, F:].transpose(0, 2, 1))
  layer.experts.w_down[...] = jnp.asarray(w["experts.down_proj"].transpose(0, 2, 1))  # [E, D, F] -> [E, F, D]
  for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
    getattr(layer.shared, ours)[...] = jnp.asarray(w[f"shared_expert.{theirs}.weight"].T)
  layer.shared_gate[...] = jnp.asarray(w["shared_expert_gate.weight"].T)  # [1, D] -> [D, 1]

  x = np.array(jax.random.normal(jax.random.key(1), (2, 32, D)), np.float32)
  with torch.no_grad():
    ref = block(torch.from_numpy(x)).numpy()
  y, _ = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x))
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_shared_parameters_and_gate_formula():
  layer = new_layer()
  assert layer.shared.w_gate.shape == (D, F_SHARED) and layer.shared.w_down.shape == (F_SHARED, D)
  gate = layer.shared_gate
  assert gate.shape == (D, 1) and logical_axes_of(gate) == ("embed", None) and gate.get_metadata()["fan_in"] == (-2,)
  # Without d_ff_shared the shared experts are n_shared_experts experts of width d_ff_expert, ungated.
  plain = nnx.eval_shape(lambda: MoE(dataclasses.replace(CFG, moe=dataclasses.replace(MOE, n_shared_experts=2, d_ff_shared=0, shared_gate=False)), rngs=nnx.Rngs(0)))
  assert plain.shared.w_gate.shape == (D, 2 * F) and plain.shared_gate is None

  # The pure function: routed experts + sigmoid(x @ shared_gate) * shared SwiGLU.
  p = {"router": layer.router[...], **layer.experts.params()}
  shared = {"w_gate": layer.shared.w_gate[...], "w_up": layer.shared.w_up[...], "w_down": layer.shared.w_down[...]}
  g = jax.random.normal(jax.random.key(2), (D, 1))
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  pure = jax.jit(lambda p, x: moe(p, x, CFG)[0])
  routed, y = pure(p, x), pure({**p, "shared": shared, "shared_gate": g}, x)
  expected = routed + jax.nn.sigmoid(x @ g) * swiglu(x, shared["w_gate"], shared["w_up"], shared["w_down"])
  np.testing.assert_allclose(y, expected, atol=1e-5)


def test_forward_flops_count_the_shared_width_and_gate():
  count = 2 * (D * E + TOP_K * 3 * D * F + 3 * D * F_SHARED + D)
  assert MoE.forward_flops_per_token(CFG, 32) == count
  ungated = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, n_shared_experts=2, d_ff_shared=0, shared_gate=False))
  assert MoE.forward_flops_per_token(ungated, 32) == 2 * (D * E + TOP_K * 3 * D * F + 2 * 3 * D * F)
