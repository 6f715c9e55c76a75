"""``python -m train.lm_eval [lm-eval arguments]``: lm-eval's own command line, with ``--model meshlm``
(train/evaluation/harness.py) registered, e.g.
``python -m train.lm_eval --model meshlm --model_args source=runs/default --tasks lambada_openai``."""

from __future__ import annotations

import sys

from train import cli


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        cli.start_jax()
        from lm_eval.__main__ import cli_evaluate

        import train.evaluation.harness  # noqa: F401  (registers --model meshlm)

        sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
        cli_evaluate()

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
