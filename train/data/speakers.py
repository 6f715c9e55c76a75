"""The speakers task: tag the speaker names and stage directions inside the running text of a play.

    python -m train.speakers --out data/speakers [--words 48] [--per-play 64] [--val-plays 4] [--val-per-play 160]

Each play (``data/shakespeare/*.txt``), from its first act, induction or prologue on, loses its
layout: lines are joined, brackets dropped, and the words (split at whitespace, punctuation kept)
are tagged in the BIO scheme. A speaker line (``HAMLET.``, ``Ber.``, ``FIRST WITCH.``) is one
``SPEAKER`` entity; a bracketed stage direction (``[Enter Kent, Gloster, and Edmund.]``, ``[Aside.]``,
``[To HELENA.]`` inside a speech, over several lines or not) is one ``STAGE`` entity; every other word
is ``O``. Act and scene headings and the scene's location line are left out. The words are cut at
line ends (never inside a direction) into passages of about ``--words`` words, ``--per-play`` of
them (``--val-per-play`` of a held-out play), evenly spaced, are kept per play, and ``train.jsonl`` / ``val.jsonl`` get one
``{"tokens", "tags", "play"}`` object per passage. Validation holds out whole plays (``--val-plays``,
picked by a hash of the file name as the genre task does). Train with ``configs/speakers-bert.yaml``.

A speaker line is a line after a blank line, before a line of speech, with at most five words,
starting with a capital, that ends with a period or is in capitals, and that stands so at least
twice in the play (the play's cast as its text uses it).
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import sys
from collections.abc import Iterator

from models.config import ConfigError
from train import cli
from train.data.split import held_out

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PLAYS = REPO_ROOT / "data" / "shakespeare"
PLAY_START = re.compile(r"^(ACT|INDUCTION|(THE )?PROLOGUE)\b", re.MULTILINE | re.IGNORECASE)
HEADING = re.compile(r"^(ACT|SCENE|Act|Scene)\s+([IVXLC]+|\d+)\b|^(?i:(THE )?(PROLOGUE|EPILOGUE|INDUCTION)\.?)$")
OPEN, CLOSE = "[{", "]}"  # '{Aside.]' occurs once: a typo for '['
LABELS = ("O", "B-SPEAKER", "I-SPEAKER", "B-STAGE", "I-STAGE")

Line = list[tuple[str, str]]  # (word, tag) per word of one source line


class SpeakersError(ValueError):
    """The plays cannot be read as asked; the message says which file and how to fix it."""


def _name_part(line: str) -> str:
    """A candidate speaker line without a trailing inline direction ('BEROWNE. [Aside.]' -> 'BEROWNE.')."""
    return re.split(r"[\[{]", line, maxsplit=1)[0].strip()


def _looks_like_name(name: str) -> bool:
    words = name.split()
    return 0 < len(words) <= 5 and name[0].isupper() and (name.endswith(".") or name == name.upper())


def speaker_names(lines: list[str]) -> set[str]:
    """The play's speaker lines (name part), as the module docstring defines them."""
    counts = collections.Counter()
    for i, line in enumerate(lines):
        before = lines[i - 1].strip() if i else ""
        after = lines[i + 1].strip() if i + 1 < len(lines) else ""
        name = _name_part(line)
        if not before and after and after[0] not in OPEN and not HEADING.match(name) and _looks_like_name(name):
            counts[name] += 1
    return {name for name, n in counts.items() if n >= 2}


def _segments(text: str, in_stage: bool) -> Iterator[tuple[str, bool]]:
    """(text, inside a direction) pieces of a line, split at brackets; the state carries across lines."""
    piece = ""
    for ch in text:
        if ch in OPEN or ch in CLOSE:
            yield piece, in_stage
            piece, in_stage = "", ch in OPEN
        else:
            piece += ch
    yield piece, in_stage


