"""`jaxlm train|eval|generate|inspect|convert|merge`: parse, load the experiment, call into the library.

Bad input (an unknown key, a bad value, a mesh that does not fit, a missing file) is printed
as one line `jaxlm: error: ...` with exit code 2, before anything is written. A run that cannot
go on (a non-finite loss with train.nonfinite=stop) is one such line too, with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxlm.errors import ConfigError, TrainingError


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, exit 2 (argparse prints usage as well by default)
    raise ConfigError(f"{self.prog}: {message}")


def _add_multihost(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("several hosts (GPU clusters; TPU pods are detected automatically)")
  g.add_argument("--coordinator-address", help="HOST:PORT of process 0 (env JAXLM_COORDINATOR_ADDRESS)")
  g.add_argument("--num-processes", type=int, help="number of processes (env JAXLM_NUM_PROCESSES)")
  g.add_argument("--process-id", type=int, help="this process's index (env JAXLM_PROCESS_ID)")


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog="jaxlm", description="Train, evaluate, sample and inspect jaxlm language models.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  t = sub.add_parser("train", help="train an experiment (resumes from the run directory's latest checkpoint)")
  t.add_argument("experiment", help="experiment file (path.py[:variant]) or registered name, e.g. quickstart")
  t.add_argument("--run-dir", help="run directory (default: runs/<experiment name>)")
  t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. model.n_layers=2")
  _add_multihost(t)

  e = sub.add_parser("eval", help="evaluate a run's latest checkpoint on the validation splits")
  e.add_argument("run_dir")
  e.add_argument("--batches", type=int, default=None, help="batches per source (default: train.eval_batches)")

  g = sub.add_parser("generate", help="sample continuations of prompts from a trained run")
  g.add_argument("run_dir")
  g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several, decoded in one batch)")
  g.add_argument("--max-new-tokens", type=int, default=128)
  g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  g.add_argument("--top-k", type=int, default=0)
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")

  i = sub.add_parser("inspect", help="parameters, FLOPs, memory per device and sharding of an experiment")
  i.add_argument("experiment")
  i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  i.add_argument("--devices", type=int, default=None, help="lay out on this many devices (default: the topology's, else mesh.devices, else those present)")
  i.add_argument("--json", action="store_true", help="print the report as JSON")
  i.add_argument("--topology", help="also compile the train step for this TPU topology, e.g. v5p:4x4x2 (needs libtpu)")

  c = sub.add_parser("convert", help="turn a run into the start of another kind of model, or to and from Hugging Face checkpoints")
  conv = c.add_subparsers(dest="conversion", required=True, parser_class=_Parser)
  u = conv.add_parser("upcycle", help="start an MoE run from a dense run: every expert a copy of its layer's MLP, fresh routers")
  u.add_argument("dense_run", help="run directory of the trained dense model")
  u.add_argument("experiment", help="the MoE experiment (file or registered name) the new run trains")
  u.add_argument("--run-dir", required=True, help="new run directory, written at step 0; continue with `jaxlm train EXPERIMENT --run-dir`")
  u.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  u.add_argument("--step", type=int, default=None, help="dense checkpoint step (default: latest)")
  em = conv.add_parser("emoe", help="start an MoE run from a dense run by EMoE: each FFN split into experts by clustering its keys, routed by their mean keys")
  em.add_argument("dense_run", help="run directory (or Hugging Face model directory) of the trained dense model")
  em.add_argument("experiment", help="the MoE experiment the new run trains (model.moe.d_ff_expert = d_ff / n_experts)")
  em.add_argument("--run-dir", required=True, help="new run directory, written at step 0; continue with `jaxlm train EXPERIMENT --run-dir`")
  em.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  em.add_argument("--step", type=int, default=None, help="dense checkpoint step (default: latest)")
  em.add_argument("--seed", type=int, default=0, help="seed of the balanced k-means")
  gr = conv.add_parser("grow", help="start a larger run from a trained smaller one by model growth (Du et al. 2024): G_stack and the paper's other operators")
  gr.add_argument("run_dir", help="run directory of the trained smaller model")
  gr.add_argument("dst", help="new run directory: the source's experiment with the grown model, at step 0")
  gr.add_argument("--factor", type=int, required=True, help="growth factor g: n_layers (or d_ff, d_model) times g")
  gr.add_argument("--operator", default="stack", help="stack (G_stack, default), zero, random (depth); split_ffn, split_model (width)")
  gr.add_argument("--split-noise", type=float, default=0.1, help="width operators: spread of the split shares around 1/g (0: equal shares)")
  gr.add_argument("--step", type=int, default=None, help="source checkpoint step (default: latest)")
  gr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="settings of the new run, e.g. train.steps=400")
  hi = conv.add_parser("hf-import", help="a Hugging Face model directory (config.json + safetensors) as a jaxlm run at step 0")
  hi.add_argument("src", help="HF model directory: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe or olmoe")
  hi.add_argument("dst", help="new run directory")
  hi.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="run settings, e.g. model.dtype=bfloat16")
  he = conv.add_parser("hf-export", help="a run's model (adapters merged) as a Hugging Face model directory")
  he.add_argument("run_dir")
  he.add_argument("dst", help="new directory (config.json + safetensors shards)")
  he.add_argument("--model-type", default=None, help="HF family to write (default: the first that holds the model)")
  he.add_argument("--fused-experts", action="store_true", help="experts as fused gate_up_proj / down_proj (transformers 5) instead of per-expert names")
  he.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weight dtype (default: the model's param_dtype)")
  he.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  he.add_argument("--adapter", action="store_true", help="a LoRA run's adapters alone, not merged, as a PEFT adapter (adapter_config.json + adapter_model.safetensors)")

  m = sub.add_parser("merge", help="merge a run's adapters into its base, or several fine-tuned runs into one model")
  m.add_argument("runs", nargs="+", help="run directories (adapter runs or full fine-tunes of one base model)")
  m.add_argument("--out", required=True, help="new directory: a run at step 0 (or, with --method cat, a saved adapter)")
  m.add_argument("--method", default="linear", help="linear (task arithmetic), ties, dare, dare_ties, or cat (LoRA adapters concatenated: exact)")
  m.add_argument("--weights", type=_floats, default=None, help="comma-separated weight per run (default: 1 each; cat: 1/n each)")
  m.add_argument("--density", type=float, default=0.2, help="ties / dare_ties: fraction of each task vector kept")
  m.add_argument("--drop", type=float, default=0.9, help="dare: drop probability (kept entries rescaled by 1/(1-drop))")
  m.add_argument("--base", default=None, help="the runs' common base run (default: their shared init_from)")
  m.add_argument("--seed", type=int, default=0, help="dare: randomness of the drops")
  return p


def _floats(text: str) -> list[float]:
  try:
    return [float(x) for x in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _train(args) -> int:
  from jaxlm import distributed, experiments

  exp = experiments.load(args.experiment, args.overrides)
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  from jaxlm.train.loop import train

  run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / exp.name
  train(exp, run_dir)
  return 0


def _eval(args) -> int:
  from jaxlm.train import loop
  from jaxlm.train.checkpoint import Checkpointer
  from jaxlm.train.run import CHECKPOINTS, INIT_FILE, PEFT_INPUTS_FILE, load_config, read_record, tokenizer_for

  run_dir = Path(args.run_dir)
  exp = load_config(run_dir)
  ckpt = Checkpointer(run_dir / CHECKPOINTS, exp.checkpoint, read_only=True)
  step = ckpt.latest_step()
  if step is None:
    raise ConfigError(f"{run_dir} has no checkpoints yet")
  setup = loop.prepare(exp, init=read_record(run_dir, INIT_FILE), peft_inputs=read_record(run_dir, PEFT_INPUTS_FILE))
  restored = ckpt.restore(step, params=setup.state.params, rest=setup.state.rest, opt_state=None, data_iterator=None)
  state = setup.state.replace(params=restored["params"], rest=restored.get("rest", setup.state.rest))
  tokenizer = tokenizer_for(exp, run_dir, train_if_missing=False)
  rec = loop.evaluate(setup, state, loop.datasets(exp, tokenizer, "validation", per_source=True), args.batches or exp.train.eval_batches)
  print(json.dumps({"step": step, **{k: float(v) for k, v in rec.items() if not k.startswith("eval_metrics/")}}, indent=2))
  return 0


def _generate(args) -> int:
  from jaxlm.generate import SamplingConfig, generate_text
  from jaxlm.train.run import load_for_inference

  cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  exp, model, tokenizer, step = load_for_inference(Path(args.run_dir), step=args.step)
  texts = generate_text(model, tokenizer, args.prompt, cfg, add_bos=exp.data.add_bos)
  for prompt, text in zip(args.prompt, texts):
    print(f"--- {exp.name} step {step}, prompt {prompt!r}")
    print(prompt + text)
  return 0


def _inspect(args) -> int:
  from jaxlm import experiments
  from jaxlm.report import format_report, report

  exp = experiments.load(args.experiment, args.overrides)
  if not args.topology:
    r = report(exp, args.devices)
  else:
    from jaxlm.train import aot

    devices = aot.topology_devices(args.topology)
    if args.devices not in (None, len(devices)):
      raise ConfigError(f"--devices {args.devices} disagrees with --topology {args.topology} ({len(devices)} devices)")
    r = report(exp, len(devices))  # the estimate and the compiled figures describe one mesh
    r["compiled"] = {"topology": args.topology, "devices": len(devices), "device_kind": devices[0].device_kind, **aot.summary(aot.compile_train_step(exp, devices))}
  if args.json:
    print(json.dumps({k: v for k, v in r.items()}, indent=2, default=str))
  else:
    print(format_report(exp, r))
  return 0


def _convert(args) -> int:
  if args.conversion == "grow":
    from jaxlm import experiments
    from jaxlm.models.grow import grow_run

    info = grow_run(Path(args.run_dir), Path(args.dst), operator=args.operator, factor=args.factor, step=args.step, overrides=tuple(args.overrides), split_noise=args.split_noise)
    same = "computes the source model's function" if info["function_preserving"] else "does not compute the source's function (it is not meant to)"
    src_layers, dst_layers = info["n_layers"]
    print(f"grew {info['source']} (step {info['source_step']}, {src_layers} layers) by {info['paper']} x{info['factor']} into {info['run_dir']} at step 0 ({dst_layers} layers); it {same}")
    name = info["source_name"] if info["source_name"] in experiments.known_names() else "<the source's experiment>"
    print(f"continue with: jaxlm train {name} --run-dir {info['run_dir']}" + "".join(f" --set {o}" for o in info["overrides"]))
    return 0
  if args.conversion == "hf-import":
    from jaxlm.interop.hf.runs import import_run

    info = import_run(args.src, args.dst, args.overrides)
    print(f"imported {info['model_type']} from {info['src']} into {info['run_dir']} at step 0 (tokenizer: {info['tokenizer']})")
    return 0
  if args.conversion == "hf-export":
    from jaxlm.interop.hf.runs import export_run

    if args.adapter:
      from jaxlm.interop.hf.adapters import export_adapter_run

      if args.fused_experts or args.dtype:
        raise ConfigError("hf-export --adapter writes float32 PEFT adapters (experts always fused); drop --fused-experts / --dtype")
      info = export_adapter_run(args.run_dir, args.dst, model_type=args.model_type, step=args.step)
      print(f"exported the adapters of {info['run_dir']} (step {info['step']}) for {info['model_type']} as a PEFT adapter to {info['out']}")
      return 0
    info = export_run(args.run_dir, args.dst, model_type=args.model_type, fused_experts=args.fused_experts, dtype=args.dtype, step=args.step)
    note = "" if info["tokenizer"] == "hf" else f" (the run's {info['tokenizer']} tokenizer has no tokenizer.json; none was written)"
    print(f"exported {info['run_dir']} (step {info['step']}) as {info['model_type']} to {info['out']}{note}")
    return 0
  from jaxlm import experiments

  exp = experiments.load(args.experiment, args.overrides)
  if args.conversion == "emoe":
    from jaxlm.models.emoe import emoe_run

    info = emoe_run(Path(args.dense_run), exp, Path(args.run_dir), step=args.step, seed=args.seed)
    same = "computes the dense model's function" if info["function_preserved"] else "uses a fraction of the dense FFN per token"
    print(f"split {info['dense_run']} (step {info['dense_step']}) by EMoE into {info['run_dir']} at step 0: top-{info['top_k']} of {info['n_experts']} experts, it {same}")
    print(f"continue with: jaxlm train {args.experiment} --run-dir {info['run_dir']}" + "".join(f" --set {o}" for o in args.overrides))
    return 0
  from jaxlm.models.upcycle import upcycle_run

  info = upcycle_run(Path(args.dense_run), exp, Path(args.run_dir), step=args.step)
  same = "computes the dense model's function" if info["function_preserved"] else "does NOT reproduce the dense function (weights need not sum to 1)"
  print(f"upcycled {info['dense_run']} (step {info['dense_step']}) into {info['run_dir']} at step 0; it {same}")
  print(f"continue with: jaxlm train {args.experiment} --run-dir {info['run_dir']}" + "".join(f" --set {o}" for o in args.overrides))
  return 0


def _merge(args) -> int:
  from jaxlm.peft.runs import merge_runs

  info = merge_runs(args.runs, args.out, method=args.method, weights=args.weights, density=args.density, drop=args.drop, base=args.base, seed=args.seed)
  what = "adapter" if info["method"] == "cat" else "run at step 0"
  print(f"merged {len(info['sources'])} run(s) with {info['method']}" + (f" onto {info['base']}" if info["base"] else "") + f" -> {what} {info['out']}")
  return 0


def main(argv: list[str] | None = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import absl.logging

  absl.logging.set_verbosity(absl.logging.ERROR)  # orbax and tfds are chatty at WARNING
  try:
    args = parser().parse_args(argv)
    return {"train": _train, "eval": _eval, "generate": _generate, "inspect": _inspect, "convert": _convert, "merge": _merge}[args.command](args)
  except ConfigError as e:
    print(f"jaxlm: error: {e}", file=sys.stderr)
    return 2
  except TrainingError as e:
    print(f"jaxlm: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jaxlm: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
