"""Configs: typed overrides, one-line errors naming the field, JSON round trip, mesh sizes."""

import dataclasses

import pytest

from jaxlm import experiments
from jaxlm.config import Experiment, MeshConfig, ModelConfig, from_dict, to_dict
from jaxlm.errors import ConfigError


def test_overrides_are_parsed_by_field_type():
  exp = experiments.apply_overrides(
      Experiment(),
      [
          "model.n_layers=2",
          "optim.lr=1e-4",
          "model.tie_embeddings=false",
          "model.dtype=float32",
          "data.mixture={'stdlib_code': 1.0}",
          "train.sample_prompts=('a', 'b')",
          "mesh.rules=[('batch', ('data',))]",
          "model.moe.top_k=1",
      ],
  )
  assert exp.model.n_layers == 2 and isinstance(exp.model.n_layers, int)
  assert exp.optim.lr == 1e-4
  assert exp.model.tie_embeddings is False
  assert exp.data.mixture == {"stdlib_code": 1.0}
  assert exp.train.sample_prompts == ("a", "b")
  assert exp.mesh.rules == (("batch", ("data",)),)
  assert exp.model.moe.top_k == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layerz=2", "unknown config key 'model.n_layerz': model has"),
        ("modle.n_layers=2", "unknown config key 'modle.n_layers'"),
        ("model.n_layers=two", "bad value for model.n_layers: expected an integer"),
        ("model.tie_embeddings=maybe", "expected true or false"),
        ("model.n_layers", "expected key=value"),
        ("model=3", "model is a section"),
        ("model.n_kv_heads=3", "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
        ("data.mixture=[1, 2]", "expected a mapping"),
        ("mesh.fsdp=0", "mesh: axis sizes must be >= 1 or -1"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
  with pytest.raises(ConfigError) as e:
    experiments.apply_overrides(Experiment(), [override])
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_override_order_does_not_matter():
  # Each alone would fail validation against the other's old value; together they are fine.
  a = ["data.tokenizer=sentencepiece", "data.sp_vocab_size=1024", "model.vocab_size=1024"]
  exp = experiments.apply_overrides(Experiment(), a)
  assert exp == experiments.apply_overrides(Experiment(), a[::-1])
  assert exp.model.vocab_size == exp.data.sp_vocab_size == 1024
  exp = experiments.apply_overrides(Experiment(), ["model.n_heads=8", "model.n_kv_heads=8", "model.d_model=512"])
  assert (exp.model.n_heads, exp.model.n_kv_heads) == (8, 8)


def test_round_trip_through_json_dict():
  exp = experiments.load("quickstart", ["mesh.rules=[('batch', ('data', 'fsdp'))]"])
  assert from_dict(Experiment, to_dict(exp)) == exp


def test_mesh_sizes():
  assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
  assert MeshConfig(fsdp=-1, dcn_data=2).shape(16) == {"data": 2, "fsdp": 8, "expert": 1, "tensor": 1}
  with pytest.raises(ConfigError, match="there are 8 devices"):
    MeshConfig(data=3, fsdp=1).shape(8)
  with pytest.raises(ConfigError, match="not divisible"):
    MeshConfig(data=3, fsdp=-1).shape(8)


def test_ffn_pattern():
  cfg = ModelConfig(n_layers=6, ffn="moe", first_k_dense=1, ffn_every=2)
  assert cfg.ffn_kinds == ("dense", "moe", "dense", "moe", "dense", "moe")
  with pytest.raises(ConfigError, match="scan_layers"):
    dataclasses.replace(cfg, n_layers=6, first_k_dense=0, ffn_every=4, scan_layers=True)


def test_experiment_files_resolve_by_name_and_path(tmp_path):
  assert experiments.load("quickstart").name == "quickstart"
  assert experiments.load("experiments/quickstart.py:smoke").name == "quickstart_smoke"
  with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
    experiments.load("nope")
  with pytest.raises(ConfigError, match="experiment file not found"):
    experiments.load(str(tmp_path / "missing.py"))
  with pytest.raises(ConfigError, match="has no function 'nosuch'"):
    experiments.load("quickstart:nosuch")
