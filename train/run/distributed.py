"""Multi-process start-up: ``jax.distributed.initialize`` once, early, only when asked for."""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import socket
import time

import jax

from train.config.sections import ConfigError, RunConfig

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (and gVNIC network cards) on the PCI bus


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def select_platforms() -> None:
    """Keeps JAX from starting libtpu on a host without TPUs (unless JAX_PLATFORMS says otherwise).

    libtpu comes with the ``tpu`` and ``test`` extras (TPU plans compile on any host); on a host
    with no TPU chip, JAX would still start it and it logs a screenful of errors before JAX falls
    back to the GPU or CPU. Must run before anything touches the devices.
    """
    if "JAX_PLATFORMS" in os.environ or not _installed("libtpu"):
        return
    vendors = (pathlib.Path(p).read_text().strip() for p in glob.glob("/sys/bus/pci/devices/*/vendor"))
    if any(v == GOOGLE_PCI_VENDOR for v in vendors):
        return  # maybe a TPU VM: let JAX decide
    cuda = any(_installed(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
    jax.config.update("jax_platforms", "cuda,cpu" if cuda else "cpu")


def initialize(cfg: RunConfig) -> None:
    """Joins the cluster described by ``cfg`` (a no-op for a single process).

    Must run before anything touches the devices. On CPU, cross-process collectives go
    through gloo.
    """
    if not cfg.auto_distributed and cfg.num_processes == 1 and not cfg.coordinator:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if not cfg.auto_distributed:
        kwargs = {
            "coordinator_address": cfg.coordinator,
            "num_processes": cfg.num_processes,
            "process_id": None if cfg.process_id < 0 else cfg.process_id,
        }
    if cfg.coordinator and cfg.process_id != 0:
        _wait_for_coordinator(cfg.coordinator, cfg.coordinator_timeout_s)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=cfg.coordinator_timeout_s)
    except Exception as e:  # noqa: BLE001 - any failure to join is reported as one line
        where = cfg.coordinator or "the auto-detected coordinator"
        raise ConfigError(
            f"could not join the cluster at {where} within {cfg.coordinator_timeout_s} s "
            f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}); "
            "check run.coordinator and that process 0 is running"
        ) from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls ``host:port`` until it accepts a TCP connection.

    XLA's coordination client aborts the whole process when it cannot connect, so the
    unreachable case is caught here, where it can still be reported as one line.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"run.coordinator='{address}' is not host:port; e.g. run.coordinator=10.0.0.2:1234")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"could not reach the coordinator at {address} within {timeout_s} s ({e.strerror or e}); "
                    "check run.coordinator and that process 0 is running"
                ) from None
            time.sleep(0.5)
