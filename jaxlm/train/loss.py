"""The language-model loss: cross-entropy and z-loss sums over masked tokens, whole or in chunks.

Over a large vocabulary the float32 logits dominate a step's memory: Llama 3's 128k vocabulary
at 2 x 8192 tokens per device is 8.4 GB of logits, and as much again for their gradient.
`chunked_token_losses` takes the final hidden states and the output head instead of the logits
and computes the same sums about `chunk` tokens per device at a time: a `lax.scan` over chunks
of sequence positions (every row of the batch at once, so the batch stays split over the
devices as it was and per-example adapter ids still apply) whose body is rematerialised
(`jax.checkpoint`): the forward pass keeps only three running sums, the backward pass
recomputes one chunk's logits at a time. The price is one more forward matmul of the head
(2 x D x V FLOPs per token).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxlm.sharding import shard, spec

Losses = tuple[jax.Array, jax.Array, jax.Array]  # (cross-entropy sum, logsumexp^2 sum, token count), float32


def token_losses(logits_blv: jax.Array, targets_bl: jax.Array, mask_bl: jax.Array) -> Losses:
  """(sum of cross-entropy, sum of logsumexp^2 (z-loss), number of tokens) over masked tokens."""
  logits = logits_blv.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_bl[..., None], axis=-1)[..., 0]
  m = mask_bl.astype(jnp.float32)
  return jnp.sum((lse - target_logit) * m), jnp.sum(lse * lse * m), jnp.sum(m)


def rows_per_device(b: int) -> int:
  """Rows of a [B, ...] batch on each device: B over the mesh axes the `batch` axis is split
  over (the mesh set with `jax.set_mesh`, the rules of `sharding.use_rules`); B without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return b
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  (axes,) = spec(("batch",), (b,), sizes) or (None,)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return -(-b // math.prod(sizes[a] for a in axes))


def chunked_token_losses(head: Callable[[jax.Array], jax.Array], x_bld: jax.Array, targets_bl: jax.Array, mask_bl: jax.Array, *, chunk: int) -> Losses:
  """`token_losses(head(x_bld), targets_bl, mask_bl)`, never forming more than one chunk's logits.

  head: a pure function x [B, C, D] -> logits [B, C, V] (e.g. `Transformer.head_fn()`).
  chunk: tokens per device in one chunk (0: no chunks). A chunk holds C = chunk // (rows per
  device) positions of every row (the whole sequence when C >= L: the plain computation). L is
  split into n = ceil(L / C) chunks of equal length ceil(L / n), padded with masked positions;
  chunk k holds positions k, k + n, k + 2n, ... so that a sequence axis split over devices stays
  spread over them in every chunk.
  """
  b, length, _ = x_bld.shape
  positions = max(chunk // rows_per_device(b), 1)
  if chunk <= 0 or positions >= length:
    return token_losses(head(x_bld), targets_bl, mask_bl)
  n = -(-length // positions)
  c = -(-length // n)
  pad = n * c - length

  def split(a: jax.Array) -> jax.Array:  # [B, L, ...] -> [n, B, c, ...]
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    a = jnp.moveaxis(a.reshape((b, c, n) + a.shape[2:]), 2, 0)
    return shard(a, None, "batch", "seq", *(["embed"] if a.ndim == 4 else []))

  @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan: nothing to protect from CSE
  def losses(x_bcd: jax.Array, t_bc: jax.Array, m_bc: jax.Array) -> Losses:
    return token_losses(head(x_bcd), t_bc, m_bc)

  def body(acc: Losses, xs: tuple[jax.Array, ...]) -> tuple[Losses, None]:
    return tuple(a + s for a, s in zip(acc, losses(*xs))), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, (zero, zero, zero), (split(x_bld), split(targets_bl), split(mask_bl)))
  return sums
