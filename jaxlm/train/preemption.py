"""Preemption: SIGTERM makes the loop checkpoint at the next step boundary and stop (exit 0).

Schedulers announce an eviction with SIGTERM and kill a while later (Cloud TPU and GCE spot VMs
give 30 s, Kubernetes 30 s by default, SLURM's KillWait 30 s). The loop asks `reached(step)`
after every step, before it fetches the next batch (so the saved data-iterator state matches the
step), and once more before the first step. The time from the signal to the exit is bounded by
what is in flight at a step boundary: the rest of the current step, an evaluation if one is due
at that step, and one checkpoint write, waited for; a signal during start-up (restore, compile)
is seen when start-up ends, and nothing is saved then (the newest checkpoint holds that state).

One process: a handler sets a flag. Several: `jax.distributed.initialize` has installed jax's
preemption sync manager, which owns SIGTERM and agrees on one step for every process to stop at
(`multihost_utils.reached_preemption_sync_point`, to be called at every step by all of them).

`signal_at(where, step)` is a fault-injection hook for tests: with `JAXLM_SIGNAL_AT=where:step:NAME`
in the environment (e.g. `save:4:KILL`) the process sends itself SIGNAME at that point.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


class Preemption:
  """`with Preemption(enabled) as p: ... if p.reached(step): save and stop`."""

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.requested = False
    self._previous: Any = None
    self._multi = False

  def __enter__(self) -> "Preemption":
    import jax

    if not self.enabled:
      return self
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum: int, frame: Any) -> None:
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` now and stop (every process gets the same answer)."""
    if not self.enabled:
      return False
    if self._multi:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def signal_at(where: str, step: int) -> None:
  """Test hook: send this process the signal that `JAXLM_SIGNAL_AT=where:step:NAME` names."""
  spec = os.environ.get("JAXLM_SIGNAL_AT")
  if not spec:
    return
  at_where, at_step, name = spec.split(":")
  if at_where == where and int(at_step) == step:
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
