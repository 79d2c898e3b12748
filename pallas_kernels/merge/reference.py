"""Expert merging for soft-merged MoE (SMEAR, Lory) in plain jnp: the specification.

Letters: S segments, E experts, D embed, F mlp (any [E,D,F] stacked parameter works: w_gate,
w_up, or w_down read as [E,F,D]), L tokens per segment.

* merge_experts: merged[s] = sum_e weights[s,e] * experts[e]      [S,E] x [E,D,F] -> [S,D,F]
* merged_matmul: y[s] = x[s] @ merged[s]                 [S,L,D] x [S,E] x [E,D,F] -> [S,L,F]

Products accumulate in float32 (the weights are used in float32 whatever their dtype); the
merged parameters are rounded to the experts' dtype, as if materialised, and merged_matmul
returns the dtype of x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_experts_reference(weights_se: jax.Array, experts_edf: jax.Array) -> jax.Array:
  """merged[s] = sum_e weights[s,e] * experts[e]; [S,E] x [E,D,F] -> [S,D,F] experts dtype."""
  merged = jnp.einsum(
      "se,edf->sdf",
      weights_se.astype(jnp.float32),
      experts_edf.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
  )
  return merged.astype(experts_edf.dtype)


def merged_matmul_reference(
    x_sld: jax.Array, weights_se: jax.Array, experts_edf: jax.Array
) -> jax.Array:
  """y[s] = x[s] @ merge(weights, experts)[s]; [S,L,D] x [S,E] x [E,D,F] -> [S,L,F] x dtype."""
  merged = merge_experts_reference(weights_se, experts_edf)
  y = jnp.einsum("sld,sdf->slf", x_sld, merged, preferred_element_type=jnp.float32)
  return y.astype(x_sld.dtype)
