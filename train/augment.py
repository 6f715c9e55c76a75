"""``python -m train.augment SOURCE_FILE --via MODEL_A --back MODEL_B --out FILE [--field text]
[--via-prefix TEXT] [--back-prefix TEXT] [--batch-size N] [--max-new-tokens N] [--tokenizer DIR]``

Back-translation: every JSONL row of SOURCE_FILE has its ``--field`` text translated by MODEL_A
and the result translated back by MODEL_B; the rows, with that field replaced and every other
field (labels, groups) kept, are written to ``--out`` in order, ready as extra training rows.
MODEL_A and MODEL_B are T5 (seq2seq) models: run directories, export directories or Hugging Face
directories (train/checkpoints/sources.py). ``--via-prefix`` / ``--back-prefix`` go before each input (T5 task
prefixes such as ``translate English to German: ``). Decoding is greedy, batched through the cached
generation of ``models.generate`` (one compile per batch shape); an input longer than the model's
positions is cut to fit. User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from train import cli
from train.config.sections import ConfigError
from train.generation.back_translation import back_translate


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m train.augment", description=__doc__.split("\n\n")[1])
    parser.add_argument("source_file", help="JSONL rows whose --field text is back-translated")
    parser.add_argument("--via", required=True, help="the seq2seq model that translates out")
    parser.add_argument("--back", required=True, help="the seq2seq model that translates back")
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--field", default="text", help="the field holding the text (default: text)")
    parser.add_argument("--via-prefix", default="", help="put before every input of --via")
    parser.add_argument("--back-prefix", default="", help="put before every input of --back")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the longest translation, in tokens")
    parser.add_argument("--tokenizer", default="", help="'byte' or a tokenizer directory for both models")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("need --batch-size >= 1 and --max-new-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cli.start_jax()
        n = back_translate(args)
        print(f"back-translated {n} rows via {args.via} and back via {args.back} -> {args.out}", flush=True)

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
