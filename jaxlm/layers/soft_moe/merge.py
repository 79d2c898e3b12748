"""Merging experts in parameter space and running tokens through the merged SwiGLU.

Letters: G groups (segments), T tokens per group, D embed, F mlp, E experts.

    merged[g] = sum_e w[g, e] * expert[e]          (one einsum over the stacked experts)
    y[g]      = SwiGLU(x[g]; merged_gate[g], merged_up[g], merged_down[g])

Memory. Kept naively, the merged weights of every group are activations of size G x 3 x D x F:
D / T times the FFN's token activations (2x at D = 512, T = 256), which is what a plain einsum
merge costs (measured 2.33x the dense FFN's temporary memory). Here the merged weights are
never saved for the backward pass: `jax.checkpoint` with a policy that saves only the two
pre-activations (x W_gate, x W_up) recomputes the merge (E / T of the FFN's FLOPs) in the backward pass, and the groups go
through a `lax.scan` in chunks of `chunk` groups, so the backward pass holds the merged
weights and their gradient for one chunk at a time.

Adapted experts (expert LoRA, `jaxlm.peft`) merge through `jaxlm.layers.linear.mix`: the
merged base plus, for LoRA, sum_e w_e s A_e B_e kept factored as one rank-E R product gated by
the routing weights (never materialised in training).

Merge implementations (registered, one signature `merge(w_ge, experts_exy, *, mlp_axis)`):
  einsum  XLA einsum with float32 accumulation (fuses with its neighbours; the default).
  pallas  `pallas_kernels.merge.merge_experts` (Mosaic on TPU, Triton on CUDA, XLA elsewhere),
          inside a `shard_map` over the mesh when there is one (a Pallas call is not
          partitioned automatically): groups split like the batch, F like `mlp`.
  auto    einsum (XLA already streams the merge into the matmuls; pallas stays opt-in until
          it is measured faster on hardware).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlm import sharding
from jaxlm.layers import linear
from jaxlm.layers.experts import ExpertWeights
from jaxlm.registry import Registry
from jaxlm.sharding import shard

MERGE: Registry = Registry("soft_moe merge")
SAVED = ("soft_moe_gate", "soft_moe_up")  # the only values saved for the backward pass (besides inputs)

MergeFn = Callable[..., jax.Array]


@jax.custom_vjp
def _einsum_merge(w_ge: jax.Array, experts_exy: jax.Array) -> jax.Array:
  out = jnp.einsum("ge,exy->gxy", w_ge, experts_exy, preferred_element_type=jnp.float32)
  return out.astype(experts_exy.dtype)


def _einsum_merge_fwd(w_ge, experts_exy):
  return _einsum_merge(w_ge, experts_exy), (w_ge, experts_exy)


def _einsum_merge_bwd(res, d_gxy):
  w_ge, experts_exy = res
  d_w = jnp.einsum("gxy,exy->ge", d_gxy, experts_exy, preferred_element_type=jnp.float32)
  d_experts = jnp.einsum("ge,gxy->exy", w_ge, d_gxy, preferred_element_type=jnp.float32)
  return d_w.astype(w_ge.dtype), d_experts.astype(experts_exy.dtype)


_einsum_merge.defvjp(_einsum_merge_fwd, _einsum_merge_bwd)


@MERGE.register("einsum")
def einsum_merge(w_ge: jax.Array, experts_exy: jax.Array, *, mlp_axis: int) -> jax.Array:
  """[G, E] x [E, X, Y] -> [G, X, Y] in the experts' dtype, float32 accumulation.

  A custom VJP (the same two einsums autodiff would write) keeps the merge opaque to remat
  policies: `dots_saveable`-style policies of the model's block remat would otherwise save the
  merged weights of every layer, which is exactly the memory this layer avoids.
  """
  del mlp_axis
  return _einsum_merge(w_ge.astype(jnp.float32), experts_exy)


@MERGE.register("pallas")
def pallas_merge(w_ge: jax.Array, experts_exy: jax.Array, *, mlp_axis: int) -> jax.Array:
  """The Pallas merge op, per device when a mesh is set (experts gathered over fsdp, F split)."""
  from pallas_kernels.merge import merge_experts

  w_ge = w_ge.astype(jnp.float32)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return merge_experts(w_ge, experts_exy)
  expert_axes = [None, None, None]
  expert_axes[1 + mlp_axis] = "mlp"
  shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
  w_spec = sharding.spec(("batch", None), w_ge.shape, shape)
  x_spec = sharding.spec(tuple(expert_axes), experts_exy.shape, shape)
  out_axes = [w_spec[0] if len(w_spec) else None, None, None]
  out_axes[1 + mlp_axis] = x_spec[1 + mlp_axis] if len(x_spec) > 1 + mlp_axis else None
  run = jax.shard_map(lambda w, x: merge_experts(w, x), in_specs=(w_spec, x_spec), out_specs=jax.sharding.PartitionSpec(*out_axes), check_vma=False)
  return run(w_ge, experts_exy)


MERGE.register("auto", einsum_merge)


def shard_merged(merged: ExpertWeights) -> ExpertWeights:
  """Merged weights of groups (or rows) [G, ...] sharded like the batch, D and F like the experts
  (an adapted merged weight: its merged base; its adapters stay as they are)."""
  on_base = lambda w, *axes: w.replace(base=shard(w.base, *axes)) if linear.is_adapted(w) else shard(w, *axes)
  return ExpertWeights(
      on_base(merged.w_gate, "batch", "embed", "mlp"),
      on_base(merged.w_up, "batch", "embed", "mlp"),
      on_base(merged.w_down, "batch", "mlp", "embed"),
  )


def merged_swiglu_groups(x_gtd: jax.Array, merged: ExpertWeights, *, token_axis: str | None = None) -> jax.Array:
  """y[g] = SwiGLU(x[g]) with group g's merged weights (compute dtype = x's dtype).

  `token_axis`: the logical sharding of the T axis of the hidden activation (None for the
  tokens of a group; "seq" when the groups are whole rows, as in generation).
  """
  gate = checkpoint_name(linear.project("gtd,gdf->gtf", x_gtd, merged.w_gate), SAVED[0])
  up = checkpoint_name(linear.project("gtd,gdf->gtf", x_gtd, merged.w_up), SAVED[1])
  h = shard(jax.nn.silu(gate) * up, "batch", token_axis, "mlp")
  return linear.project("gtf,gfd->gtd", h, merged.w_down)


def _chunk_body(merge: MergeFn):
  def body(x_gtd: jax.Array, w_ge: jax.Array, experts: ExpertWeights) -> jax.Array:
    return merged_swiglu_groups(x_gtd, shard_merged(experts.merge(w_ge, merge)))

  # Saved: the inputs and the two pre-activations; recomputed: the merge and silu(gate) * up.
  return jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names(*SAVED))


AUTO_STEPS = 4  # merge_chunk=0: the slots of a row go through the scan in this many steps


def auto_chunk(n_slots: int) -> int:
  """Slots per scan step: a quarter of the segments' merged weights are alive at once (the
  backward pass holds them and their gradient for one step), in few enough steps that the
  scan costs next to nothing."""
  return max(1, -(-n_slots // AUTO_STEPS))


def apply_merged(x_bgtd: jax.Array, w_bge: jax.Array, experts: ExpertWeights, *, merge: MergeFn, chunk: int) -> jax.Array:
  """SwiGLU of every group through its merged experts, `chunk` slots of every row per scan step.

  x_bgtd: [B, G, T, D] tokens of each group (compute dtype); w_bge: [B, G, E] float32 routing
  weights. The scan runs over the slot axis so every step keeps the batch sharding; slots left
  over when `chunk` does not divide G go through one more step of their own. The merged
  weights are recomputed in the backward pass, never saved.
  """
  b, g, t, d = x_bgtd.shape
  e = w_bge.shape[-1]
  body = _chunk_body(merge)

  def run(x_bctd, w_bce):
    c = x_bctd.shape[1]
    y = body(x_bctd.reshape(b * c, t, d), w_bce.reshape(b * c, e), experts)
    return y.reshape(b, c, t, d)

  n = g // chunk if 0 < chunk < g else 0
  if n <= 1:
    return run(x_bgtd, w_bge)
  head = n * chunk
  xs = jnp.moveaxis(x_bgtd[:, :head].reshape(b, n, chunk, t, d), 1, 0)
  ws = jnp.moveaxis(w_bge[:, :head].reshape(b, n, chunk, e), 1, 0)
  _, ys = jax.lax.scan(lambda carry, xw: (carry, run(*xw)), None, (xs, ws))
  y = jnp.moveaxis(ys, 0, 1).reshape(b, head, t, d)
  if head < g:
    y = jnp.concatenate([y, run(x_bgtd[:, head:], w_bge[:, head:])], axis=1)
  return y
