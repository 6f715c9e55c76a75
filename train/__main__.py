"""``python -m train [CONFIG.yaml] [section.key=value ...]``: train (or resume) a model.

No CONFIG runs the shipped default (configs/default.yaml). User mistakes print one
``error:`` line and exit with status 2, before anything is written.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from train import cli
from train.config.sections import Config, ConfigError, load_config

USAGE = "usage: python -m train [CONFIG.yaml] [section.key=value ...]"


def check_backend(config: Config) -> None:
    """Refuses settings the backend JAX started on cannot run."""
    import jax

    backend = jax.default_backend()
    if config.model.attention == "splash" and backend != "tpu":
        raise ConfigError(f"model.attention='splash' runs on TPU only, not on {backend}; use model.attention='xla'")
    if config.model.attention == "cudnn" and backend != "gpu":
        raise ConfigError(
            f"model.attention='cudnn' runs on NVIDIA GPUs only, not on {backend}; use model.attention='xla'"
        )


def main(argv: list[str], callbacks: Sequence = ()) -> int:
    """The CLI; ``callbacks`` (train.callbacks.Callback) are for programs that drive it in-process."""
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.strip())
        return 0
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv

    def command() -> None:
        config = load_config(path, overrides)
        from train.run.distributed import initialize  # imports jax: after the config is valid
        from train.run.loop import run

        cli.start_jax()
        initialize(config.run)
        check_backend(config)
        run(config, callbacks)

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
