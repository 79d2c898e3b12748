"""The training loop, in one place: set up, (resume,) step, evaluate, checkpoint, report.

Everything the user can get wrong (mesh vs devices, batch vs mesh, sources, a run directory
holding a different run) is checked before anything is written. The step is compiled once,
ahead of time, with explicit shardings and the state donated; the loop dispatches step N+1
before it reads step N's metrics, so the host never stalls the device.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import sharding
from jaxlm.config import Experiment, to_dict
from jaxlm.data import hosts, mixture, pipeline, sources
from jaxlm.errors import ConfigError, TrainingError
from jaxlm import peft
from jaxlm.layers import FFN
from jaxlm.train import flops, hooks, optimizer, plots
from jaxlm.train.checkpoint import Checkpointer, restore_target
from jaxlm.train.preemption import Preemption, signal_at
from jaxlm.train.metrics import MetricsWriter
from jaxlm.data import tokenizers
from jaxlm.train.run import CHECKPOINTS, CONFIG_FILE, INIT_FILE, PEFT_INPUTS_FILE, check_resumable, initial_model, load_config, read_record, record, resolve_init, save_config, tokenizer_for
from jaxlm.train.guard import SkipReport, all_finite
from jaxlm.train.step import JittedStep, TrainState, guarded_optimizer, make_eval_step, make_train_step, split_model, state_shardings


@dataclasses.dataclass
class Setup:
  """What `prepare` builds: everything the loop, tests and benchmarks need."""

  exp: Experiment
  mesh: jax.sharding.Mesh
  rules: dict
  graphdef: Any
  state: TrainState
  shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  train_step: JittedStep  # jitted (not yet compiled) train step: donates the state but its frozen part
  eval_step: Any  # jitted eval step
  lr: Any


def validate(exp: Experiment, run_dir: Path | None) -> None:
  """Every check that needs no writing: raises ConfigError naming the problem."""
  mesh_shape = exp.mesh.shape(jax.device_count())
  rules = sharding.make_rules(exp.mesh.rules)
  batch_shards = math.prod(mesh_shape[a] for a in rules["batch"])
  micro = exp.data.batch_size // exp.train.grad_accum
  if micro % batch_shards:
    axes = "*".join(rules["batch"])
    raise ConfigError(
        f"data.batch_size / train.grad_accum = {micro} sequences must be divisible by the {batch_shards} devices along the batch axes ({axes})"
    )
  if exp.data.batch_size % jax.process_count():
    raise ConfigError(f"data.batch_size ({exp.data.batch_size}) must be divisible by the number of processes ({jax.process_count()})")
  for name in mixture.source_names(exp.data.mixture, exp.data.stages) + list(exp.data.eval_also):
    sources.check(name, exp.data.cache_dir)
  if (tok := tokenizers.load(exp.data)) is not None:  # a tokenizer the config names (not one still to train)
    tokenizers.check_vocab(tok, exp.model.vocab_size)
  for kind in sorted(set(exp.model.ffn_kinds)):  # FFN kinds check what depends on the mesh
    FFN.get(kind).validate(exp, mesh_shape)
  if exp.peft.method != "none":  # targets that match nothing, ranks too large, library files: on shapes only
    initial_model(exp, None, rules, abstract=True)
  if run_dir is not None and (run_dir / CONFIG_FILE).is_file():
    check_resumable(load_config(run_dir), exp)


def prepare(exp: Experiment, devices: list | None = None, *, abstract: bool = False, init: dict[str, Any] | None = None, peft_inputs: dict[str, Any] | None = None) -> Setup:
  """Mesh (over `devices`, default all), sharded model and optimizer state, jitted steps.

  The model starts from `init` (`run.resolve_init`: a checkpoint of `exp.init_from`; None: a
  fresh initialisation) and gets the PEFT method's adapters (`peft_inputs`: what the method
  measured beforehand, e.g. ESFT's experts). With `abstract=True` the state holds
  ShapeDtypeStructs with shardings instead of arrays: enough to lower and compile the step ahead
  of time for devices that are not here (e.g. a TPU topology from
  `jax.experimental.topologies`), allocating nothing.
  """
  mesh = sharding.make_mesh(exp.mesh, devices)
  rules = sharding.make_rules(exp.mesh.rules)
  model = initial_model(exp, mesh, rules, abstract=abstract, init=init, peft_inputs=peft_inputs)
  with sharding.use_rules(rules):
    graphdef, params, frozen, rest = split_model(model, peft.trainable(exp.peft))
    if not jax.tree.leaves(params):
      raise ConfigError(f"peft.method={exp.peft.method!r} leaves nothing to train")
    tx, lr = optimizer.make(exp.optim, exp.train.steps)
    guarded_tx = guarded_optimizer(tx, exp)  # the state's optimizer: make_train_step wraps `tx` alike
    # Outside the mesh context: optax builds its placeholder state eagerly on the default device.
    shardings = state_shardings((graphdef, params, frozen, rest), guarded_tx, mesh, rules)
  with sharding.use_rules(rules), jax.set_mesh(mesh):
    if abstract:
      with_sharding = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
      params, frozen, rest = with_sharding(params, shardings.params), with_sharding(frozen, shardings.frozen), with_sharding(rest, shardings.rest)
      opt_state = with_sharding(jax.eval_shape(guarded_tx.init, params), shardings.opt_state)
      step = jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step)
    else:
      opt_state = jax.jit(guarded_tx.init, out_shardings=shardings.opt_state)(params)
      step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    state = TrainState(step=step, params=params, frozen=frozen, rest=rest, opt_state=opt_state)
    batch_sh = sharding.batch_sharding(mesh)
  train_step = JittedStep(make_train_step(graphdef, tx, lr, exp), shardings, batch_sh)
  eval_step = jax.jit(make_eval_step(graphdef, exp.train.loss_chunk), in_shardings=(shardings.params, shardings.frozen, shardings.rest, batch_sh))
  return Setup(exp, mesh, rules, graphdef, state, shardings, batch_sh, train_step, eval_step, lr)


def state_hooks(setup: Setup, state: TrainState) -> dict[int, Any]:
  """{step: jitted fn(state) -> state} that FFN kinds ask to apply after that step (their
  `scheduled_edits`, e.g. the end of the soft MoE's dense warm-up; `jaxlm.train.hooks`). Each
  compiles once, on first use; the train step itself never changes."""
  return {
      step_no: jax.jit(fn, in_shardings=(setup.shardings,), out_shardings=setup.shardings, donate_argnums=0)
      for step_no, fn in hooks.state_hooks(setup.exp, setup.graphdef, state).items()
  }


def step_memory(compiled: Any) -> dict[str, float]:
  """Bytes per device of a compiled step (XLA's memory analysis; see `aot.summary`)."""
  from jaxlm.train.aot import summary

  return summary(compiled)


def measure_peft_inputs(exp: Experiment, run_dir: Path, init: dict[str, Any] | None, tokenizer) -> dict[str, Any] | None:
  """What the PEFT method measures before its adapters exist (ESFT: the experts to train, scored
  on training batches), recorded in the run directory so that a resumed run reuses it."""
  saved = read_record(run_dir, PEFT_INPUTS_FILE)
  if saved is not None or exp.peft.method != "esft":
    return saved
  from jaxlm.peft import esft

  batches = pipeline.take(datasets(exp, tokenizer, "train"), exp.peft.esft_batches)
  inputs = esft.measure(exp, init, batches)
  if jax.process_index() == 0:
    record(run_dir, PEFT_INPUTS_FILE, inputs)
  return inputs


def to_global(batch: dict[str, np.ndarray], sharding_: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the batch axes (host-side fields dropped)."""
  return {k: jax.make_array_from_process_local_data(sharding_, v) for k, v in batch.items() if k not in pipeline.HOST_FIELDS}


def datasets(exp: Experiment, tokenizer, split: str, *, per_source: bool = False):
  kw = dict(
      seq_len=exp.data.seq_len,
      batch_size=exp.data.batch_size // jax.process_count(),
      seed=exp.train.seed,
      add_bos=exp.data.add_bos,
      cache_dir=exp.data.cache_dir,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  if per_source:
    names = mixture.source_names(exp.data.mixture, exp.data.stages)
    names += [n for n in exp.data.eval_also if n not in names]  # evaluated, never trained on
    return {n: pipeline.lm_dataset({n: 1.0}, split, tokenizer, shuffle=False, **kw) for n in names}
  similar = dict(similarity=exp.data.similarity, similarity_neighbors=exp.data.similarity_neighbors, hosts=hosts.current(), workers=exp.data.workers)  # training only
  return pipeline.lm_dataset(exp.data.mixture, split, tokenizer, shuffle=exp.data.shuffle, stages=exp.data.stages, **kw, **similar)


def evaluate(setup: Setup, state: TrainState, eval_sets: dict[str, Any], n_batches: int) -> dict[str, Any]:
  """Loss and perplexity per source and over all of them (token-weighted), plus mean aux metrics."""
  outs = {}
  with sharding.use_rules(setup.rules), jax.set_mesh(setup.mesh):
    for name, ds in eval_sets.items():
      outs[name] = [setup.eval_step(state.params, state.frozen, state.rest, to_global(b, setup.batch_sharding)) for b in pipeline.take(ds, n_batches)]
  outs = jax.device_get(outs)
  record: dict[str, Any] = {}
  total_ce = total_n = 0.0
  for name, batches in outs.items():
    ce, n = sum(float(b["ce_sum"]) for b in batches), sum(float(b["tokens"]) for b in batches)
    record[f"eval_loss/{name}"] = ce / max(n, 1)
    total_ce, total_n = total_ce + ce, total_n + n
    for key in batches[0]:
      if key.startswith("metrics/"):
        record[f"eval_{key}/{name}"] = np.mean([b[key] for b in batches], axis=0)
  record["eval_loss"] = total_ce / max(total_n, 1)
  record["eval_ppl"] = math.exp(min(record["eval_loss"], 50))
  return record


def resume(setup: Setup, ckpt: Checkpointer | None, train_iter: Any) -> tuple[TrainState, int]:
  """(state, step) of the newest good checkpoint (`Checkpointer.restore_latest`), or the setup's
  fresh state and 0 when there is none.

  The fresh arrays are freed before restoring (only their shapes and shardings are needed), so
  the restore never holds two copies of the state, and the restored arrays are donated to the
  first step like any other: that step's memory is a steady-state step's.
  """
  fresh = setup.state
  if ckpt is None or not ckpt.all_steps():
    return fresh, 0
  target = restore_target(fresh.replace(frozen=None))  # frozen weights are not checkpointed: they stay
  for x in jax.tree.leaves((fresh.step, fresh.params, fresh.rest, fresh.opt_state)):
    if isinstance(x, jax.Array):  # (an abstract setup holds ShapeDtypeStructs)
      x.delete()
  step, restored = ckpt.restore_latest(params=target.params, rest=target.rest, opt_state=target.opt_state, data_iterator=train_iter)
  state = fresh.replace(
      step=jax.device_put(jnp.asarray(restored["opt_state"]["step"], jnp.int32), setup.shardings.step),
      params=restored["params"],
      rest=restored.get("rest", fresh.rest),
      opt_state=restored["opt_state"]["opt_state"],
  )
  setup.state = state
  return state, step


def train(exp: Experiment, run_dir: Path) -> dict[str, Any]:
  """Train (or resume) `exp` in `run_dir`; returns a summary of the run.

  SIGTERM (preemption) checkpoints the current step and returns early (`jaxlm.train.preemption`;
  `checkpoint.save_on_sigterm`); SIGKILL at any point loses only the steps since the newest
  checkpoint: rerunning continues bit-identically.
  """
  with Preemption(exp.checkpoint.enabled and exp.checkpoint.save_on_sigterm) as preempt:
    return _train(exp, Path(run_dir), preempt)


def _train(exp: Experiment, run_dir: Path, preempt: Preemption) -> dict[str, Any]:
  validate(exp, run_dir)
  is_main = jax.process_index() == 0
  init = resolve_init(exp, run_dir)
  if is_main:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, exp)
    if init is not None:
      record(run_dir, INIT_FILE, init)
  tokenizer = tokenizer_for(exp, run_dir)
  setup = prepare(exp, init=init, peft_inputs=measure_peft_inputs(exp, run_dir, init, tokenizer))
  tcfg = exp.train
  train_iter = iter(datasets(exp, tokenizer, "train"))
  eval_sets = datasets(exp, tokenizer, "validation", per_source=True)
  ckpt = Checkpointer(run_dir / CHECKPOINTS, exp.checkpoint) if exp.checkpoint.enabled else None

  state, start = resume(setup, ckpt, train_iter)  # step 0 too: `jaxlm convert upcycle` writes a run that starts from a checkpoint
  if start >= tcfg.steps:
    print(f"{run_dir}: already trained to step {start} (train.steps = {tcfg.steps}); nothing to do")
    return {"steps": start}

  writer = MetricsWriter(run_dir, total_steps=tcfg.steps, start_step=start)
  n_dev = jax.device_count()
  tokens_per_step = exp.data.batch_size * exp.data.seq_len
  n_trainable, n_frozen = (sum(x.size for x in jax.tree.leaves(t)) for t in (state.params, state.frozen))
  flops_per_token = flops.train_flops_per_token(exp.model, exp.data.seq_len, frozen_base=n_frozen > 0)
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  origin = "from scratch" if not init else f"from {init['path']} " + ("(Hugging Face)" if init.get("format") == "hf" else f"step {init['step']}")
  writer.print(
      f"{exp.name}: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(setup.mesh.shape)}, "
      f"{'resuming at step ' + str(start) if start else origin} -> {tcfg.steps} steps of {tokens_per_step:,} tokens"
  )
  if exp.peft.method != "none":
    writer.print(f"peft {exp.peft.method}: {n_trainable:,} trainable parameters of {n_trainable + n_frozen:,} ({n_trainable / (n_trainable + n_frozen):.2%})")

  def last_checkpoint() -> int | None:
    if ckpt is None:
      return None
    ckpt.wait()  # a save in flight is the last good checkpoint
    return ckpt.latest_step()

  note_skips = SkipReport(tcfg, jax.device_get(state.opt_state.guard), writer.print, last_checkpoint)
  state_is_finite = jax.jit(all_finite)

  def save(step_no: int) -> None:
    # Never checkpoint a non-finite state: the guard keeps NaN/Inf out of the updates; this
    # also catches whatever else could bring them in (an initial checkpoint, a state hook).
    g = jax.device_get(state.opt_state.guard)
    note_skips(step_no, g.skipped_nonfinite, g.skipped_spikes, g.last_nonfinite_step)
    if ckpt is not None and not bool(state_is_finite((state.params, state.rest, state.opt_state))):
      raise TrainingError(f"step {step_no}: the train state holds NaN or Inf values; not checkpointed (the last checkpoint is step {last_checkpoint()})")
    if ckpt is not None:
      ckpt.save(step_no, params=state.params, rest=state.rest, opt_state=state.opt_state, data_iterator=train_iter, config=to_dict(exp))

  def run_eval(step_no: int) -> dict[str, Any]:
    rec = {"step": step_no, **evaluate(setup, state, eval_sets, tcfg.eval_batches)}
    writer.write(rec)
    per_source = "  ".join(f"{k[len('eval_loss/'):]} {v:.3f}" for k, v in rec.items() if k.startswith("eval_loss/"))
    writer.print(f"step {step_no:>6}  eval loss {rec['eval_loss']:.4f}  ppl {rec['eval_ppl']:.2f}  ({per_source})")
    return rec

  first_eval = run_eval(start) if start == 0 and tcfg.eval_every else None
  t_start = time.perf_counter()
  with sharding.use_rules(setup.rules), jax.set_mesh(setup.mesh):
    source_tokens = mixture.TokenCounter(mixture.source_names(exp.data.mixture, exp.data.stages), jax.process_count())
    host_batch = next(train_iter)
    batch = to_global(host_batch, setup.batch_sharding)
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(state, batch).compile()
    mem = step_memory(compiled)
    writer.print(
        f"compiled the train step in {time.perf_counter() - t0:.1f} s; memory per device {mem['peak_estimate'] / 2**20:,.1f} MiB "
        f"(state and batch {mem['arguments'] / 2**20:,.1f}, temporaries {mem['temporaries'] / 2**20:,.1f})"
    )
    hooks = state_hooks(setup, state)
    if ckpt is not None and start == 0:  # (a restore has compiled the digests already)
      ckpt.warm_up(params=state.params, rest=state.rest, opt_state=state.opt_state)

    pending: tuple[int, Any] | None = None
    last_eval = first_eval
    # Throughput between two logged steps: fetching step k's metrics waits for step k to finish.
    mark_step, mark_t = start, time.perf_counter()
    tok_s = 0.0

    def log(step_no: int, metrics: Any) -> None:
      nonlocal mark_step, mark_t, tok_s
      metrics = jax.device_get(metrics)
      note_skips(step_no, metrics["skipped_nonfinite"], metrics["skipped_spikes"], metrics["last_nonfinite_step"])
      now = time.perf_counter()
      tok_s = (step_no - mark_step) * tokens_per_step / max(now - mark_t, 1e-9)
      mark_step, mark_t = step_no, now
      rec = {"step": step_no, **metrics, "tokens_per_sec": tok_s, "tflops_per_device": tok_s * flops_per_token / n_dev / 1e12}
      if peak:
        rec["mfu"] = rec["tflops_per_device"] * 1e12 / peak
      writer.write(rec)
      writer.advance(0, loss=float(metrics["loss"]), tok_s=f"{tok_s:,.0f}")
      if not writer.interactive:  # no live bar (a log file, CI): a line per log step, with ETA
        eta = (tcfg.steps - step_no) * tokens_per_step / max(tok_s, 1e-9)
        writer.print(
            f"step {step_no:>6}  loss {float(metrics['loss']):.4f}  grad_norm {float(metrics['grad_norm']):.3f}  lr {float(metrics['lr']):.2e}  "
            f"{tok_s:,.0f} tok/s  {rec['tflops_per_device']:.3g} TFLOP/s/device" + (f"  MFU {rec['mfu']:.1%}" if peak else "") + f"  ETA {eta / 60:.1f} min"
        )

    step_no = start
    stopped = preempt.reached(step_no)  # SIGTERM during start-up: the newest checkpoint holds this state
    try:
      while step_no < tcfg.steps and not stopped:
        state, metrics = compiled(state, batch)
        source_tokens.add(host_batch)
        step_no += 1
        signal_at("step", step_no)
        if step_no in hooks:
          state = hooks[step_no](state)
        if pending is not None:
          log(*pending)  # read step N-1's metrics only after step N is dispatched
          pending = None
        if step_no % tcfg.log_every == 0 or step_no == tcfg.steps:
          pending = (step_no, {**metrics, **source_tokens.take()})  # tokens of each source since the last line
        writer.advance(1)
        is_last = step_no == tcfg.steps
        do_eval = tcfg.eval_every and (step_no % tcfg.eval_every == 0) or is_last
        do_ckpt = tcfg.checkpoint_every and (step_no % tcfg.checkpoint_every == 0) or is_last
        if do_eval or do_ckpt:
          if pending is not None:
            log(*pending)
            pending = None
          if do_eval:
            last_eval = run_eval(step_no)
          if do_ckpt:
            save(step_no)
            signal_at("save", step_no)
          mark_step, mark_t = step_no, time.perf_counter()  # keep eval and checkpoint time out of tokens/s
        if not is_last and preempt.reached(step_no):  # before the next batch: the saved data state matches
          if pending is not None:
            log(*pending)
            pending = None
          if not do_ckpt:
            save(step_no)
          stopped = True
        elif not is_last:
          host_batch = next(train_iter)
          batch = to_global(host_batch, setup.batch_sharding)
    finally:  # also on Ctrl-C: let a checkpoint being written finish, flush the metrics
      if ckpt is not None:
        ckpt.wait()
        ckpt.close()
      writer.close()
  if stopped:
    if is_main:
      saved = f"checkpoint of step {step_no} saved" if step_no > start else "no step taken, nothing new to save"
      print(f"stopped by SIGTERM at step {step_no}: {saved}; rerun the same command to resume", flush=True)
    return {"steps": step_no, "preempted": True}
  minutes = (time.perf_counter() - t_start) / 60
  pictures = plots.write_all(run_dir, writer.history) if is_main else []
  summary = {
      "steps": tcfg.steps,
      "trainable_params": n_trainable,
      "frozen_params": n_frozen,
      "step_memory_bytes": mem["peak_estimate"],
      "minutes": minutes,
      "tokens_per_sec": tok_s,
      "initial_eval_loss": first_eval["eval_loss"] if first_eval else None,
      "final_eval_loss": last_eval["eval_loss"] if last_eval else None,
      "plots": [str(p) for p in pictures],
  }
  if is_main:
    print(f"done: {tcfg.steps} steps in {minutes:.1f} min, {tok_s:,.0f} tokens/s; eval loss "
          + (f"{summary['initial_eval_loss']:.3f} -> " if first_eval else "")
          + (f"{summary['final_eval_loss']:.3f}" if last_eval else "n/a"))
    for p in pictures:
      print(f"wrote {p}")
  if tcfg.sample_prompts and tcfg.sample_tokens:
    _print_samples(setup, state, tokenizer, tcfg)
  return summary


def _print_samples(setup: Setup, state: TrainState, tokenizer, tcfg) -> None:
  from jaxlm.generate import SamplingConfig, generate_text

  model = nnx.merge(setup.graphdef, state.params, state.frozen, state.rest)
  with sharding.use_rules(setup.rules), jax.set_mesh(setup.mesh):
    texts = generate_text(model, tokenizer, list(tcfg.sample_prompts), SamplingConfig(max_new_tokens=tcfg.sample_tokens, temperature=0.8, top_p=0.95, seed=tcfg.seed))
  if jax.process_index() == 0:
    for prompt, text in zip(tcfg.sample_prompts, texts):
      print(f"--- sample: {prompt!r}\n{prompt}{text}")
