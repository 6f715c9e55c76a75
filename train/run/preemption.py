"""Stopping on SIGTERM / SIGINT at a step every process agrees on, to save a checkpoint first.

One process: our handlers set a flag; the loop finishes the current step, saves and exits.
Several processes: a step at which to stop must be the same everywhere, or the collective save
deadlocks. JAX's preemption service (started by ``jax.distributed.initialize``) owns SIGTERM,
spreads the notice to every process and picks the sync step (the largest step any process has
reached, plus one); SIGINT is turned into a SIGTERM for it. In both cases a second SIGINT exits
at once; committed checkpoints are never touched (Orbax commits a step by renaming it).
With several processes a second SIGTERM is absorbed by JAX's service: use SIGINT or SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Installs the handlers; ``reached(step)`` says whether to save and stop after ``step``.

    Call ``reached`` after every step (JAX's sync protocol needs every step id); ``restore``
    puts the previous handlers back.
    """

    def __init__(self):
        self.requested = False
        self.distributed = jax.process_count() > 1
        owned = (signal.SIGINT,) if self.distributed else SIGNALS
        self.previous = {sig: signal.signal(sig, self._handle) for sig in owned}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            print(
                f"error: second signal {signal.Signals(signum).name}; exiting now (committed checkpoints are intact)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        self.requested = True
        if self.distributed:
            signal.raise_signal(signal.SIGTERM)  # JAX's preemption notifier tells every process

    def reached(self, step: int) -> bool:
        if self.distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
