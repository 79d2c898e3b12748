"""Analytical model FLOPs per token, and peak FLOP/s per device kind for MFU.

Training FLOPs per token = 3 x forward (backward costs two forwards: Kaplan et al. 2020), with
  forward = 2 x (matmul weights used per token, including the output head)
          + attention: 2 x 2 x L x H x K per layer (scores q.k and the weighted sum of v, over
            the full L x L square that dense attention kernels compute; PaLM, Chowdhery et al.
            2022, Appendix B: 6N + 12 n_layers H K L).
Embedding lookups, norms, softmax and elementwise work are not counted (they are <1%).
An FFN kind contributes `forward_flops_per_token(cfg, seq_len)` (dense: 2 x 3 x D x F).
"""

from __future__ import annotations

from jaxlm.config import ModelConfig

# Dense bf16 peak per device (one chip / one GPU), in FLOP/s, from the vendors' spec sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,  # v6e / Trillium
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,  # Ironwood
    "H100": 989e12,  # SXM, dense
    "H200": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L4": 121e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of this kind, or None (CPUs and unknown devices)."""
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # longest match first ("TPU v5p" before "TPU v5")
    if name.lower() in device_kind.lower():
      return PEAK_FLOPS[name]
  return None


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs of q.k and p.v for one token in one layer."""
  return 2 * 2 * seq_len * cfg.n_heads * cfg.resolved_head_dim


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  from jaxlm.layers.ffn import FFN

  d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
  attn_proj = 2 * d * (2 * h * k + 2 * g * k)  # q, o: D x H K; k, v: D x G K
  head = 2 * d * cfg.vocab_size
  layers = sum(attn_proj + attention_flops_per_token(cfg, seq_len) + FFN.get(kind).forward_flops_per_token(cfg, seq_len) for kind in cfg.ffn_kinds)
  return layers + head


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, frozen_base: bool = False) -> float:
  """Forward + backward: 3x the forward, or 2x when the weights are frozen (PEFT: the backward
  pass forms the activations' gradients, never the frozen weights'; adapters are neglected)."""
  return (2 if frozen_base else 3) * forward_flops_per_token(cfg, seq_len)
