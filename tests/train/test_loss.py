"""The chunked loss: the same sums and gradients as the whole logits, without ever holding them."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import sharding
from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.models import Transformer
from jaxlm.train.loss import chunked_token_losses, rows_per_device, token_losses

B, L, D, V = 2, 13, 16, 97


@functools.cache
def model_and_batch(tie: bool):
  """A Transformer's graph and random parameters (numpy: nothing to compile), final hidden
  states [B, L, D], targets and a mask."""
  cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, dtype="float32", tie_embeddings=tie)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.5, a.shape), a.dtype), abstract)
  x = jnp.asarray(rng.normal(0.0, 1.0, (B, L, D)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  mask = np.ones((B, L), np.int32)
  mask[0, -4:] = 0  # padding at the end of a row
  mask[1, :3] = 0  # and positions without a target at the start
  return graphdef, state, x, targets, jnp.asarray(mask)


def compiled_grad(tie, chunk):
  """Gradient of (ce + 0.1 z) / n with respect to the parameters and the hidden states, (ce, z,
  n), and the compiled gradient's HLO text: from the whole logits (chunk None) or in chunks."""
  graphdef, state, x, targets, mask = model_and_batch(tie)

  def loss(state, x_bld):
    model = nnx.merge(graphdef, state)
    x_bld, head = model.final_norm(x_bld), model.head_fn()
    if chunk is None:
      ce, z, n = token_losses(head(x_bld), targets, mask)
    else:
      ce, z, n = chunked_token_losses(head, x_bld, targets, mask, chunk=chunk)
    return (ce + 0.1 * z) / n, (ce, z, n)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)).lower(state, x).compile()
  return compiled(state, x), compiled.as_text()


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_and_gradients_equal_the_whole_logits(tie):
  """Chunks of 10 tokens: 5 positions of the 2 rows, 3 chunks of 13 positions with 2 padded;
  rows with masked positions."""
  (g_whole, (ce0, z0, n0)), hlo_whole = compiled_grad(tie, None)
  (g_chunk, (ce1, z1, n1)), hlo_chunk = compiled_grad(tie, 10)
  np.testing.assert_allclose([ce1, z1], [ce0, z0], rtol=1e-5)
  assert float(n1) == float(n0) == float(model_and_batch(tie)[-1].sum()) == 19
  head = [("embed", "w_vd") if tie else ("lm_head",), ("final_norm", "scale")]
  for path in head + [("x",)]:  # the head's weights, the final norm's scale, the hidden states
    a, b = (g[1] if path == ("x",) else functools.reduce(lambda t, k: t[k], path, nnx.to_pure_dict(g[0])) for g in (g_whole, g_chunk))
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))
  # No float32 [B, L, V] array in the compiled chunked gradient, only [B, C, V] chunks.
  shapes = lambda hlo: set(re.findall(rf"f32\[\d+,\d+,{V}\]", hlo))
  assert f"f32[{B},{L},{V}]" in shapes(hlo_whole)
  assert f"f32[{B},{L},{V}]" not in shapes(hlo_chunk) and f"f32[{B},5,{V}]" in shapes(hlo_chunk)


def test_chunks_on_a_mesh_equal_the_whole_logits_on_one_device():
  """Batch split over data x fsdp (2 rows per device), vocab over tensor: chunks of 8 tokens
  per device are 4 positions of each row."""
  graphdef, state, _, _, _ = model_and_batch(False)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(0.0, 1.0, (8, L, D)), jnp.float32)
  targets, mask = jnp.asarray(rng.integers(0, V, (8, L)), jnp.int32), jnp.asarray(rng.integers(0, 2, (8, L)), jnp.int32)

  def loss(state, x_bld, chunk):
    model = nnx.merge(graphdef, state)
    ce, z, n = chunked_token_losses(model.head_fn(), model.final_norm(x_bld), targets, mask, chunk=chunk)
    return (ce + 0.1 * z) / n

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  want_loss, want = grad(state, x, 0)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):
    assert rows_per_device(8) == 2
    on_mesh = jax.device_put(state, sharding.state_shardings(state, mesh))
    got_loss, got = grad(on_mesh, jax.device_put(x, sharding.batch_sharding(mesh, 3)), 8)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
