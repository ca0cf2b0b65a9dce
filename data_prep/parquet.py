"""Parquet input: documents from a column of strings, read by row group with pyarrow.

A Parquet file is cut into parts of whole row groups (`row_group_parts`), each read on its own: its pages are
streamed in batches of `BATCH_ROWS` rows through a buffered reader, so memory is bounded by a batch and a page,
whatever the size of the file or of a row group. The parts' byte spans cover the file from its first byte to its
last: the first holds the leading magic bytes, the last the footer (schema, row-group index), which every part's
reading depends on (data_prep.corpus makes a file's parts again together when its last part's bytes change).

The text column (`--text-field`, default "text") must be a top-level column of strings; a missing column, or a
nested or non-string one, is refused in one line naming the file and the columns it has. An optional title column
(`--title-field`: strings or integers, a document's title or id) names a document in the warnings about it.
A null text is counted (`ReadStats.null_texts`) and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.compressed import compression
from data_prep.errors import DataPrepError

log = logging.getLogger(__name__)

# Rows converted to Python strings at a time: a few MB of text for documents of a few kB.
BATCH_ROWS = 1024
# The reader streams a column chunk through a buffer of this size instead of reading it whole.
_BUFFER_BYTES = 1 << 20
# Per file, the first few null texts are logged one by one, the rest only counted.
_NULL_WARNINGS = 10
# Columns named in an error, at most.
_NAMED_COLUMNS = 20


@dataclass(frozen=True)
class Fields:
    """Which field of a record holds a document's text, and (optionally) its title or id, in JSON lines and
    Parquet inputs."""

    text: str = "text"
    title: str | None = None


DEFAULT_FIELDS = Fields()


@dataclass(frozen=True)
class RowGroupPart:
    """Row groups [first, stop) of a file, stored in bytes [start, end)."""

    first: int
    stop: int
    start: int
    end: int


def _pyarrow() -> Any:
    """pyarrow.parquet, imported on first use (runs without Parquet inputs do not load it)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # a dependency of the project; missing only in a broken environment
        raise DataPrepError(f"reading Parquet needs pyarrow ({exc}): pip install pyarrow") from None
    return pq


def open_parquet(path: Path) -> Any:
    """A pyarrow ParquetFile that streams its pages; one line naming the file if it is not Parquet."""
    if compression(path):
        raise DataPrepError(
            f"{path}: a compressed Parquet file cannot be read by row group (Parquet compresses its pages itself): "
            "decompress it"
        )
    pq = _pyarrow()
    try:
        return pq.ParquetFile(path, buffer_size=_BUFFER_BYTES, pre_buffer=False)
    except FileNotFoundError:
        raise DataPrepError(f"{path}: no such file or directory") from None
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataPrepError(f"{path}: not a readable Parquet file ({exc})") from None


def _columns(schema: Any) -> str:
    named = [f"{field.name} ({field.type})" for field in list(schema)[:_NAMED_COLUMNS]]
    more = len(schema) - len(named)
    return ", ".join(named) + (f" and {more} more" if more > 0 else "") if named else "none"


def _is_string(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    is_string_view = getattr(pa.types, "is_string_view", lambda _: False)  # (pyarrow 16 and later)
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_string_view(kind))


def _is_integer(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind))


def columns_to_read(path: Path, schema: Any, fields: Fields) -> list[str]:
    """The columns that hold the text (and the title), checked: top-level columns of strings (a title may also be
    an integer id). One line naming the file and its columns otherwise."""
    wanted: list[tuple[str, str, Callable[[Any], bool], str]] = [("--text-field", fields.text, _is_string, "strings")]
    if fields.title is not None:
        wanted.append(("--title-field", fields.title, lambda k: _is_string(k) or _is_integer(k), "strings or integers"))
    for flag, name, accepted, what in wanted:
        index = schema.get_field_index(name)
        if index < 0:
            why = "several columns" if name in schema.names else "no column"
            raise DataPrepError(f"{path}: {why} {name!r} ({flag}); columns: {_columns(schema)}")
        kind = schema.field(index).type
        if not accepted(kind):
            import pyarrow as pa

            nested = "a nested column" if pa.types.is_nested(kind) else "a column"
            raise DataPrepError(
                f"{path}: column {name!r} ({flag}) is {nested} of {kind}, not of {what}; columns: {_columns(schema)}"
            )
    return [name for _, name, _, _ in wanted]


