"""Chunked cross-entropy: compiled memory per device, whole float32 logits against chunks.

For llama3_8b_8xh100 (8B, 128k vocabulary, 16 x 8192 tokens, FSDP over 8 devices, full remat:
16,384 tokens per device), XLA's memory analysis per device (arguments + outputs + temporaries
- aliased) of

  loss_part   the loss as the train step computes it, forward and backward, from the final
              hidden states [16, 8192, 4096] to the gradients of the hidden states and of the
              parameters, with the step's shardings: train.loss_chunk=0 (the whole float32
              [B, L, V] logits, 2 x 8192 x 128256 x 4 B = 7.8 GiB per device, and their
              gradient) and chunks of 1024, 2048 (the default), 4096 tokens per device;
  step        the whole train step, whole logits and the default chunks;
  step_l1024  the same, the 16,384 tokens per device as 128 sequences of 1024 tokens.

Compiled ahead of time for a TPU v5p slice of 8 chips (v5p:2x2x2: one chip per H100 of the
experiment, the same mesh and shardings) when libtpu is installed (`pip install "jax[tpu]"`).
The experiment's cuDNN attention exists on GPUs only, and XLA's attention stands in: at 8192
tokens it holds [B, H, L, L] scores (2 x 32 x 8192^2 x 4 B = 17 GiB per device, and more for
their gradient) in a layer's backward pass, which sets the step's peak with or without chunks.
`step_l1024` shrinks those scores 8-fold at the same logits per device: XLA's buffer report
(--xla_dump_to) shows the whole logits' buffers gone with chunks (f32 and bf16 [16, 1024, V]:
11.7 GiB, the largest logits buffer left is one chunk's [16, 128, V]: 1 GiB) but the peak still
set in a layer's backward pass (remat residuals, the stacked layers' float32 weight gradients,
attention), a little above where the whole logits had put it. Without libtpu everything is
compiled for one CPU device with one device's share of the batch and 2 of the 32 layers: the
logits per device are the same, the weights are not (and XLA:CPU schedules without regard to
memory).

The price of the chunks: the head's logits are recomputed in the backward pass, 2 x D x V more
FLOPs per token (`extra_flops_fraction`, analytical: XLA's cost analysis counts a scan's body once).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import write_result
from jaxlm import experiments, sharding
from jaxlm.config import Experiment, MeshConfig
from jaxlm.errors import ConfigError
from jaxlm.train import aot, flops, loop
from jaxlm.train.loss import chunked_token_losses

NAME = "llama3_8b_8xh100"
CHUNKS = (0, 1024, 2048, 4096)
GIB = 2**30


def with_chunk(exp: Experiment, chunk: int) -> Experiment:
  return dataclasses.replace(exp, train=dataclasses.replace(exp.train, loss_chunk=chunk))


def target() -> tuple[str, Experiment, list]:
  """(where, the experiment as compiled there, devices)."""
  exp = experiments.load(NAME)
  exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, attention_impl="xla"))
  try:
    return "tpu_v5p_2x2x2", exp, aot.topology_devices("v5p:2x2x2")
  except ConfigError:
    pass
  one = dataclasses.replace(
      exp,
      mesh=MeshConfig(fsdp=1, devices=1),
      model=dataclasses.replace(exp.model, n_layers=2),
      data=dataclasses.replace(exp.data, batch_size=exp.data.batch_size // exp.mesh.devices),
  )
  return "cpu_1_device_2_layers_batch_2", one, jax.devices("cpu")[:1]


def compile_loss_part(exp: Experiment, devices: list) -> Any:
  """The compiled gradient of the step's loss with respect to the final hidden states and the
  model's parameters (the head's, in effect), with the step's shardings."""
  exp = dataclasses.replace(exp, mesh=dataclasses.replace(exp.mesh, devices=len(devices)), model=dataclasses.replace(exp.model, n_layers=1))
  setup = loop.prepare(exp, devices, abstract=True)
  b, l, d = exp.data.batch_size, exp.data.seq_len, exp.model.d_model
  x = jax.ShapeDtypeStruct((b, l, d), jnp.dtype(exp.model.dtype), sharding=sharding.batch_sharding(setup.mesh, 3))
  ints = jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=setup.batch_sharding)
  z_weight, chunk = 1e-4, exp.train.loss_chunk

  def loss(params, x_bld, targets, mask):
    model = nnx.merge(setup.graphdef, params, setup.state.frozen, setup.state.rest)
    ce, z, n = chunked_token_losses(model.head_fn(), model.final_norm(x_bld), targets, mask, chunk=chunk)
    return (ce + z_weight * z) / n

  with sharding.use_rules(setup.rules), jax.set_mesh(setup.mesh):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), out_shardings=(setup.shardings.params, x.sharding))  # sharded like the step's gradients
    return grad.lower(setup.state.params, x, ints, ints).compile()


def measure(compile_fn, exp: Experiment, devices: list, chunks: tuple[int, ...], label: str, where: str) -> dict[str, Any]:
  rows = {}
  for chunk in chunks:
    t0 = time.perf_counter()
    s = aot.summary(compile_fn(with_chunk(exp, chunk), devices))
    rows[str(chunk)] = {k: s[k] / GIB for k in ("arguments", "temporaries", "peak_estimate")}
    print(f"{NAME} {label} on {where}, train.loss_chunk={chunk}: {rows[str(chunk)]['peak_estimate']:.2f} GiB per device "
          f"(temporaries {rows[str(chunk)]['temporaries']:.2f}; compiled in {time.perf_counter() - t0:.0f} s)")
  return rows


def main(argv: list[str]) -> None:
  where, exp, devices = target()
  default = experiments.load(NAME).train.loss_chunk
  d = str(default)
  tokens = exp.data.batch_size * exp.data.seq_len
  short = dataclasses.replace(exp, data=dataclasses.replace(exp.data, seq_len=1024, batch_size=tokens // 1024))
  loss_part = measure(compile_loss_part, exp, devices, CHUNKS, "loss part", where)
  step = measure(aot.compile_train_step, exp, devices, (0, default), "train step", where)
  step_l1024 = measure(aot.compile_train_step, short, devices, (0, default), "train step, 1024-token sequences", where)
  full = experiments.load(NAME).model
  saved = lambda rows: rows["0"]["peak_estimate"] - rows[d]["peak_estimate"]
  out = {
      "experiment": NAME,
      "compiled_for": where,
      "tokens_per_device": tokens // len(devices),
      "default_chunk": default,
      "loss_part_gib_per_device": loss_part,
      "step_gib_per_device": step,
      "step_l1024_gib_per_device": step_l1024,
      "loss_part_whole_over_chunked": loss_part["0"]["peak_estimate"] / loss_part[d]["peak_estimate"],
      "loss_part_saved_gib_per_device": saved(loss_part),
      "step_saved_gib_per_device": saved(step),
      "step_l1024_saved_gib_per_device": saved(step_l1024),
      "extra_flops_fraction": 2 * full.d_model * full.vocab_size / flops.train_flops_per_token(full, exp.data.seq_len),
  }
  print(f"chunks of {d} tokens per device save {out['loss_part_saved_gib_per_device']:.1f} GiB per device in the loss "
        f"({out['loss_part_whole_over_chunked']:.2f}x), {out['step_saved_gib_per_device']:.1f} GiB in the step (attention-bound), "
        f"{out['step_l1024_saved_gib_per_device']:.1f} GiB in the step at 1024-token sequences; +{out['extra_flops_fraction']:.1%} FLOPs")
  write_result("loss_memory", out)


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
