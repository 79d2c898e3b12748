"""Top-k routing as one Triton kernel: scores, top-k, weights and dispatch counts.

Grid: one program per block of `block_t` tokens, all independent. Triton tiles must have
power-of-two sizes, so the kernel works on a [block_t, E_pad] tile (E_pad = next power of two
>= E, padding lanes masked to -inf on load) and [block_t, k_pad] slot tiles, and masks every
store to the real rows and lanes. The within-block exclusive prefix count of the choice mask
(how many earlier tokens of the block chose each expert) is a `cumsum` down the token axis.
The math is the TPU kernel's (`blocks.pick_topk`, `blocks.finish_weights`), and
`blocks.assemble` turns the per-block counts into `group_sizes` and `sort_perm`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels.routing import blocks
from pallas_kernels.routing.reference import Routing

DEFAULT_BLOCK_T = 64


def _kernel(
    bias_ref, logits_ref, ids_ref, weights_ref, rank_ref, counts_ref,
    *, k: int, mode: str, renormalize: bool, block_t: int, lanes_e: int, lanes_k: int,
):
  num_tokens, num_experts = logits_ref.shape
  row0 = pl.program_id(0) * block_t
  row_t = row0 + jnp.arange(block_t, dtype=jnp.int32)
  lane_e = jnp.arange(lanes_e, dtype=jnp.int32)
  lane_k = jnp.arange(lanes_k, dtype=jnp.int32)
  row_ok = (row_t < num_tokens)[:, None]
  lane_ok = (lane_e < num_experts)[None, :]
  x = plgpu.load(
      logits_ref.at[pl.ds(row0, block_t), pl.ds(0, lanes_e)],
      mask=jnp.logical_and(row_ok, lane_ok),
      other=-jnp.inf,
  ).astype(jnp.float32)
  if mode == "topk_softmax":
    select, score = x, x
  elif mode == "softmax_topk":
    p = jnp.exp(x - jnp.max(x, axis=1, keepdims=True))
    select, score = x, p / jnp.sum(p, axis=1, keepdims=True)
  else:
    bias = plgpu.load(bias_ref.at[pl.ds(0, lanes_e)], mask=lane_e < num_experts, other=0.0)
    score = jax.nn.sigmoid(x)
    select = jnp.where(lane_ok, score + bias[None, :], -jnp.inf)
  iota_te = jnp.broadcast_to(lane_e[None, :], (block_t, lanes_e))
  iota_tk = jnp.broadcast_to(lane_k[None, :], (block_t, lanes_k))
  ids, vals, hits = blocks.pick_topk(select, score, k, iota_te, iota_tk)
  weights = blocks.finish_weights(vals, iota_tk < k, mode, renormalize)

  out_mask = jnp.logical_and(row_ok, (lane_k < k)[None, :])
  out_at = (pl.ds(row0, block_t), pl.ds(0, lanes_k))
  plgpu.store(ids_ref.at[out_at], ids, mask=out_mask)
  plgpu.store(weights_ref.at[out_at], weights, mask=out_mask)

  chosen = functools.reduce(jnp.logical_or, hits)
  chosen_te = jnp.where(jnp.logical_and(chosen, row_ok), 1, 0).astype(jnp.int32)
  plgpu.store(
      counts_ref.at[pl.program_id(0), pl.ds(0, lanes_e)],
      jnp.sum(chosen_te, axis=0),
      mask=lane_e < num_experts,
  )
  before_te = jnp.cumsum(chosen_te, axis=0) - chosen_te
  rank = jnp.zeros((block_t, lanes_k), jnp.int32)
  for j, hit in enumerate(hits):
    r = jnp.sum(jnp.where(hit, before_te, 0), axis=1, keepdims=True)
    rank = jnp.where(iota_tk == j, r, rank)
  plgpu.store(rank_ref.at[out_at], rank, mask=out_mask)


def topk_route(
    logits_te: jax.Array,
    bias_e: jax.Array,
    *,
    k: int,
    mode: str,
    renormalize: bool,
    block_t: int = DEFAULT_BLOCK_T,
    interpret: bool = False,
) -> Routing:
  """Top-k routing on GPU (forward only; `ops.topk_route` adds the VJP and checks).

  Args:
    logits_te: [T,E] float logits; each program loads a [block_t, E_pad] tile.
    bias_e: [E] float32 selection bias (zeros when unused).
    k: experts per token.
    mode: "softmax_topk", "topk_softmax" or "sigmoid".
    renormalize: divide the weights by their sum.
    block_t: tokens per program, a power of two (lowered for many experts).
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    `Routing` (see `reference.Routing`).
  """
  num_tokens, num_experts = logits_te.shape
  # Keep a [block_t, E_pad] tile within ~4K elements: several live copies sit in registers.
  block_t = min(block_t, max(16, 4096 // common.next_pow2(num_experts)))
  block_t = common.triton_block(num_tokens, block_t)
  num_blocks = common.cdiv(num_tokens, block_t)
  kernel = functools.partial(
      _kernel, k=k, mode=mode, renormalize=renormalize, block_t=block_t,
      lanes_e=common.next_pow2(num_experts), lanes_k=common.next_pow2(k),
  )
  ids, weights, rank, counts = pl.pallas_call(
      kernel,
      grid=(num_blocks,),
      out_shape=[
          common.out_struct((num_tokens, k), jnp.int32, logits_te, bias_e),
          common.out_struct((num_tokens, k), jnp.float32, logits_te, bias_e),
          common.out_struct((num_tokens, k), jnp.int32, logits_te, bias_e),
          common.out_struct((num_blocks, num_experts), jnp.int32, logits_te, bias_e),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="topk_route",
  )(bias_e.astype(jnp.float32), logits_te)
  return blocks.assemble(ids, weights, rank, counts, block_t)
