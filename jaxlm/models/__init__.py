"""Models assembled from `jaxlm.layers`: the decoder `Transformer`, sharded `build`, presets."""

from jaxlm.models.build import abstract_model, build, load_unrolled_into_scanned, param_counts
from jaxlm.models.transformer import Block, Transformer

__all__ = ["Block", "Transformer", "abstract_model", "build", "load_unrolled_into_scanned", "param_counts"]
