"""LoRA adapters in PEFT's format, against PEFT itself (jaxlm.interop.hf.adapters).

Tiny random transformers models (jaxlm.interop.hf.tiny) are the bases; in float32 on 128 tokens:
  - dense: jaxlm LoRA (scanned layers, rsLoRA, per-target ranks and alphas, random non-zero A
    and B) -> save_peft -> peft.PeftModel.from_pretrained gives jaxlm's logits; load_peft into a
    fresh import gives them too, with the same factors; dense DoRA likewise;
  - experts: LoRA on the routed experts (w_gate and w_up of different ranks) -> PEFT's
    target_parameters on the fused experts -> PEFT's logits, and back to the same factors;
  - an adapter PEFT made itself (random A and B on attention and on the fused experts, two nested
    expert wrappers, rsLoRA) loaded by load_peft gives PEFT's logits: scrambled experts fail it;
  - adapters on transformers 4's per-expert modules load as expert LoRA;
  - bad input: a factor of the wrong shape, a non-LoRA peft_type, ranks that disagree with the
    config, modules_to_save, a model with adapters already, DoRA on experts (export);
  - (slow) `jaxlm convert hf-export RUN DST --adapter` on a LoRA run: PEFT computes the run's model.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

peft_hf = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jaxlm import peft  # noqa: E402
from jaxlm.config import PeftConfig  # noqa: E402
from jaxlm.errors import ConfigError  # noqa: E402
from jaxlm.interop import hf  # noqa: E402
from jaxlm.interop.hf import adapters, tiny  # noqa: E402
from jaxlm.peft.lifecycle import adapted_modules  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(3, 256, 128)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """{model_type: HF directory} of the tiny bases, built once."""
  root = tmp_path_factory.mktemp("bases")
  for t in ("llama", "mixtral"):
    tiny.make(t, root / t)
  return {t: root / t for t in ("llama", "mixtral")}


def _logits(model) -> np.ndarray:
  forward = nnx.jit(lambda m, x: m(x)[0])
  return np.asarray(forward(model, jnp.asarray(TOKENS[None])))[0]


def _hf_model(base_dir):
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager").eval()


def _peft_logits(base_dir, adapter_dir) -> np.ndarray:
  return tiny.logits(peft_hf.PeftModel.from_pretrained(_hf_model(base_dir), str(adapter_dir)).eval(), TOKENS[None])[0]


def _randomise(model, seed: int = 1, std: float = 0.05) -> None:
  """Random non-zero A and B (and DoRA magnitudes near the weight norms), in place."""
  rng = np.random.default_rng(seed)
  for _, mod in adapted_modules(model):
    for name in ("a", "b", "magnitude"):
      var = getattr(mod, name)
      if var is not None:
        value = np.asarray(var[...])
        value = value * rng.uniform(0.8, 1.2, value.shape) if name == "magnitude" else rng.normal(0, std, value.shape)
        var.set_value(jnp.asarray(value, jnp.float32))


def _factors(model) -> dict[tuple, dict[str, np.ndarray]]:
  """A, s B (and DoRA's m) of every adapter by unrolled path: the scale goes with B, as an export
  of w_gate and w_up at different scales carries it (PEFT's gate_up_proj adapter has one scaling)."""
  out = {}
  for path, f in adapters.lora_factors(model).items():
    out[path] = {"a": np.array(f.a), "b": f.b * f.scale} | ({} if f.magnitude is None else {"magnitude": f.magnitude})
  return out


def _assert_same_factors(got, want):
  assert sorted(got) == sorted(want)
  for path in want:
    for name in want[path]:
      np.testing.assert_allclose(got[path][name], want[path][name], rtol=1e-6, atol=1e-7, err_msg=f"{path}/{name}")


def _round_trip(base_dir, cfg: PeftConfig, tmp_path, *, scan: bool = False):
  """jaxlm LoRA -> save_peft -> PEFT's logits; -> load_peft -> the same factors and logits.
  `scan`: the exported model scans its layers (the adapters are split per layer)."""
  model_cfg = dataclasses.replace(hf.model_config(base_dir), scan_layers=scan)
  model = peft.apply(hf.load_model(base_dir, cfg=model_cfg, show_progress=False), cfg)
  _randomise(model)
  want = _factors(model)
  ours = _logits(model)
  plain = tiny.logits(_hf_model(base_dir), TOKENS[None])[0]
  assert np.abs(ours - plain).max() > 100 * TOL  # the adapter changes the outputs
  adapters.save_peft(model, tmp_path / "adapter", cfg=cfg)
  conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  theirs = _peft_logits(base_dir, tmp_path / "adapter")
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=TOL)
  back = adapters.load_peft(hf.load_model(base_dir, show_progress=False), tmp_path / "adapter")
  _assert_same_factors(_factors(back), want)
  np.testing.assert_allclose(_logits(back), ours, rtol=0, atol=TOL)
  return conf


def test_dense_lora_round_trip(bases, tmp_path):
  cfg = PeftConfig(method="lora", rank=4, alpha=8.0, rslora=True, rank_pattern={r".*attn/w_o": 2}, alpha_pattern={r".*ffn/w_down": 3.0})
  conf = _round_trip(bases["llama"], cfg, tmp_path, scan=True)
  assert sorted(conf["target_modules"]) == sorted(f"{m}_proj" for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "mlp.gate", "mlp.up", "mlp.down"))
  assert conf["use_rslora"] and conf["r"] == 4 and conf["lora_alpha"] == 8.0
  assert conf["rank_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 2 for i in range(2)}
  assert conf["alpha_pattern"] == {f"model.layers.{i}.mlp.down_proj": 3.0 for i in range(2)}


def test_dense_dora_round_trip(bases, tmp_path):
  cfg = PeftConfig(method="dora", targets=(r"blocks/1/attn/w_(q|o)",), rank=2, alpha=4.0)
  conf = _round_trip(bases["llama"], cfg, tmp_path)
  assert conf["use_dora"] and sorted(conf["target_modules"]) == ["model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.q_proj"]


def test_expert_lora_round_trip(bases, tmp_path):
  """w_gate rank 2 (scale 2) and w_up rank 3 (scale 4/3) become one gate_up_proj adapter of rank 5
  (B block-diagonal, the up block carrying the ratio of the scales)."""
  cfg = PeftConfig(method="lora", targets=(r".*experts/w_(gate|up|down)", r".*attn/w_v"), rank=2, alpha=4.0, rank_pattern={r".*w_up": 3})
  conf = _round_trip(bases["mixtral"], cfg, tmp_path)
  assert conf["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] and conf["target_modules"] == ["self_attn.v_proj"]
  assert conf["rank_pattern"] == {f"model.layers.{i}.mlp.experts.gate_up_proj": 5 for i in range(2)}


def test_peft_made_adapter(bases, tmp_path):
  """PEFT's own random adapter: attention modules and both fused expert parameters (nested
  wrappers), one expert rank from rank_pattern, rsLoRA; load_peft reproduces PEFT's logits."""
  base = _hf_model(bases["mixtral"])
  conf = peft_hf.LoraConfig(
      r=2,
      lora_alpha=3,
      use_rslora=True,
      target_modules=["q_proj", "o_proj"],
      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
      rank_pattern={"model.layers.1.mlp.experts.down_proj": 3},
      alpha_pattern={"o_proj": 5},
      init_lora_weights=False,  # random A and B
  )
  model = peft_hf.get_peft_model(base, conf)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.mul_(0.3)
  model.save_pretrained(str(tmp_path / "adapter"))
  theirs = tiny.logits(model.eval(), TOKENS[None])[0]
  plain = _logits(hf.load_model(bases["mixtral"], show_progress=False))
  assert np.abs(theirs - plain).max() > 100 * TOL
  ours = adapters.load_peft(hf.load_model(bases["mixtral"], show_progress=False), tmp_path / "adapter")
  np.testing.assert_allclose(_logits(ours), theirs, rtol=0, atol=TOL)
  # the experts' factors are PEFT's delta (get_delta_weight), expert by expert
  wrapper = model.base_model.model.model.layers[1].mlp.experts  # down_proj (outermost)
  delta = wrapper.get_delta_weight("default").detach().numpy()  # [E, D, F]
  lora = ours.blocks[1].ffn.experts.w_down
  mine = np.einsum("efr,erd->edf", np.asarray(lora.a[...]), np.asarray(lora.b[...])) * lora.scales[0]
  np.testing.assert_allclose(mine, delta, rtol=0, atol=1e-6)


def test_legacy_expert_modules(bases, tmp_path):
  """Adapters on transformers 4's per-expert modules (block_sparse_moe.experts.{j}.w1/w3/w2) load
  as expert LoRA; an expert the adapter leaves out gets zero factors."""
  from safetensors.numpy import save_file

  cfg = PeftConfig(method="lora", targets=(r".*experts/w_(gate|up|down)",), rank=2, alpha=4.0)
  model = peft.apply(hf.load_model(bases["mixtral"], show_progress=False), cfg)
  _randomise(model)
  want = _factors(model)
  tensors = {}
  for path, f in adapters.lora_factors(model).items():
    name = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}[path[-1]]
    for j in range(3):  # expert 3 has no adapter
      module = f"base_model.model.model.layers.{path[1]}.block_sparse_moe.experts.{j}.{name}"
      tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(f.a[j].T), np.ascontiguousarray(f.b[j].T)
  (tmp_path / "legacy").mkdir()
  save_file(tensors, str(tmp_path / "legacy" / "adapter_model.safetensors"))
  (tmp_path / "legacy" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["w1", "w2", "w3"]}))
  got = _factors(adapters.load_peft(hf.load_model(bases["mixtral"], show_progress=False), tmp_path / "legacy"))
  for path in want:
    for name in ("a", "b"):
      want[path][name][3] = 0
  _assert_same_factors(got, want)


