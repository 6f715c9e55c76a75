"""What every ``python -m train.*`` command shares: its parser, its start-up and its ``error:`` exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from models.config import ConfigError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage mistakes raise ``ConfigError`` (so they end as one ``error:`` line)."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see {self.prog} --help")


def start_jax() -> None:
    """Call before a command touches the devices: keeps libtpu off hosts without TPUs and quiets
    Orbax's absl warnings (e.g. about read-only checkpoint directories)."""
    from absl import logging as absl_logging

    from train.run.distributed import select_platforms

    absl_logging.set_verbosity(absl_logging.ERROR)
    select_platforms()


def guarded(command: Callable[[], int | None]) -> int:
    """Runs a command's body; a user mistake (``ConfigError``, an unreadable or unwritable path)
    prints one ``error:`` line and gives exit status 2. Returns the exit status."""
    try:
        status = command()
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if status is None else status
