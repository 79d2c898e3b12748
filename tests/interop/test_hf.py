"""Hugging Face interop against transformers itself: import, generate, export, per family.

For each family a tiny random model is built with transformers (jaxlm.interop.hf.tiny), saved,
and imported. In float32, on 512-token prompts (short prompts hide RoPE bugs):
  - logits of an unpacked row equal HF's within 1e-4, and a packed row of two documents
    equals HF run on each document alone;
  - greedy generation of 20 tokens from a batch of two prompts of different lengths (padded)
    gives HF's ids for each prompt;
  - export -> transformers loads it -> HF's logits are bitwise those of the original model;
  - MoE families: exported with fused expert names, which transformers and jaxlm both read.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from jaxlm.errors import ConfigError  # noqa: E402
from jaxlm.generate import SamplingConfig, generate_tokens  # noqa: E402
from jaxlm.interop import hf  # noqa: E402
from jaxlm.interop.hf import tiny  # noqa: E402

torch.set_num_threads(1)
FAST = ["llama", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
SLOW = ["qwen2", "qwen3"]  # dense variants of families covered above (biases, tied head; per-head q/k norm)
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}
TOL = 1e-4
DOC1 = 300  # the packed row: documents of 300 and 212 tokens


def _packed_batch(tokens: np.ndarray):
  """Row 0: tokens as one sequence; row 1: the same tokens as two packed documents."""
  length = tokens.shape[0]
  seg = np.stack([np.ones(length, np.int32), np.where(np.arange(length) < DOC1, 1, 2).astype(np.int32)])
  pos = np.stack([np.arange(length), np.concatenate([np.arange(DOC1), np.arange(length - DOC1)])]).astype(np.int32)
  return np.stack([tokens, tokens]), seg, pos


def check_family(model_type: str, tmp_path, fused: bool) -> dict[str, float]:
  ref_model = tiny.make(model_type, tmp_path / "hf")
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 256, 512)
  ref = tiny.logits(ref_model, tokens[None])[0]
  ref_docs = [tiny.logits(ref_model, tokens[None, :DOC1])[0], tiny.logits(ref_model, tokens[None, DOC1:])[0]]

  model = hf.load_model(tmp_path / "hf", show_progress=False)
  toks, seg, pos = _packed_batch(tokens)
  out, _ = model(jnp.asarray(toks), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
  out = np.asarray(out)
  diff = {
      "logits": float(np.abs(out[0] - ref).max()),
      "packed": float(max(np.abs(out[1, :DOC1] - ref_docs[0]).max(), np.abs(out[1, DOC1:] - ref_docs[1]).max())),
  }
  assert diff["logits"] < TOL and diff["packed"] < TOL, diff

  prompts = [tokens[:37].tolist(), tokens[100:160].tolist()]
  ours = generate_tokens(model, prompts, SamplingConfig(max_new_tokens=20, temperature=0.0), n_allowed=256, eos_id=-1, pad_id=0)
  for p, got in zip(prompts, ours):
    assert got == tiny.greedy(ref_model, p, 20)

  hf.save(model, tmp_path / "out", fused_experts=fused, max_shard_bytes=200_000, show_progress=False)
  if fused:
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in index
    again, _ = hf.load_model(tmp_path / "out", show_progress=False)(jnp.asarray(toks), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
    np.testing.assert_array_equal(np.asarray(again), out)  # the same weights
  import transformers

  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
  np.testing.assert_array_equal(tiny.logits(back, tokens[None])[0], ref)
  return diff


@pytest.mark.parametrize("model_type", FAST)
def test_family_matches_transformers(model_type, tmp_path):
  check_family(model_type, tmp_path, fused=model_type in MOE)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", SLOW)
def test_dense_variants_match_transformers(model_type, tmp_path):
  check_family(model_type, tmp_path, fused=False)


def test_legacy_and_fused_expert_names_are_the_same_experts(tmp_path):
  """transformers' save_pretrained writes legacy per-expert names; the fused export holds the
  same arrays: gate rows then up rows of gate_up_proj [E, 2F, D], down_proj [E, D, F]."""
  from safetensors.numpy import load_file

  tiny.make("mixtral", tmp_path / "hf")
  model = hf.load_model(tmp_path / "hf", show_progress=False)
  hf.save(model, tmp_path / "fused", fused_experts=True, show_progress=False)
  legacy = load_file(str(tmp_path / "hf" / "model.safetensors"))
  fused = load_file(str(tmp_path / "fused" / "model.safetensors"))
  gate_up, down = fused["model.layers.0.mlp.experts.gate_up_proj"], fused["model.layers.0.mlp.experts.down_proj"]
  f = gate_up.shape[1] // 2
  for j in range(4):
    p = f"model.layers.0.block_sparse_moe.experts.{j}."
    np.testing.assert_array_equal(gate_up[j, :f], legacy[p + "w1.weight"])
    np.testing.assert_array_equal(gate_up[j, f:], legacy[p + "w3.weight"])
    np.testing.assert_array_equal(down[j], legacy[p + "w2.weight"])
  np.testing.assert_array_equal(fused["model.layers.0.mlp.gate.weight"], legacy["model.layers.0.block_sparse_moe.gate.weight"])


def test_sharded_load_equals_single_device(tmp_path):
  """Loaded straight into fsdp x expert x tensor shardings on 8 devices: every parameter has the
  sharding its logical axes ask for and the values of the single-device load."""
  import jax
  from flax import nnx

  from jaxlm import sharding
  from jaxlm.config import MeshConfig

  tiny.make("qwen2_moe", tmp_path / "hf")
  mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2))
  one = nnx.state(hf.load_model(tmp_path / "hf", show_progress=False), nnx.Param)
  model = hf.load_model(tmp_path / "hf", mesh, show_progress=False)
  many = nnx.state(model, nnx.Param)
  want = sharding.state_shardings(many, mesh, sharding.make_rules())
  assert model.blocks[1].ffn.experts.w_gate[...].sharding.spec[0] == "expert"
  for a, b, s in zip(jax.tree.leaves(one), jax.tree.leaves(many), jax.tree.leaves(want)):
    assert b.sharding.is_equivalent_to(s, b.ndim)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- bad input ---------------------------------------------------------------------------------


def test_bad_directories(tmp_path):
  with pytest.raises(ConfigError, match="no config.json"):
    hf.load_model(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ConfigError, match="'gpt2' is not supported; jaxlm reads .*llama.*mixtral"):
    hf.load_model(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ],
)
def test_unsupported_fields_are_refused_by_name(tmp_path, change, match):
  tiny.make("llama", tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
  with pytest.raises(ConfigError, match=match):
    hf.load_model(tmp_path, show_progress=False)


def test_mismatched_and_missing_tensors(tmp_path):
  tiny.make("llama", tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
  with pytest.raises(ConfigError, match="shape mismatch: model.layers.0.mlp.gate_proj.weight"):
    hf.load_model(tmp_path, show_progress=False)
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
  with pytest.raises(ConfigError, match="missing tensor model.layers.2"):
    hf.load_model(tmp_path, show_progress=False)


def test_export_refuses_what_a_family_cannot_hold(tmp_path):
  from jaxlm.config import ModelConfig, MoEConfig
  from jaxlm.models import build

  model = build(ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, ffn="moe", moe=MoEConfig(n_experts=4, router="sigmoid_bias")))
  with pytest.raises(ConfigError, match="routes by softmax top-k"):
    hf.save(model, tmp_path / "out", show_progress=False)
  assert not (tmp_path / "out").exists()
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(ConfigError, match="not empty"):
    hf.save(build(ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)), tmp_path / "full", show_progress=False)