def test_bad_input(bases, tmp_path):
  model = peft.apply(hf.load_model(bases["llama"], show_progress=False), PeftConfig(method="lora", targets=(r".*attn/w_q",), rank=2))
  _randomise(model)
  adapters.save_peft(model, tmp_path / "ok")
  conf = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())

  def bad(name, edit_conf=None, edit_tensors=None):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({**conf, **(edit_conf or {})}))
    tensors = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    save_file((edit_tensors or (lambda t: t))(tensors), str(d / "adapter_model.safetensors"))
    return d

  def wider(t):
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    return {**t, k: np.zeros((2, 65), np.float32)}

  plain = lambda: hf.load_model(bases["llama"], show_progress=False)
  with pytest.raises(ConfigError, match=r"q_proj has lora_A \[2, 65\], lora_B \[64, 2\], but this model's blocks/0/attn/w_q needs \[2, 64\], \[64, 2\]"):
    adapters.load_peft(plain(), bad("wide", edit_tensors=wider))
  with pytest.raises(ConfigError, match="peft_type 'IA3' is not LORA"):
    adapters.load_peft(plain(), bad("ia3", {"peft_type": "IA3"}))
  with pytest.raises(ConfigError, match="rank 2 in adapter_model.safetensors but 4 in adapter_config.json"):
    adapters.load_peft(plain(), bad("rank", {"r": 4}))
  with pytest.raises(ConfigError, match="modules_to_save"):
    adapters.load_peft(plain(), bad("save", {"modules_to_save": ["lm_head"]}))
  with pytest.raises(ConfigError, match="holds adapters already"):
    adapters.load_peft(model, tmp_path / "ok")
  moe_dora = peft.apply(hf.load_model(bases["mixtral"], show_progress=False), PeftConfig(method="dora", targets=(r".*experts/w_down",), rank=2))
  with pytest.raises(ConfigError, match="DoRA on routed experts"):
    adapters.save_peft(moe_dora, tmp_path / "dora")


