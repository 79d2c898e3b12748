"""Tiny random `transformers` models of every family: the golden reference of the interop tests
and benchmarks (needs torch and transformers: `pip install 'jaxlm[hf]'`).

Each config turns on what makes its family differ, at sizes where it matters: prompts of 512
tokens against Llama 3 rope scaling pre-trained on 128, a Mistral window of 48, Qwen2-MoE's dense
first layer and gated shared expert, Qwen3's head_dim != hidden / heads, OLMoE's clipped q/k/v.
`initializer_range` is large so that greedy decoding is decisive (no near-ties between tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=False,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128}

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(rope_parameters=LLAMA3_ROPE),
    "mistral": dict(sliding_window=48),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen2_moe": dict(**MOE, shared_expert_intermediate_size=80, mlp_only_layers=[0], norm_topk_prob=False),
    "qwen3": dict(head_dim=32),
    "qwen3_moe": dict(**MOE, head_dim=32, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, clip_qkv=0.6, norm_topk_prob=False),  # experts of intermediate_size
}


def make(model_type: str, out_dir: Path | str | None = None, *, seed: int = 0, **overrides: Any):
  """A random float32 `transformers` model of the family (eager attention), saved to `out_dir`."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS[model_type], **overrides})
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
  if out_dir is not None:
    model.save_pretrained(str(out_dir))
  return model


def logits(model, tokens: np.ndarray) -> np.ndarray:
  """HF logits [B, L, V] in float32 for int tokens [B, L] (no padding)."""
  import torch

  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def greedy(model, prompt: list[int], n: int) -> list[int]:
  """HF greedy continuation of one prompt: exactly n new tokens."""
  import torch

  with torch.no_grad():
    out = model.generate(torch.as_tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt) :].tolist()


def tokenizer(out_dir: Path | str, vocab_size: int = 320) -> dict[str, int]:
  """A byte-level BPE `tokenizer.json` trained here on the standard library's prose, with
  `<s>` / `</s>` after the learned pieces and a tokenizer_config.json naming them, as transformers
  writes it. Returns {"vocab_size", "bos_token_id", "eos_token_id"} for the model's config."""
  import json

  import tokenizers as lib
  from pydoc_data.topics import topics

  tok = lib.Tokenizer(lib.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = lib.decoders.ByteLevel()
  trainer = lib.trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=["<unk>"], initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(list(topics.values())[:40], trainer)
  tok.add_special_tokens(["<s>", "</s>"])
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok.save(str(out / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
  (out / "tokenizer_config.json").write_text(json.dumps(config))
  return {"vocab_size": tok.get_vocab_size(), "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id("</s>")}
