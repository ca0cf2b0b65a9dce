"""Labelled text sets for `albert-finetune`: TSV/CSV with a header, JSON lines, fastText `__label__X text` lines.

The format comes from the extension (.tsv/.tab, .csv, .jsonl/.ndjson/.json) or, for any other name, from the first
non-blank line (`__label__` -> fastText, `{` -> JSON lines, a tab -> TSV, a comma -> CSV). Labels are kept as
strings ("1" and "pos" alike); `class_order` sorts them (numerically when all are integers). Files are read as
UTF-8 (a BOM is dropped); a file that is not valid UTF-8 is read as Windows-1252, with a warning.

Every problem is a `LabelledDataError` whose one-line message names the file (and the line where there is one).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

FORMATS = ("tsv", "csv", "jsonl", "fasttext")
EXTENSIONS = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
FASTTEXT_PREFIX = "__label__"


class LabelledDataError(ValueError):
    """Bad labelled data or settings; the message names the file and the problem, on one line."""


@dataclass(frozen=True)
class Columns:
    """Which columns (TSV/CSV) or fields (JSON lines) hold the text, the optional second text and the label."""

    text: str = "text"
    label: str = "label"
    pair: str | None = None


@dataclass
class LabelledSet:
    path: Path
    format: str
    texts: list[str]
    labels: list[str]
    pairs: list[str] | None  # the second text of sentence-pair tasks
    lines: list[int]  # the line each example starts on, for messages

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> Counter:
        return Counter(self.labels)


def class_order(labels) -> list[str]:
    """The distinct labels in the order their class ids take: numeric when every label is an integer, else sorted."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def read_labelled(path: str | Path, columns: Columns = Columns(), fmt: str = "auto") -> LabelledSet:
    """Read a labelled file; `fmt` is one of FORMATS or "auto"."""
    path = Path(path)
    if not path.is_file():
        raise LabelledDataError(f"{path}: no such file")
    text = _decode(path)
    if not text.strip():
        raise LabelledDataError(f"{path}: empty file")
    if fmt == "auto":
        fmt = detect_format(path, text)
    elif fmt not in FORMATS:
        raise LabelledDataError(f"{path}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt == "fasttext":
        if columns.pair is not None:
            raise LabelledDataError(
                f"{path}: fastText lines hold one text; sentence pairs (--text-pair-column) need TSV, CSV or JSON lines"
            )
        data = _read_fasttext(path, text)
    elif fmt == "jsonl":
        data = _read_jsonl(path, text, columns)
    else:
        data = _read_table(path, text, columns, "\t" if fmt == "tsv" else ",")
    if not data.texts:
        raise LabelledDataError(f"{path}: no examples (only a header or blank lines)")
    return data


def detect_format(path: Path, text: str) -> str:
    if (ext := EXTENSIONS.get(path.suffix.lower())) is not None:
        return ext
    first = next(line for line in text.splitlines() if line.strip())
    if first.lstrip().startswith(FASTTEXT_PREFIX):
        return "fasttext"
    if first.lstrip().startswith("{"):
        return "jsonl"
    if "\t" in first:
        return "tsv"
    if "," in first:
        return "csv"
    raise LabelledDataError(
        f"{path}: cannot tell the format from the name or the first line (expected TSV or CSV with a header, "
        f"JSON lines, or fastText '{FASTTEXT_PREFIX}X text' lines)"
    )


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        log.warning("%s: not UTF-8 (byte 0x%02x at offset %d); reading it as Windows-1252", path, raw[e.start], e.start)
        return raw.decode("cp1252", errors="replace")


def _label(path: Path, line: int, value) -> str:
    """A label as a string: JSON numbers and booleans the way they are written ("1", "true")."""
    if isinstance(value, str):
        if not value.strip():
            raise LabelledDataError(f"{path}: line {line} has an empty label")
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    elif isinstance(value, int):
        return str(value)
    elif isinstance(value, float) and value.is_integer():
        return str(int(value))
    elif isinstance(value, float):
        return repr(value)
    raise LabelledDataError(f"{path}: line {line}: the label is {json.dumps(value)}, not a class name")


def _read_fasttext(path: Path, text: str) -> LabelledSet:
    texts, labels, lines = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        tags = []
        while words and words[0].startswith(FASTTEXT_PREFIX):
            tags.append(words.pop(0)[len(FASTTEXT_PREFIX) :])
        if not tags or not tags[0]:
            raise LabelledDataError(f"{path}: line {number} has no {FASTTEXT_PREFIX}X label at its start")
        if len(tags) > 1:
            raise LabelledDataError(
                f"{path}: line {number} has {len(tags)} labels; multi-label lines are not supported"
            )
        texts.append(" ".join(words))
        labels.append(tags[0])
        lines.append(number)
    return LabelledSet(path, "fasttext", texts, labels, None, lines)


def _missing(path: Path, what: str, names: list[str], available) -> LabelledDataError:
    return LabelledDataError(
        f"{path}: no {what} {', '.join(repr(n) for n in names)} (the file has: {', '.join(available) or 'none'})"
    )


def _read_jsonl(path: Path, text: str, columns: Columns) -> LabelledSet:
    wanted = [c for c in (columns.text, columns.pair, columns.label) if c is not None]
    texts, pairs, labels, lines = [], [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LabelledDataError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise LabelledDataError(f"{path}: line {number} is not a JSON object")
        if missing := [c for c in wanted if c not in record]:
            what = "field" if len(missing) == 1 else "fields"
            raise _missing(path, f"{what} (line {number})", missing, record)
        texts.append(_text(path, number, record[columns.text], columns.text))
        if columns.pair is not None:
            pairs.append(_text(path, number, record[columns.pair], columns.pair))
        labels.append(_label(path, number, record[columns.label]))
        lines.append(number)
    return LabelledSet(path, "jsonl", texts, labels, pairs if columns.pair is not None else None, lines)


def _text(path: Path, line: int, value, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise LabelledDataError(f"{path}: line {line}: {name!r} is {type(value).__name__}, not text")


def _read_table(path: Path, text: str, columns: Columns, delimiter: str) -> LabelledSet:
    # TSV as GLUE writes it: no quoting (quotes are text); CSV with the usual double-quote escaping.
    quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    kind = "TSV" if delimiter == "\t" else "CSV"
    header = next(([cell.strip() for cell in row] for row in reader if any(cell.strip() for cell in row)), None)
    if header is None:  # read_labelled refuses blank files; a CSV line of empty quoted cells gets here
        raise LabelledDataError(f"{path}: no {kind} header line (every line is blank)")
    wanted = [c for c in (columns.text, columns.pair, columns.label) if c is not None]
    if missing := [c for c in wanted if c not in header]:
        raise _missing(path, f"{kind} column" + ("s" if len(missing) > 1 else ""), missing, header)
    column_index = {c: header.index(c) for c in wanted}
    texts, pairs, labels, lines = [], [], [], []
    start = reader.line_num + 1
    for row in reader:
        number, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise LabelledDataError(f"{path}: line {number} has {len(row)} {kind} fields, the header has {len(header)}")
        texts.append(row[column_index[columns.text]])
        if columns.pair is not None:
            pairs.append(row[column_index[columns.pair]])
        labels.append(_label(path, number, row[column_index[columns.label]]))
        lines.append(number)
    return LabelledSet(path, kind.lower(), texts, labels, pairs if columns.pair is not None else None, lines)
