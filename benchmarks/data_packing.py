"""How fast the text path tokenises and packs a corpus: one JSON object per tokenizer on stdout.

    PYTHONPATH=. python benchmarks/data_packing.py                          # the 37 plays, byte tokenizer
    PYTHONPATH=. python benchmarks/data_packing.py --files 'data/shakespeare/*.txt' --repeats 5

Reads the documents as a run does (``train.data.text.read_documents``), then times
``PackedTokens`` (tokenise every document, append eos, concatenate) and one pass of the first
``--batches`` train batches out of the grain pipeline. ``pack_s`` is the median over repeats.
The target this replaces as a unit test: the plays pack in well under 0.5 s with the byte tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", default=str(REPO_ROOT / "data" / "shakespeare" / "*.txt"), help="globs of documents")
    p.add_argument("--tokenizers", default="byte", help="comma-separated: 'byte' or tokenizer directories")
    p.add_argument("--repeats", type=int, default=5, help="packings per tokenizer (the median is reported)")
    p.add_argument("--batches", type=int, default=100, help="train batches of 16 x 64 to draw after packing")
    args = p.parse_args(argv)

    from train.config.sections import DataConfig
    from train.data.text import PackedTokens, read_documents, train_iterator
    from train.data.tokenizer import load_tokenizer

    docs, _ = read_documents(DataConfig(train_files=args.files, val_files="", val_fraction=0.0))
    for name in args.tokenizers.split(","):
        tokenizer = load_tokenizer(name)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            packed = PackedTokens(docs, tokenizer)
            times.append(time.perf_counter() - start)
        it = train_iterator(packed, seq_len=64, global_batch=16, seed=0, shuffle=True)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        batch_s = (time.perf_counter() - start) / args.batches
        print(
            json.dumps(
                {
                    "tokenizer": name,
                    "documents": len(docs),
                    "bytes": packed.num_bytes,
                    "tokens": packed.num_tokens,
                    "pack_s": round(statistics.median(times), 4),
                    "pack_mb_per_s": round(packed.num_bytes / 1e6 / statistics.median(times), 1),
                    "batch_ms": round(1000 * batch_s, 3),
                    "cpu_count": os.cpu_count(),
                    "load_1min": round(os.getloadavg()[0], 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
