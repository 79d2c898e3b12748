"""Adapters that add computation around a sublayer instead of changing a weight (placeholder)."""

from flax import nnx


class Wrapper(nnx.Module):
  """Base of the wrappers (prompt tuning, bottleneck adapters): not mergeable."""
