"""The shipped speakers task as CoNLL sentences: CoNLL-2003's shape (short sentences, documents).

    PYTHONPATH=. python benchmarks/conll_sentences.py /tmp/conll     # writes train.conll, val.conll

Each passage of data/speakers/{train,val}.jsonl becomes a ``-DOCSTART-`` document cut into
sentences after every word that ends in ``.``, ``?`` or ``!`` (never inside an entity), one
``word tag`` line per word. benchmarks/packing.py reads them with ``data.format=conll`` to measure
packing where examples are far shorter than a row, as on the NER corpora users bring.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ENDS = (".", "?", "!")


def sentences(words: list[str], tags: list[str]) -> list[list[tuple[str, str]]]:
    """One passage's (word, tag) pairs cut after sentence-ending words outside entities."""
    out, current = [], []
    for i, pair in enumerate(zip(words, tags)):
        current.append(pair)
        next_inside = i + 1 < len(tags) and tags[i + 1].startswith("I-")
        if pair[0].endswith(ENDS) and not next_inside:
            out, current = [*out, current], []
    return [*out, current] if current else out


def write(source: pathlib.Path, target: pathlib.Path) -> list[int]:
    """Writes ``target`` from a speakers JSONL file; returns every sentence's length in words."""
    lengths, lines = [], []
    for row in map(json.loads, source.read_text().splitlines()):
        lines += ["-DOCSTART- O", ""]
        for sentence in sentences(row["tokens"], row["tags"]):
            lines += [f"{w} {t}" for w, t in sentence] + [""]
            lengths.append(len(sentence))
    target.write_text("\n".join(lines) + "\n")
    return lengths


def main(out: str) -> None:
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        lengths = write(REPO_ROOT / "data" / "speakers" / f"{split}.jsonl", folder / f"{split}.conll")
        summary = {"split": split, "sentences": len(lengths), "mean_words": round(statistics.mean(lengths), 1)}
        print(json.dumps(summary | {"p99_words": sorted(lengths)[int(0.99 * len(lengths))]}))


if __name__ == "__main__":
    main(sys.argv[1])
