"""CoNLL column files as token classification rows, in one tag scheme.

    EU NNP B-NP B-ORG          one word a line: the word first, the tag last (or data.tag_column),
    rejects VBD B-VP O         columns split on spaces or tabs
                               a blank line ends a sentence
    -DOCSTART- -X- -X- O       a document boundary, never a sentence

    rows = read_sentences(paths, cfg.data)   # Row per sentence: {'tokens', 'tags', 'doc', 'lines'}
    labels = conll_labels(train_rows)        # ['O', 'B-LOC', 'B-ORG', ...]: O first, then sorted

Tag schemes (``data.tag_scheme``): IOB2 and BIOES are trained and reported as they are; IOB1
(CoNLL-2003's original, where B- only separates two adjacent entities of one type) is rewritten
as IOB2, which has the same entities, so training, scores and predictions all use IOB2.
``auto`` takes BIOES when any tag starts with S- or E-, IOB1 when an entity starts with I-, and
IOB2 otherwise. Every error names the file and line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from train.config.sections import ConfigError, DataConfig
from train.data.files import Row, read_text

DOCSTART = "-DOCSTART-"
OUTSIDE = "O"


def _split_tag(tag: str) -> tuple[str, str]:
    """('B', 'PER') for 'B-PER', ('O', '') for 'O'; a tag without a known prefix is ('?', tag)."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if prefix in "BIES" and len(prefix) == 1 and kind else ("?", tag)


def read_sentences(paths: Sequence[str], cfg: DataConfig, need_tags: bool = True) -> list[Row]:
    """Every sentence of ``paths`` as a Row (``Row.line``: its first line) whose record holds
    ``tokens`` and ``tags`` (lists of str, tags in the run's scheme), ``doc`` ('file:n', the
    n-th document of the file) and ``lines`` (each word's line number). Without ``need_tags`` a
    file of words alone (one column) gives rows without ``tags``."""
    rows = []
    for path in paths:
        sentences = _file_sentences(path, cfg.tag_column, need_tags)
        tagged = sentences[0][3][0] is not None
        scheme = cfg.tag_scheme
        if tagged and scheme == "auto":
            scheme = detect_scheme([s[3] for s in sentences])
        for doc, lines, words, tags in sentences:
            record = {cfg.tokens_field: words, "doc": f"{os.path.basename(path)}:{doc}", "lines": lines}
            if tagged:
                record[cfg.tags_field] = _in_scheme(tags, scheme, path, lines)
            rows.append(Row(record, path, lines[0]))
    return rows


def _file_sentences(path: str, tag_column: int, need_tags: bool) -> list[tuple[int, list[int], list[str], list]]:
    """(document index, line numbers, words, tags) per sentence of one file; tags None in a file of
    words alone (one column), which only ``need_tags=False`` accepts."""
    text = _utf8(path)
    if not text.strip():
        raise ConfigError(f"data file '{path}' line 1: the file is empty; give CoNLL lines (word ... tag)")
    out, doc, columns = [], 0, None
    lines, words, tags = [], [], []

    def end() -> None:
        if words:
            out.append((doc, lines[:], words[:], tags[:]))
        lines.clear(), words.clear(), tags.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            end()
            continue
        if fields[0] == DOCSTART:
            end()
            doc += 1 if out else 0
            continue
        columns = columns or len(fields)
        if len(fields) != columns or (len(fields) < 2 and need_tags):
            raise ConfigError(
                f"data file '{path}' line {number}: {len(fields)} columns where the file's first line has "
                f"{columns}; give every word line the same columns (at least the word and its tag)"
            )
        if len(fields) > 1 and (not -len(fields) < tag_column < len(fields) or tag_column in (0, -len(fields))):
            raise ConfigError(
                f"data file '{path}' line {number}: data.tag_column={tag_column} but the line has "
                f"{len(fields)} columns (0 is the word, -1 the last); point data.tag_column at the tag column"
            )
        lines.append(number)
        words.append(fields[0])
        tags.append(fields[tag_column] if len(fields) > 1 else None)
    end()
    if not out:
        raise ConfigError(f"data file '{path}' line 1: the file holds no sentence; give CoNLL lines (word ... tag)")
    return out


