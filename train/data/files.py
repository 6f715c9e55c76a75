"""The files a run reads: globs -> paths, UTF-8 text, JSONL rows; every error names the file and line."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence

from train.config.sections import ConfigError


def match_files(patterns: str, key: str) -> list[str]:
    """Comma-separated globs -> sorted, de-duplicated file paths; ``key`` names the config field."""
    files: set[str] = set()
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        matched = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
        if not matched:
            raise ConfigError(f"{key}='{patterns}' matches no file at '{pattern}'; point it at text files")
        files.update(os.path.normpath(f) for f in matched)
    if not files:
        raise ConfigError(f"{key}='{patterns}' matches no file; point it at text files")
    return sorted(files)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"data file '{path}' is not UTF-8 text; convert it or leave it out of the globs") from None
    except OSError as e:
        raise ConfigError(f"data file '{path}' cannot be read ({e.strerror}); fix its permissions") from None


@dataclasses.dataclass(frozen=True)
class Row:
    record: dict
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"data file '{self.path}' line {self.line}"

    @property
    def name(self) -> str:
        """A stable id ('train.jsonl:12') that decides whether the row is held out."""
        return f"{os.path.basename(self.path)}:{self.line}"


def read_rows(paths: Sequence[str]) -> list[Row]:
    """Every non-blank line of ``paths`` as a JSON object, in file and line order."""
    rows = []
    for path in paths:
        for number, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"data file '{path}' line {number} is not valid JSON ({e.msg}); fix or delete it"
                ) from None
            if not isinstance(record, dict):
                raise ConfigError(f"data file '{path}' line {number} is not a JSON object; write one object per line")
            rows.append(Row(record, path, number))
    return rows
