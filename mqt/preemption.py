"""SIGTERM / SIGINT end a training run cleanly: finish the step, checkpoint, exit.

A preemptible VM (a Cloud TPU, a spot GPU) gets SIGTERM and a short grace period;
Ctrl-C sends SIGINT. While `Watch` is active the first such signal only sets a flag
(a second one acts as usual, e.g. stops at once); the training loop checks `requested`
after each step, writes a checkpoint of that step and raises `Preempted`, which the
entry point reports in one line with exit status `EXIT_STATUS`. Rerunning the same
command continues from that checkpoint. With several processes the flag is agreed
across them each step (any process signalled stops them all at the same step).
"""
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_STATUS = 75  # EX_TEMPFAIL: the run stopped on request and can be resumed.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """A run stopped on SIGTERM / SIGINT after writing a checkpoint (the message says
  which and where)."""


class Watch:
  """Context manager: while active, SIGTERM / SIGINT set `requested` (first one only).

  Outside the main thread (signal handlers cannot be installed there) it watches
  nothing and `requested` stays False."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    sys.stderr.write(f"{self.signal_name} received: finishing this step and writing a "
                     f"checkpoint (send it again to stop at once)\n")
    sys.stderr.flush()
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  @property
  def requested(self) -> bool:
    """Whether a stop was requested here, or (several processes) in any process."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.int32(local))
    return bool(np.asarray(flags).any())
