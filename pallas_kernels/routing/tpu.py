"""Top-k routing as one Mosaic TPU kernel: scores, top-k, weights and dispatch counts.

Grid: one step per block of `block_t` tokens, all steps independent ("parallel"). Per step,
VMEM holds the [block_t, E] logits block and a few [block_t, E] float32 temporaries.

Per block the kernel computes the selection and weight scores in float32, picks the k best
experts by k rounds of (row max, lowest matching lane), and writes the ids, the weights, the
per-expert token count of the block and, per assignment, the number of earlier tokens of the
block that chose the same expert. That within-block exclusive prefix count is one MXU matmul
of a strictly-lower-triangular [block_t, block_t] 0/1 matrix with the [block_t, E] 0/1 choice
mask (bf16 operands, f32 accumulation: exact). `blocks.assemble` turns the per-block counts
into `group_sizes` and `sort_perm`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.routing import blocks
from pallas_kernels.routing.reference import Routing

DEFAULT_BLOCK_T = 256


def _kernel(
    bias_ref, logits_ref, ids_ref, weights_ref, rank_ref, counts_ref,
    *, k: int, mode: str, renormalize: bool, num_tokens: int,
):
  block_t, num_experts = logits_ref.shape
  x = logits_ref[...].astype(jnp.float32)
  if mode == "topk_softmax":
    select, score = x, x
  elif mode == "softmax_topk":
    p = jnp.exp(x - jnp.max(x, axis=1, keepdims=True))
    select, score = x, p / jnp.sum(p, axis=1, keepdims=True)
  else:
    score = jax.nn.sigmoid(x)
    select = score + bias_ref[...]
  iota_te = jax.lax.broadcasted_iota(jnp.int32, (block_t, num_experts), 1)
  iota_tk = jax.lax.broadcasted_iota(jnp.int32, (block_t, k), 1)
  ids, vals, hits = blocks.pick_topk(select, score, k, iota_te, iota_tk)
  ids_ref[...] = ids
  weights_ref[...] = blocks.finish_weights(vals, iota_tk < k, mode, renormalize)

  # Rows past the end of the token axis (last block) hold garbage: count only real tokens.
  row_t1 = pl.program_id(0) * block_t + jax.lax.broadcasted_iota(jnp.int32, (block_t, 1), 0)
  chosen = functools.reduce(jnp.logical_or, hits)
  chosen_te = jnp.where(jnp.logical_and(chosen, row_t1 < num_tokens), 1.0, 0.0)
  counts_ref[...] = jnp.sum(chosen_te, axis=0, keepdims=True).astype(jnp.int32)
  rows = jax.lax.broadcasted_iota(jnp.int32, (block_t, block_t), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (block_t, block_t), 1)
  earlier_tt = jnp.where(cols < rows, 1.0, 0.0).astype(jnp.bfloat16)
  before_te = jnp.dot(
      earlier_tt, chosen_te.astype(jnp.bfloat16), preferred_element_type=jnp.float32
  )
  rank = jnp.zeros((block_t, k), jnp.int32)
  for j, hit in enumerate(hits):
    r = jnp.sum(jnp.where(hit, before_te, 0.0), axis=1, keepdims=True).astype(jnp.int32)
    rank = jnp.where(iota_tk == j, r, rank)
  rank_ref[...] = rank


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
  """Top-k routing on TPU (forward only; `ops.topk_route` adds the VJP and checks).

  Args:
    logits_te: [T,E] float logits; tiled [block_t, E] (E whole, in lanes).
    bias_e: [E] float32 selection bias (zeros when unused); one [1, E] block.
    k: experts per token.
    mode: "softmax_topk", "topk_softmax" or "sigmoid".
    renormalize: divide the weights by their sum.
    block_t: tokens per grid step; a multiple of 16 (used whole when T <= block_t).
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    `Routing` (see `reference.Routing`).
  """
  num_tokens, num_experts = logits_te.shape
  block_t = common.tpu_block(num_tokens, block_t, 16)
  num_blocks = common.cdiv(num_tokens, block_t)
  kernel = functools.partial(
      _kernel, k=k, mode=mode, renormalize=renormalize, num_tokens=num_tokens
  )
  row_spec = pl.BlockSpec((block_t, k), lambda i: (i, 0))
  ids, weights, rank, counts = pl.pallas_call(
      kernel,
      grid=(num_blocks,),
      in_specs=[
          pl.BlockSpec((1, num_experts), lambda i: (0, 0)),
          pl.BlockSpec((block_t, num_experts), lambda i: (i, 0)),
      ],
      out_specs=[
          row_spec, row_spec, row_spec,
          pl.BlockSpec((None, 1, num_experts), lambda i: (i, 0, 0)),
      ],
      out_shape=[
          common.out_struct((num_tokens, k), jnp.int32, logits_te, bias_e),
          common.out_struct((num_tokens, k), jnp.float32, logits_te, bias_e),
          common.out_struct((num_tokens, k), jnp.int32, logits_te, bias_e),
          common.out_struct((num_blocks, 1, num_experts), jnp.int32, logits_te, bias_e),
      ],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name="topk_route",
  )(bias_e.reshape(1, num_experts).astype(jnp.float32), logits_te)
  return blocks.assemble(ids, weights, rank, counts[:, 0, :], block_t)
