"""The merge's small matmul at float32 accuracy, for either kernel backend.

Merge weights are float32 (router softmax outputs); the experts are often bfloat16. Rounding
the weights to bfloat16 to feed a 16-bit matmul unit would cost ~3 significant digits. Instead
the weights are split into a high and a low 16-bit part, hi + lo == w to ~16 mantissa bits, and
multiplied in two native 16-bit passes with float32 accumulation (products of two 16-bit
values are exact in float32). float32 experts use a full-precision float32 matmul. Works
inside Mosaic TPU and Triton kernels alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_sum(w_ae: jax.Array, x_en: jax.Array) -> jax.Array:
  """[A,E] float32 weights x [E,N] parameters (16- or 32-bit) -> [A,N] float32."""
  if x_en.dtype.itemsize == 2:
    hi = w_ae.astype(x_en.dtype)
    lo = (w_ae - hi.astype(jnp.float32)).astype(x_en.dtype)
    return jnp.dot(hi, x_en, preferred_element_type=jnp.float32) + jnp.dot(
        lo, x_en, preferred_element_type=jnp.float32
    )
  return jnp.dot(
      w_ae, x_en.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
  )
