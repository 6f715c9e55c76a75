"""Which running trials still have a live worker: heartbeats in the study storage, any storage kind.

A worker stamps its trial with ``worker`` (host:pid) and a ``heartbeat`` time every
``heartbeat_s`` seconds. A RUNNING trial is stale when its worker's process is gone (same host)
or its heartbeat is older than ``STALE_BEATS`` beats (any host); stale trials are marked FAIL
with the reason, so a killed worker's trial is never counted and never blocks the study.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

STALE_BEATS = 4
HOST = socket.gethostname()


def worker_id() -> str:
    return f"{HOST}:{os.getpid()}"


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this worker runs no trial while it looks for stale ones
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stale_reason(trial: FrozenTrial, heartbeat_s: float, now: float) -> str | None:
    """Why ``trial`` (RUNNING) has no live worker, or None while it may still have one."""
    worker = trial.user_attrs.get("worker", "")
    host, _, pid = worker.rpartition(":")
    if host == HOST and pid.isdigit() and _process_gone(int(pid)):
        return f"its worker {worker} is gone"
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    last = trial.user_attrs.get("heartbeat", started)
    if now - last > STALE_BEATS * heartbeat_s:
        return f"no heartbeat from {worker or 'its worker'} for {now - last:.0f} s"
    return None


def fail_stale(study: optuna.Study, heartbeat_s: float) -> list[tuple[int, str]]:
    """Marks every stale RUNNING trial FAIL (``fail_reason`` says why); returns (number, reason) pairs."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(trial, heartbeat_s, time.time())
        if reason is None:
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"stale: {reason}")
            study.tell(trial.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            continue  # another worker finished or failed it first
        failed.append((trial.number, reason))
    return failed


class Heartbeat:
    """``with Heartbeat(trial, seconds):`` stamps ``trial`` as this worker's and beats until the block ends."""

    def __init__(self, trial: optuna.Trial, heartbeat_s: float):
        self.trial, self.heartbeat_s = trial, heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial.number}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return

    def __enter__(self) -> None:
        self.trial.set_user_attr("worker", worker_id())
        self.trial.set_user_attr("heartbeat", time.time())
        self._thread.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
