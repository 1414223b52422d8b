"""When a run stops: one decision that every process of the run agrees on.

A process may want to stop for its own reasons: a signal (SIGTERM from a TPU
maintenance event or a spot preemption, SIGINT, SIGHUP from a closed terminal), a
write that failed, or a workdir lock that another trainer took. If each process
broke out of the loop on its own flag, they would stop at different steps and the
joint checkpoint would never meet. Instead every process votes each step with a
code, and the run stops at the same step everywhere with the most severe one:

  CONTINUE < PREEMPT (save, exit 0) < FAIL (save if possible, exit 1)
           < FENCED (another trainer holds the workdir: write nothing, exit 1)

Multi-process, the vote is a max over every device, dispatched each step and read
one step later, so the host never waits for the step it just launched. Once a
stop is asked for, a deadline bounds the exit: a write or a peer that blocks
forever cannot keep the process alive.
"""

import os
import signal
import sys
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

CONTINUE, PREEMPT, FAIL, FENCED = 0, 1, 2, 3
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(Exception):
  """A stop signal arrived where the work can be dropped at once (the final evaluation)."""


class Stop:
  """This process's reason to stop and the run's agreed decision.

  Args:
    mesh: the run's mesh (the vote spans its devices).
    batch_axes: the mesh axes the batch (and so the vote) is sharded over.
    timeout_s: once a stop is asked for, the process exits (code 1, one line) if it
      has not ended within this many seconds.
  """

  def __init__(self, mesh: jax.sharding.Mesh, batch_axes: tuple, timeout_s: float):
    self.code, self.reason = CONTINUE, ""
    self.timeout_s = timeout_s
    self.interruptible = False  # set around work a signal may abandon (single process)
    self._multi = jax.process_count() > 1
    self._pending = None
    self._timer: Optional[threading.Timer] = None
    self._handlers = {}
    if self._multi:
      self._sharding = NamedSharding(mesh, P(batch_axes))
      self._local = len(mesh.local_devices)
      self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

  # -- this process -----------------------------------------------------------

  def request(self, code: int, reason: str) -> None:
    """Asks to stop with `code` (the most severe request wins) and arms the deadline."""
    if code > self.code:
      self.code, self.reason = code, reason
    self.arm()

  def arm(self) -> None:
    if self._timer is None and self.timeout_s > 0:
      self._timer = threading.Timer(self.timeout_s, self._expired)
      self._timer.daemon = True
      self._timer.start()

  def _expired(self) -> None:
    print(f"error: process {jax.process_index()}: the run did not stop within "
          f"{self.timeout_s:.0f} s of being asked to ({self.reason or 'a stop'}): a write or "
          "another process is blocked; exiting without a new checkpoint (--config.stop_timeout_s)",
          file=sys.stderr, flush=True)
    os._exit(1)  # not sys.exit: the thread that blocks would hold the exit

  def _on_signal(self, signum, _frame) -> None:
    name = signal.Signals(signum).name
    self.request(PREEMPT, f"{name} received")
    if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
      signal.signal(signal.SIGINT, signal.default_int_handler)
    if self.interruptible:
      self.interruptible = False
      raise Interrupted(name)

  def install(self) -> None:
    """SIGTERM, SIGINT and SIGHUP ask for a stop (checkpoint, exit 0)."""
    self._handlers = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

  def close(self) -> None:
    """Restores the signal handlers and disarms the deadline."""
    for s, handler in self._handlers.items():
      signal.signal(s, handler)
    self._handlers = {}
    if self._timer is not None:
      self._timer.cancel()
      self._timer = None

  # -- the run's decision -------------------------------------------------------

  def _vote(self, code: int) -> jax.Array:
    local = np.full((self._local,), code, np.int32)
    return self._max(jax.make_array_from_process_local_data(self._sharding, local))

  @staticmethod
  def _read(vote: jax.Array) -> int:
    return int(np.asarray(vote.addressable_data(0)))

  def poll(self) -> int:
    """The agreed code at this step, the same on every process.

    One process: its own code. Several: this step's vote is dispatched and the
    previous step's vote (dispatched one step ago) is read, so every process sees
    the same value at the same step.
    """
    if not self._multi:
      return self.code
    vote, self._pending = self._pending, self._vote(self.code)
    return CONTINUE if vote is None else self._read(vote)

  def now(self, code: int = CONTINUE) -> int:
    """The agreed code, synchronously, with `code` as this process's vote besides its
    own (at checkpoints and the end, where every process must decide the same)."""
    if code:
      self.code = max(self.code, code)
    if not self._multi:
      return self.code
    return self._read(self._vote(self.code))


class PeerFailed(RuntimeError):
  """Another process of the run failed a step that every process must pass."""


def agree(ok: bool, what: str) -> None:
  """Multi-process: every process stops when one of them failed `what` (that one says
  why; the others raise PeerFailed)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if not np.all(multihost_utils.process_allgather(np.int32(ok))) and ok:
      raise PeerFailed(f"another process failed to {what} (see its log)")