def tag_play(text: str) -> list[Line]:
    """The tagged words of a play, one list per source line that holds any (headings left out)."""
    start = PLAY_START.search(text)
    lines = text[start.start() if start else 0 :].splitlines()
    names = speaker_names(lines)
    out: list[Line] = []
    in_stage = after_heading = False
    entity_open = False  # the current direction already has its B- word
    for i, line in enumerate(lines):
        stripped = line.strip()
        before = lines[i - 1].strip() if i else ""
        if not in_stage and HEADING.match(stripped):
            after_heading = True
            continue
        name = _name_part(stripped)
        speaker = not in_stage and not before and name in names
        if after_heading and not in_stage and not speaker and stripped and stripped[0] not in OPEN:
            continue  # the scene's location ('An ante-chamber adjoining IMOGEN'S apartments.')
        if speaker or (stripped and stripped[0] in OPEN):
            after_heading = False
        words: Line = []
        rest = stripped
        if speaker:
            words += [(w, ("B-" if j == 0 else "I-") + "SPEAKER") for j, w in enumerate(name.split())]
            rest = stripped[len(name) :]
        for piece, stage in _segments(rest, in_stage):
            if not stage:
                entity_open = False
            for w in piece.split():
                words.append((w, ("I-" if entity_open else "B-") + "STAGE" if stage else "O"))
                entity_open = stage
            in_stage = stage
        if words:
            out.append(words)
    return out


def passages(lines: list[Line], words: int) -> list[Line]:
    """Consecutive lines joined into passages: a passage ends before the line that would take it past
    ``words`` words, unless a direction runs on into that line (a single longer line stands alone)."""
    out: list[Line] = []
    current: Line = []
    for line in lines:
        continues = line[0][1] == "I-STAGE"  # the line goes on with the previous line's direction
        if current and len(current) + len(line) > words and not continues:
            out.append(current)
            current = []
        current = current + line
    return out + [current] if current else out


def evenly(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return items
    return [items[(2 * i + 1) * len(items) // (2 * count)] for i in range(count)]


def build(
    plays: pathlib.Path = PLAYS, words: int = 48, per_play: int = 64, val_plays: int = 4, val_per_play: int = 160
) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows): ``{"tokens", "tags", "play"}`` per passage, plays in file-name order."""
    files = sorted(pathlib.Path(plays).glob("*.txt"))
    if len(files) <= val_plays:
        raise SpeakersError(f"{plays} holds {len(files)} plays, too few to hold out {val_plays}; lower --val-plays")
    held = {files[i].stem for i in held_out([f.name for f in files], val_plays / len(files))}
    train, val = [], []
    for path in files:
        keep = val_per_play if path.stem in held else per_play
        chosen = evenly(passages(_tagged_play(path), words), keep)
        rows = [{"tokens": [w for w, _ in p], "tags": [t for _, t in p], "play": path.stem} for p in chosen]
        (val if path.stem in held else train).extend(rows)
    return train, val


def _tagged_play(path: pathlib.Path) -> list[Line]:
    """``tag_play`` of the file ``path``; SpeakersError when it is not UTF-8 text or names no speaker."""
    try:
        lines = tag_play(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpeakersError(f"{path} is not UTF-8 text; give --plays a directory of plays as .txt files") from None
    if not any(tag == "B-SPEAKER" for line in lines for _, tag in line):
        raise SpeakersError(
            f"{path} is not a play: no speaker line (such as 'HAMLET.' after a blank line) occurs twice; "
            "give --plays a directory of plays as .txt files"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m train.speakers", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and val.jsonl")
    parser.add_argument("--plays", default=str(PLAYS), help="directory of one .txt file per play")
    parser.add_argument("--words", type=int, default=48, help="longest passage, in words")
    parser.add_argument("--per-play", type=int, default=64, help="passages kept per play (evenly spaced)")
    parser.add_argument("--val-per-play", type=int, default=160, help="passages kept per held-out play")
    parser.add_argument("--val-plays", type=int, default=4, help="plays held out whole for validation")
    try:
        args = parser.parse_args(argv)
        if args.words < 8 or min(args.per_play, args.val_per_play, args.val_plays) < 1:
            raise SpeakersError("--words must be at least 8, --per-play, --val-per-play and --val-plays at least 1")
        sizes = (args.words, args.per_play, args.val_plays, args.val_per_play)
        train, val = build(pathlib.Path(args.plays), *sizes)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
            (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    except (SpeakersError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = collections.Counter(t for r in val for t in r["tags"] if t.startswith("B-"))
    held = ", ".join(sorted({r["play"] for r in val}))
    print(
        f"wrote {out / 'train.jsonl'} ({len(train):,} passages) and {out / 'val.jsonl'} ({len(val):,} passages of "
        f"{held}: {counts['B-SPEAKER']:,} speaker names, {counts['B-STAGE']:,} stage directions)"
    )
    return 0
