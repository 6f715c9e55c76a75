"""The genre task: which kind of play (comedy, history, tragedy) a passage of Shakespeare comes from.

    python -m train.genre --out data/genre [--chars 256] [--val-plays 2]

Reads the plays (``data/shakespeare/*.txt``) and their First Folio genres
(``data/shakespeare/genres.tsv``), cuts each play from its first act (or induction, or
prologue: the title and cast list before it would give the answer away) into passages of at
most ``--chars`` characters at line ends, and writes ``train.jsonl`` / ``val.jsonl`` with one
``{"text", "label", "play"}`` object per passage. Validation holds out whole plays, the same
``--val-plays`` from each genre, picked by a hash of the file name so the split never changes.
A passage never spans two plays. Train with ``configs/genre-bert.yaml`` or ``genre-minilm.yaml``.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys

from train.data.split import held_out

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PLAYS = REPO_ROOT / "data" / "shakespeare"
TABLE = PLAYS / "genres.tsv"
PLAY_START = re.compile(r"^(ACT|INDUCTION|(THE )?PROLOGUE)\b", re.MULTILINE | re.IGNORECASE)


class GenreError(ValueError):
    """Plays and table do not fit together; the message says which file and how to fix it."""


def read_table(path: pathlib.Path = TABLE) -> dict[str, str]:
    """``file -> genre`` from a TSV of ``file<TAB>genre`` rows ('#' starts a comment line)."""
    table = {}
    for number, line in enumerate(pathlib.Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise GenreError(f"{path} line {number} is not 'file<TAB>genre'; fix that line")
        table[parts[0].strip()] = parts[1].strip()
    return table


def held_out_plays(table: dict[str, str], per_genre: int) -> list[str]:
    """The ``per_genre`` plays of each genre that rank first by SHA-256 of their file name, sorted."""
    by_genre = collections.defaultdict(list)
    for play, genre in table.items():
        by_genre[genre].append(play)
    held = []
    for genre, plays in sorted(by_genre.items()):
        if per_genre >= len(plays):
            raise GenreError(
                f"genre '{genre}' has {len(plays)} plays, too few to hold out {per_genre}; lower --val-plays"
            )
        held += [plays[i] for i in held_out(plays, per_genre / len(plays))]  # the SHA-256 rank runs use
    return sorted(held)


def passages(text: str, chars: int) -> list[str]:
    """The play from its first act / induction / prologue on, cut at line ends into passages of at
    most ``chars`` characters (a single longer line is a passage of its own), each stripped of
    surrounding whitespace; passages shorter than ``chars // 4`` (the last scraps) are dropped."""
    start = PLAY_START.search(text)
    lines = text[start.start() if start else 0 :].splitlines(keepends=True)
    out, current, size = [], [], 0
    for line in lines:
        if current and size + len(line) > chars:
            out.append("".join(current).strip())
            current, size = [], 0
        current.append(line)
        size += len(line)
    out.append("".join(current).strip())
    return [p for p in out if len(p) >= chars // 4]


def build(
    plays: pathlib.Path = PLAYS, table_path: pathlib.Path = TABLE, chars: int = 256, per_genre: int = 2
) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows): ``{"text", "label", "play"}`` per passage, plays in file-name order."""
    table = read_table(table_path)
    files = {p.name: p for p in sorted(pathlib.Path(plays).glob("*.txt"))}
    unlisted, missing = sorted(set(files) - set(table)), sorted(set(table) - set(files))
    if unlisted:
        raise GenreError(f"{plays / unlisted[0]} has no genre in {table_path}; add a '{unlisted[0]}<TAB>genre' row")
    if missing:
        raise GenreError(f"{table_path} names '{missing[0]}', which is not in {plays}; remove that row")
    held = set(held_out_plays(table, per_genre))
    train, val = [], []
    for name, path in files.items():
        rows = [{"text": p, "label": table[name], "play": path.stem} for p in passages(path.read_text(), chars)]
        (val if name in held else train).extend(rows)
    return train, val


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def majority_rate(rows: list[dict]) -> tuple[str, float]:
    """(most common label, its share of ``rows``): the accuracy of always guessing it."""
    label, count = collections.Counter(r["label"] for r in rows).most_common(1)[0]
    return label, count / len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.genre", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and val.jsonl")
    parser.add_argument("--plays", default=str(PLAYS), help="directory of one .txt file per play")
    parser.add_argument("--table", default=str(TABLE), help="TSV of file<TAB>genre")
    parser.add_argument("--chars", type=int, default=256, help="longest passage, in characters")
    parser.add_argument("--val-plays", type=int, default=2, help="plays held out from each genre")
    args = parser.parse_args(argv)
    try:
        if args.chars < 16 or args.val_plays < 1:
            raise GenreError("--chars must be at least 16 and --val-plays at least 1")
        train, val = build(pathlib.Path(args.plays), pathlib.Path(args.table), args.chars, args.val_plays)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "val.jsonl", val)
    except (GenreError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    label, rate = majority_rate(val)
    held = sorted({r["play"] for r in val})
    print(
        f"wrote {out / 'train.jsonl'} ({len(train):,} passages) and {out / 'val.jsonl'} ({len(val):,} passages "
        f"of {', '.join(held)}); always guessing '{label}' scores {rate:.1%} on val"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