def _utf8(path: str) -> str:
    """The file's text; ConfigError naming the line of the first byte that is not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return read_text(path)  # its one-line error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"data file '{path}' line {line} is not UTF-8 text; convert the file to UTF-8") from None


def detect_scheme(sentences: Sequence[Sequence[str]]) -> str:
    """'bioes', 'iob1' or 'iob2': the scheme the tag sequences are written in (module docstring)."""
    if any(_split_tag(t)[0] in "SE" for tags in sentences for t in tags):
        return "bioes"
    for tags in sentences:
        previous = (OUTSIDE, "")
        for tag in tags:
            prefix, kind = _split_tag(tag)
            if prefix == "I" and previous[1] != kind:
                return "iob1"
            previous = (prefix, kind)
    return "iob2"


def _in_scheme(tags: list[str], scheme: str, path: str, lines: list[int]) -> list[str]:
    """``tags`` checked against ``scheme`` and, for IOB1, rewritten as IOB2."""
    out, previous = [], (OUTSIDE, "")
    for i, (tag, line) in enumerate(zip(tags, lines)):
        prefix, kind = _split_tag(tag)
        if prefix == "?" or (prefix in "SE" and scheme != "bioes"):
            raise ConfigError(
                f"data file '{path}' line {line}: tag '{tag}' is not O or B-/I-"
                f"{'/E-/S-' if scheme == 'bioes' else ''}TYPE in data.tag_scheme={scheme}; fix the tag or the scheme"
            )
        continues = previous[0] in "BI" and previous[1] == kind
        if scheme == "iob1" and prefix == "I" and not continues:
            tag = f"B-{kind}"  # IOB1 starts an entity with I-; IOB2 with B-
        elif scheme == "bioes" and prefix in "IE" and not continues:
            raise ConfigError(
                f"data file '{path}' line {line}: '{tag}' follows '{tags[i - 1] if i else 'nothing'}'"
                f", which BIOES does not allow; fix the tags or data.tag_scheme"
            )
        elif scheme == "iob2" and prefix == "I" and not continues:
            raise ConfigError(
                f"data file '{path}' line {line}: '{tag}' starts an entity, which IOB2 writes B-{kind}; "
                "set data.tag_scheme=iob1 (or auto) or fix the tag"
            )
        out.append(tag)
        previous = (prefix if prefix not in "ES" else OUTSIDE, kind)
    return out


def conll_labels(rows: Sequence[Row], field: str = "tags") -> list[str]:
    """The label set of ``rows`` (the training sentences; tags in ``field``): O first, then the rest sorted."""
    tags = {t for r in rows for t in r.record.get(field, ())}
    return [OUTSIDE] + sorted(tags - {OUTSIDE})


def check_tags(rows: Sequence[Row], labels: Sequence[str], field: str = "tags") -> None:
    """ConfigError naming the file and line of the first tag of ``rows`` (in ``field``) outside ``labels``."""
    known = set(labels)
    for row in rows:
        for tag, line in zip(row.record.get(field, ()), row.record.get("lines", ())):
            if tag not in known:
                raise ConfigError(
                    f"data file '{row.path}' line {line}: tag '{tag}' is not in the label set ({', '.join(labels)}); "
                    "add it to data.labels or fix the tag"
                )


def read_tagged_files(paths: Sequence[str], cfg: DataConfig, need_tags: bool = True) -> list[Row]:
    """The sentences of ``paths``: JSONL rows where a file's first non-blank line is a JSON object,
    CoNLL sentences otherwise (so a run's CoNLL or JSONL data and either kind of --files read alike)."""
    from train.data.files import read_rows

    rows = []
    for path in paths:
        first = next((line for line in _utf8(path).splitlines() if line.strip()), "")
        rows += read_rows([path]) if first.lstrip().startswith("{") else read_sentences([path], cfg, need_tags)
    return rows
