"""Shared by the PEFT tests: every base model is built once per config and handed out as fresh
copies (building a model eagerly costs seconds of small compiles; copies cost nothing)."""

import functools

import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.models import Transformer


@functools.lru_cache(maxsize=None)
def _built(cfg: ModelConfig, seed: int):
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))


def fresh_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A new Transformer(cfg, rngs=nnx.Rngs(seed)) with its own variables (PEFT edits it in place)."""
  graphdef, state = _built(cfg, seed)
  return nnx.merge(graphdef, state, copy=True)


@pytest.fixture(scope="session")
def model_of():
  return fresh_model
