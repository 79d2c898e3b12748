"""jaxlm: language models and mixtures of experts in JAX/Flax NNX."""
