"""Trains a byte-level BPE tokenizer on text files and saves it for ``data.tokenizer=DIR``.

    python -m train.train_tokenizer --files 'data/shakespeare/*.txt' \\
        --exclude 'data/shakespeare/hamlet.txt' --vocab-size 2048 --out tokenizers/shakespeare

Byte-level means every string encodes (no unknown token) and decodes back exactly. The only
special token is ``<|endoftext|>``, the eos the packer puts after every document.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from train.data.bpe import train_bpe


def _expand(patterns: str) -> tuple[list[str], str | None]:
    """Comma-separated globs -> sorted files; also the first pattern that matched nothing."""
    files, empty = set(), None
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        matched = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
        if not matched and empty is None:
            empty = pattern
        files.update(os.path.normpath(f) for f in matched)
    return sorted(files), empty


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.train_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--files", required=True, help="glob(s) of training text, comma-separated")
    parser.add_argument("--exclude", default="", help="glob(s) to leave out, e.g. the validation documents")
    parser.add_argument("--vocab-size", type=int, default=2048, help="ids in the vocabulary, eos included")
    parser.add_argument("--out", required=True, help="directory to write; pass it as data.tokenizer")
    args = parser.parse_args(argv)

    files, empty = _expand(args.files)
    if empty is not None:
        return _fail(f"--files pattern '{empty}' matches no file; point it at text files")
    excluded, _ = _expand(args.exclude)
    files = [f for f in files if f not in set(excluded)]
    if not files:
        return _fail(f"--exclude '{args.exclude}' leaves no file of --files '{args.files}'; narrow --exclude")
    try:
        train_bpe(files, args.vocab_size, args.out)
    except ValueError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e}; check that the files are readable and --out is writable")
    print(f"trained a {args.vocab_size}-id byte-level BPE on {len(files)} files; wrote {args.out}")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