def check_columns(path: Path, fields: Fields) -> None:
    """A Parquet file's text (and title) column checked, from its footer alone."""
    columns_to_read(path, open_parquet(path).schema_arrow, fields)


def _row_group_bytes(metadata: Any, index: int) -> tuple[int, int]:
    """Bytes [start, end) of row group `index`: from its first column chunk's first page to the end of its last."""
    group = metadata.row_group(index)
    start, end = None, 0
    for k in range(group.num_columns):
        chunk = group.column(k)
        first = chunk.data_page_offset
        if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
            first = min(first, chunk.dictionary_page_offset)
        start = first if start is None else min(start, first)
        end = max(end, first + chunk.total_compressed_size)
    return (start or 0), end


def row_group_parts(path: Path, fields: Fields, part_bytes: int) -> list[RowGroupPart]:
    """The file in parts of consecutive row groups of about `part_bytes` stored bytes (a bigger row group is a part
    of its own), their spans covering the file: the first from byte 0, the last to its end (the footer). The
    columns are checked first. A file whose row groups are not stored in order, or that has none, is one part."""
    parquet = open_parquet(path)
    columns_to_read(path, parquet.schema_arrow, fields)
    metadata = parquet.metadata
    size = path.stat().st_size
    spans = [_row_group_bytes(metadata, i) for i in range(metadata.num_row_groups)]
    if not spans or any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        return [RowGroupPart(0, len(spans), 0, size)]
    firsts = [0]
    for i in range(1, len(spans)):
        if spans[i][1] - spans[firsts[-1]][0] > part_bytes:
            firsts.append(i)
    starts = [0] + [spans[i][0] for i in firsts[1:]]
    stops = firsts[1:] + [len(spans)]
    ends = starts[1:] + [size]
    return [RowGroupPart(*values) for values in zip(firsts, stops, starts, ends)]


def iter_texts(
    path: Path, fields: Fields, row_groups: tuple[int, int] | None = None
) -> Iterator[tuple[str | None, str]]:
    """(text or None for a null, where) of each row of row groups [first, stop) of the file (all of them when
    None), in order; `where` names the row ("row 17", with its title when there is one) for messages."""
    parquet = open_parquet(path)
    columns = columns_to_read(path, parquet.schema_arrow, fields)
    metadata = parquet.metadata
    first, stop = row_groups if row_groups is not None else (0, metadata.num_row_groups)
    if first >= stop:
        return
    row = sum(metadata.row_group(i).num_rows for i in range(first))
    batches = parquet.iter_batches(
        batch_size=BATCH_ROWS, row_groups=list(range(first, stop)), columns=columns, use_threads=False
    )
    try:
        for batch in batches:
            texts = batch.column(0).to_pylist()
            titles = batch.column(1).to_pylist() if len(columns) > 1 else None
            for k, text in enumerate(texts):
                where = f"row {row + k}" + (f" ({fields.title} {titles[k]!r})" if titles is not None else "")
                yield text, where
            row += len(texts)
    except UnicodeDecodeError as exc:
        raise DataPrepError(f"{path}: row {row} or after: a string that is not UTF-8 ({exc})") from None
    except (OSError, ValueError) as exc:  # a damaged page: pyarrow's ArrowIOError or ArrowInvalid
        raise DataPrepError(f"{path}: cannot read the data of row {row} or after ({exc})") from None


class NullTexts:
    """Counts a file's null texts, logging the first few (with the row and title)."""

    def __init__(self, path: Path, field: str):
        self.path, self.field, self.count = path, field, 0

    def add(self, where: str) -> None:
        self.count += 1
        if self.count <= _NULL_WARNINGS:
            log.warning("%s: %s: %r is null, row skipped", self.path, where, self.field)
        if self.count == _NULL_WARNINGS:
            log.warning("%s: further null texts are counted but not logged", self.path)