@pytest.mark.slow
def test_cli_exports_a_lora_run_as_a_peft_adapter(tmp_path, capsys):
  """finetune_hf_lora:smoke (LoRA on every linear weight of a tiny Llama) -> `jaxlm convert
  hf-export RUN DST --adapter` -> PEFT on the HF base computes the run's model."""
  from jaxlm.cli import main
  from jaxlm.train.run import load_for_inference

  src, run = tmp_path / "hf", tmp_path / "lora"
  ids = tiny.tokenizer(src)
  tiny.make("llama", src, vocab_size=384, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
  assert main(["train", "experiments/finetune_hf_lora.py:smoke", "--run-dir", str(run), "--set", f"init_from={src}"]) == 0
  assert main(["convert", "hf-export", str(run), str(tmp_path / "adapter"), "--adapter"]) == 0
  assert "as a PEFT adapter" in capsys.readouterr().out
  conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert (conf["r"], conf["lora_alpha"], conf["base_model_name_or_path"]) == (4, 8.0, str(src))
  _, model, _, _ = load_for_inference(run)
  np.testing.assert_allclose(_peft_logits(src, tmp_path / "adapter"), _logits(model), rtol=0, atol=TOL)
  assert main(["convert", "hf-export", str(run), str(tmp_path / "adapter"), "--adapter"]) == 2  # never overwrites
