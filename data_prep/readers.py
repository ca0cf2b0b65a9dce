"""Corpus readers: every input format becomes a stream of documents (lists of sentences).

Reading happens in two stages so that `corpus --workers N` can parallelise the expensive
half: `iter_raw_documents` does the cheap, sequential part (reading files, decoding,
parsing XML/JSON, skipping non-articles) and yields `RawDocument`s; `process_raw` does the
expensive part (wiki markup cleaning, sentence splitting) and can run in a worker process.
`iter_documents` chains the two in-process; the "docs" format has its own fast path.

Everything streams: at most one document (plus one read chunk) is held in memory. Compressed
inputs (.gz, .bz2, .xz) are read through their compression in every text format. Parquet (data_prep.parquet)
is read by row group, in batches of rows. JSON lines and Parquet take a document's text from a named field
(`Fields`: "text" by default).

Text is UTF-8, or UTF-16 or UTF-32 (LE or BE) when the file starts with that byte-order mark; a byte-order
mark is never part of the text. A UTF-16 or UTF-32 file is read whole, as one range (docs_pieces). A file
without a mark that looks like UTF-16 or UTF-32 is refused, naming the encoding. Text that does not decode is
refused, not silently turned into documents: a NUL character (binary data), or undecodable bytes beyond
`BAD_BYTES_FRACTION` of what was read, end the read with the file and the byte offset of the first offending
byte. `allow_bad_bytes=True` replaces them and counts instead.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from data_prep.compressed import DECOMPRESSION_ERRORS, compression, decompression_error, open_input, without_compression
from data_prep.errors import DataPrepError
from data_prep.parquet import DEFAULT_FIELDS, Fields, NullTexts, iter_texts
from data_prep.sentences import (
    MAX_SENTENCE_CHARS,
    cut_long,
    normalize_whitespace,
    split_off,
    split_sentences_counted,
)
from data_prep.wiki import clean_wikitext, iter_pages, skip_reason

log = logging.getLogger(__name__)

FORMATS = ("auto", "docs", "paragraphs", "files", "wiki", "jsonl", "parquet")

# Bytes decoded per read: large enough that per-call overhead vanishes, small enough that a
# file without newlines never sits in memory whole. One character beyond U+FFFF makes Python
# store the whole decoded chunk at 4 bytes per character, so a chunk costs up to 4x its size.
CHUNK_BYTES = 256 << 10
# Lines of the other text formats longer than this are read in pieces (and counted); a JSON
# line longer than this is rejected as a bad line.
MAX_LINE_CHARS = 16 << 20
# Undecodable bytes tolerated before a text file is refused as not UTF-8: a UTF-8 file with stray
# bytes from another encoding (a mis-pasted name, a web page's mojibake) has a few per 10,000;
# Latin-1 or cp1252 prose has one per non-ASCII letter (1-3% in French or German), other 8-bit
# encodings 20-80% and random or binary data about half its bytes. The fraction is judged from
# _BAD_BYTES_SAMPLE bytes on (or at the end of a smaller file) so that one stray byte at the
# start of a file is not a verdict.
BAD_BYTES_FRACTION = 0.01
_BAD_BYTES_SAMPLE = 64 << 10
_ALLOW_HINT = "--allow-bad-bytes reads it anyway, replacing undecodable bytes"
# Per file, the first few bad JSON lines are logged one by one, the rest only counted.
_BAD_JSON_WARNINGS = 10
# A JSON lines file whose first this many JSON objects all lack the text field (as a key) is refused, naming the
# keys they have: the field is misnamed, not missing from a few records.
FIELD_PROBE_OBJECTS = 100
_NAMED_KEYS = 20

_BLANK_LINES_RE = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass
class ReadStats:
    """What the readers saw. Counters only, so stats from workers or files add up with `+=`."""

    files: int = 0
    bytes: int = 0  # input file sizes on disk (compressed size for .bz2)
    documents: int = 0  # non-empty documents yielded
    sentences: int = 0
    empty_files: int = 0  # zero bytes or only whitespace: skipped
    empty_documents: int = 0  # no sentence left after cleaning: skipped
    replaced_chars: int = 0  # undecodable byte sequences replaced by U+FFFD
    # input lines cut into pieces: docs lines over MAX_SENTENCE_CHARS (each piece becomes a
    # sentence), lines of other text formats over MAX_LINE_CHARS (read in pieces)
    long_lines_split: int = 0
    long_sentences_split: int = 0  # sentences over MAX_SENTENCE_CHARS, cut at whitespace
    bad_json_lines: int = 0  # jsonl: unparsable, or without a string in the text field: skipped
    null_texts: int = 0  # parquet: rows whose text is null: skipped
    skipped_pages: int = 0  # wiki: redirects, disambiguation pages, ns != 0

    def merge(self, other: ReadStats) -> ReadStats:
        for f in fields(ReadStats):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def __iadd__(self, other: ReadStats) -> ReadStats:
        return self.merge(other)


@dataclass(frozen=True, slots=True)
class RawDocument:
    """One document before the expensive processing, small and picklable for a worker."""

    kind: str  # SENTENCES (ready), PROSE (blank-line separated paragraphs), WIKITEXT
    payload: str | tuple[str, ...]


SENTENCES, PROSE, WIKITEXT = "sentences", "prose", "wikitext"


# --- undecodable bytes ----------------------------------------------------------------------
# A codec error handler that behaves like errors="replace" but counts. Handlers are global,
# so the count goes to whichever reader the current thread is decoding for.
_active = threading.local()


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    reader = getattr(_active, "reader", None)
    if reader is not None:
        reader.undecodable(exc.start, exc.end)
    return "\ufffd", exc.end


_ERRORS = "data_prep.count_replace"
codecs.register_error(_ERRORS, _count_and_replace)


def _where(path: Path, offset: int) -> str:
    return f"byte offset {offset}" + (" of the decompressed data" if compression(path) else "")


# --- encodings ------------------------------------------------------------------------------
# Text is UTF-8 unless it starts with a byte-order mark naming UTF-16 or UTF-32. UTF-32-LE's mark begins with
# UTF-16-LE's, so it is tried first (a UTF-16 file cannot start with U+0000 and be text).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
BOM_BYTES = 4  # enough of a file's start to recognise any of them


@dataclass(frozen=True)
class Encoding:
    """How a text file is decoded: `codec` (Python's name), the length of its byte-order mark (0: none) and its
    code unit in bytes (a UTF-16 or UTF-32 file can only be cut between code units)."""

    codec: str
    bom: int = 0

    @property
    def unit(self) -> int:
        return {"utf-16-le": 2, "utf-16-be": 2, "utf-32-le": 4, "utf-32-be": 4}.get(self.codec, 1)

    @property
    def name(self) -> str:
        return self.codec.upper()

    @property
    def iconv_name(self) -> str:
        """As iconv spells it: UTF-16LE."""
        return self.name.replace("-LE", "LE").replace("-BE", "BE")


UTF8 = Encoding("utf-8")


def sniff_encoding(head: bytes) -> Encoding:
    """The encoding of text whose first bytes (BOM_BYTES or more, fewer only for a shorter file) are `head`."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return Encoding(codec, len(bom))
    return UTF8


def file_encoding(path: Path) -> Encoding:
    """The encoding of a file, from its first bytes (decompressed, for a compressed file)."""
    with open_input(path) as stream:
        try:
            head = stream.read(BOM_BYTES)
        except DECOMPRESSION_ERRORS as exc:
            if compression(path) is None:
                raise DataPrepError(f"{path}: cannot read ({exc})") from None
            raise decompression_error(path, exc) from None
    return sniff_encoding(head)


# Without a byte-order mark, ASCII-range text in UTF-16 or UTF-32 has a zero byte at the same place of nearly every
# code unit, and (characters U+0100, U+0200, ... being rare) almost never at the other; binary data and UTF-8 text
# have no such pattern. Judged on the first _GUESS_BYTES bytes of a file that holds a NUL byte there.
_GUESS_BYTES = 4096
_GUESSES = (("utf-32-le", (2, 3), 0), ("utf-32-be", (0, 1), 3), ("utf-16-le", (1,), 0), ("utf-16-be", (0,), 1))


def _zero_share(sample: bytes, unit: int, k: int) -> float:
    """The share of the `unit`-byte units of `sample` whose byte `k` is zero."""
    units = len(sample) // unit
    return sample[k : units * unit : unit].count(0) / units


def _guess_without_bom(head: bytes) -> Encoding | None:
    """The UTF-16 or UTF-32 codec that `head`, the start of a file without a byte-order mark, looks like, or None."""
    sample = head[:_GUESS_BYTES]
    for codec, zero_at, nonzero_at in _GUESSES:
        unit = Encoding(codec).unit
        if len(sample) < 16 * unit:
            continue
        if all(_zero_share(sample, unit, k) > 0.5 for k in zero_at) and _zero_share(sample, unit, nonzero_at) < 0.02:
            return Encoding(codec)
    return None


class _Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _Text:
    """Reads a text file in chunks, with universal newlines, counting replaced bytes and refusing binary or
    undecodable data (see BAD_BYTES_FRACTION) unless `allow_bad_bytes`. The encoding is UTF-8 unless the file
    starts with a UTF-16 or UTF-32 byte-order mark; any byte-order mark is dropped, not read as text. `at_start`:
    the stream starts at the file's start (where a byte-order mark is looked for); else it is a piece of a UTF-8
    file (a UTF-16 or UTF-32 one is never cut) and `base` is the file offset of its first byte, for the offsets
    in messages."""

    def __init__(
        self,
        stream: _Readable,
        stats: ReadStats,
        path: Path,
        at_start: bool = True,
        base: int = 0,
        allow_bad_bytes: bool = False,
    ):
        self._stream = stream
        self._stats = stats
        self._path = path
        self._at_start = at_start
        self._allow = allow_bad_bytes
        self._use(UTF8)
        self._pending_cr = False
        self._consumed = base  # file offset of the next byte to read
        self._call_base = base  # file offset of the decoder's input in the current call
        self._bad_bytes = 0
        self._first_bad: int | None = None

    def _use(self, encoding: Encoding) -> None:
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding.codec)(errors=_ERRORS)

    def undecodable(self, start: int, end: int) -> None:
        self._stats.replaced_chars += 1
        self._bad_bytes += end - start
        if self._first_bad is None:
            self._first_bad = self._call_base + start

    def _first_nul(self, data: bytes, offset: int) -> int:
        """Index in `data` (at file offset `offset`) of the first NUL character, or -1: a zero byte in UTF-8, a
        zero code unit (at a file offset that is a multiple of the unit) in UTF-16 and UTF-32."""
        unit = self._encoding.unit
        zero = bytes(unit)
        i = data.find(zero)
        while i >= 0 and (offset + i) % unit:
            i = data.find(zero, i + 1)
        return i

    def _start(self, data: bytes) -> bytes:
        """The first bytes of the file: its byte-order mark chooses the encoding and is dropped. A file without one
        that looks like UTF-16 or UTF-32 is refused (even with `allow_bad_bytes`: it would become NUL-laden text)."""
        self._at_start = False
        encoding = sniff_encoding(data[:BOM_BYTES])
        self._use(encoding)
        if encoding.bom:
            self._consumed += encoding.bom
            return data[encoding.bom :]
        if b"\0" in data[:_GUESS_BYTES] and (guess := _guess_without_bom(data)):
            raise DataPrepError(
                f"{self._path}: no byte-order mark, but the text looks like {guess.name} (a zero byte in every "
                f"{guess.unit}-byte unit): convert it to UTF-8 (iconv -f {guess.iconv_name} -t UTF-8) or add a "
                "byte-order mark"
            )
        return data

    def _check(self, data: bytes, read_before: int, at_end: bool) -> None:
        if self._allow:
            return
        nul = self._first_nul(data, read_before)
        if nul >= 0:
            what = "NUL byte" if self._encoding.unit == 1 else f"NUL character ({self._encoding.name})"
            raise DataPrepError(
                f"{self._path}: {what} at {_where(self._path, read_before + nul)}: binary data, not text ({_ALLOW_HINT})"
            )
        seen = self._consumed
        first = self._first_bad  # (set once there is a bad byte)
        if first is not None and (seen >= _BAD_BYTES_SAMPLE or at_end) and self._bad_bytes > BAD_BYTES_FRACTION * seen:
            raise DataPrepError(
                f"{self._path}: {self._bad_bytes} undecodable bytes in the first {seen} bytes (more than "
                f"{BAD_BYTES_FRACTION:.0%}), the first at {_where(self._path, first)}: not "
                f"{self._encoding.name} text ({_ALLOW_HINT})"
            )

    def read(self) -> str:
        """The next non-empty chunk of text, or '' at the end of the file."""
        while True:
            try:
                raw = self._stream.read(CHUNK_BYTES)
            except DECOMPRESSION_ERRORS as exc:
                if compression(self._path) is None:
                    raise DataPrepError(f"{self._path}: cannot read ({exc})") from None
                raise decompression_error(self._path, exc) from None
            at_end = not raw
            data = self._start(raw) if self._at_start and raw else raw
            read_before = self._consumed
            self._call_base = read_before - len(self._decoder.getstate()[0])
            self._consumed += len(data)
            _active.reader = self
            try:
                text = self._decoder.decode(data, final=at_end)
            finally:
                _active.reader = None
            self._check(data, read_before, at_end)
            if self._pending_cr:
                text = "\r" + text
                self._pending_cr = False
            if not at_end and text.endswith("\r"):  # may be the first half of a "\r\n"
                text = text[:-1]
                self._pending_cr = True
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text or at_end:
                return text


def _lines(text: _Text, bound: int) -> Iterator[tuple[str, bool]]:
    """(piece, complete) for each line, without its newline. A line longer than `bound`
    comes in several pieces, all but the last with complete=False."""
    tail = ""
    while chunk := text.read():
        lines = (tail + chunk).split("\n") if tail else chunk.split("\n")
        tail = lines.pop()
        for line in lines:
            yield line, True
        if len(tail) > bound:
            yield tail, False
            tail = ""
    if tail:
        yield tail, True


# --- inputs ---------------------------------------------------------------------------------


# Wikipedia's part files: enwiki-latest-pages-articles1.xml-p1p41242.bz2 (".xml-p<first>p<last>")
_WIKI_PART = re.compile(r"\.xml-p\d+p\d+$")


def detect_format(path: Path) -> str:
    """By extension, looking through a compression suffix: .xml (and Wikipedia's part files, .xml-pNpM) wiki,
    .jsonl/.json jsonl, .parquet parquet, else docs."""
    name = without_compression(path.name.lower())
    if name.endswith(".xml") or _WIKI_PART.search(name):
        return "wiki"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "docs"


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files, and the files under directories (recursive, sorted, hidden ones skipped),
    deduplicated, in the order given. Checked before any work starts."""
    result: list[Path] = []
    seen: set[Path] = set()
    given = [Path(p) for p in paths]
    if not given:
        raise DataPrepError("no input paths given")
    for path in given:  # all checked before any directory is walked
        if not path.exists():
            raise DataPrepError(f"{path}: no such file or directory")
    for path in given:
        if path.is_dir():
            found = _walk(path)
            if not found:
                raise DataPrepError(f"{path}: directory holds no input files (hidden files are skipped)")
        else:
            found = [path]
        for file in found:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                result.append(file)
    return result


def _walk(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(found)


def _check_format(path: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataPrepError(f"{path}: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    return detect_format(path) if fmt == "auto" else fmt


def _open_raw(path: Path):
    """The file's bytes as stored (seekable; for byte ranges of uncompressed files)."""
    if compression(path):
        raise ValueError(f"{path}: byte ranges are for uncompressed files")
    return open_input(path)


def _start_file(path: Path, stats: ReadStats) -> bool:
    """Count the file; False when it is empty (zero bytes) and should be skipped."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataPrepError(f"{path}: no such file or directory") from None
    stats.files += 1
    stats.bytes += size
    if size == 0:
        stats.empty_files += 1
        log.debug("%s: empty file, skipped", path)
        return False
    return True


# --- readers --------------------------------------------------------------------------------


def iter_documents(
    path: Path,
    fmt: str = "auto",
    stats: ReadStats | None = None,
    piece: tuple[int, int] | None = None,
    allow_bad_bytes: bool = False,
    fields: Fields = DEFAULT_FIELDS,
    row_groups: tuple[int, int] | None = None,
) -> Iterator[list[str]]:
    """Documents of one file, each a non-empty list of non-empty sentences (no newlines). `piece`: a byte
    range to read instead of the whole file, from docs_pieces() for the "docs" format or from
    wiki.stream_ranges() for a multistream wiki dump; `row_groups`: row groups [first, stop) of a Parquet file
    (data_prep.parquet.row_group_parts). `allow_bad_bytes`: replace and count undecodable bytes (and keep NUL
    bytes) instead of refusing the file. `fields`: the text (and title) field of JSON lines and Parquet."""
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    if _check_format(path, fmt) == "docs":
        yield from _docs(path, stats, piece, allow_bad_bytes)
        return
    for raw in iter_raw_documents(path, fmt, stats, piece, allow_bad_bytes, fields, row_groups):
        sentences, cut = process_raw(raw)
        if count_document(sentences, cut, stats):
            yield sentences


def iter_raw_documents(
    path: Path,
    fmt: str = "auto",
    stats: ReadStats | None = None,
    piece: tuple[int, int] | None = None,
    allow_bad_bytes: bool = False,
    fields: Fields = DEFAULT_FIELDS,
    row_groups: tuple[int, int] | None = None,
) -> Iterator[RawDocument]:
    """The cheap, sequential stage: documents of one file (or of `piece` or `row_groups` of it, see
    iter_documents) before cleaning and splitting."""
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    fmt = _check_format(path, fmt)
    if piece is not None and fmt not in ("docs", "wiki"):
        raise ValueError("byte ranges are for the docs and wiki formats only")
    if row_groups is not None and fmt != "parquet":
        raise ValueError("row groups are for the parquet format only")
    if fmt == "docs":
        # Counted here as documents come ready-made; count_document() must not see them.
        for doc in _docs(path, stats, piece, allow_bad_bytes):
            yield RawDocument(SENTENCES, tuple(doc))
    elif fmt == "wiki":
        yield from _wiki(path, stats, piece)
    elif fmt == "jsonl":
        yield from _jsonl(path, stats, allow_bad_bytes, fields)
    elif fmt == "parquet":
        yield from _parquet(path, stats, fields, row_groups)
    else:
        yield from _prose(path, stats, per_file=(fmt == "files"), allow_bad_bytes=allow_bad_bytes)


def process_raw(raw: RawDocument) -> tuple[list[str], int]:
    """The expensive stage: (sentences, number of over-long sentences that were cut)."""
    if raw.kind == SENTENCES:
        return list(raw.payload), 0
    if raw.kind == WIKITEXT:
        paragraphs = clean_wikitext(cast(str, raw.payload))
    else:
        paragraphs = _BLANK_LINES_RE.split(cast(str, raw.payload))
    sentences: list[str] = []
    cut = 0
    for paragraph in paragraphs:
        split, n = split_sentences_counted(paragraph)
        sentences.extend(split)
        cut += n
    return sentences, cut


def count_document(sentences: list[str], cut: int, stats: ReadStats) -> bool:
    """Account for one processed (non-"docs") document; False when it is empty and skipped."""
    stats.long_sentences_split += cut
    if not sentences:
        stats.empty_documents += 1
        return False
    stats.documents += 1
    stats.sentences += len(sentences)
    return True


def _add_line(doc: list[str], line: str, bound: int, stats: ReadStats) -> None:
    """A stripped, non-empty line of a docs file; an absurdly long one is cut into bounded pieces."""
    if len(line) > bound:
        stats.long_lines_split += 1
        doc.extend(cut_long(normalize_whitespace(line), bound))
    else:
        doc.append(line)


class _Range:
    """A binary file read from `start` up to `stop` only."""

    def __init__(self, stream: BinaryIO, start: int, stop: int):
        stream.seek(start)
        self._stream, self._left = stream, stop - start

    def read(self, n: int) -> bytes:
        data = self._stream.read(min(n, self._left))
        self._left -= len(data)
        return data


# A line with text, then a blank line: a document ends there (for _docs, whose lines are stripped).
_DOC_END = re.compile(rb"\S[ \t\r\f\v]*\n[ \t\r\f\v]*\n")
_ANY_TEXT = re.compile(rb"\S")
_SCAN_BYTES = 1 << 16


def _search_from(stream: BinaryIO, pattern: re.Pattern, pos: int) -> int | None:
    """End of the first match of `pattern` at or after byte `pos` (bounded reads; a match across more than
    4 KiB of whitespace may be missed, which only moves the cut further)."""
    stream.seek(pos)
    carry = b""
    while block := stream.read(_SCAN_BYTES):
        buf = carry + block
        if m := pattern.search(buf):
            return pos - len(carry) + m.end()
        carry = buf[-4096:]
        pos += len(block)
    return None


def docs_pieces(path: Path, target: int) -> list[tuple[int, int]]:
    """Byte ranges of about `target` bytes covering a "docs" file, for sharding it in parallel. Each cut is
    just after a blank line that follows text, with text after it, so no document is cut and every range
    holds at least one. The cuts depend on the file's bytes and `target` alone. A compressed file cannot be
    entered in the middle, and the byte patterns searched for are UTF-8's: a compressed file, and a UTF-16 or
    UTF-32 one, is one range, the whole file."""
    size = Path(path).stat().st_size
    cuts = [0]
    if compression(Path(path)) or file_encoding(Path(path)).unit > 1:
        return [(0, size)]
    with _open_raw(Path(path)) as f:
        while cuts[-1] + target < size:
            cut = _search_from(f, _DOC_END, cuts[-1] + target - 1)  # -1: the text may end right at the target
            if cut is None or cut >= size or _search_from(f, _ANY_TEXT, cut) is None:
                break
            cuts.append(cut)
    return list(zip(cuts, cuts[1:] + [size]))


def _docs(
    path: Path, stats: ReadStats, piece: tuple[int, int] | None = None, allow_bad_bytes: bool = False
) -> Iterator[list[str]]:
    """The "docs" format, the hot path of sharding: one sentence per line, blank line between
    documents. A line over MAX_SENTENCE_CHARS is cut at spaces into separate sentences; one
    longer than a read chunk is cut as it arrives, so it never sits in memory whole.
    With `piece` (from docs_pieces), only that byte range; the file is counted with its first piece."""
    if piece is not None and compression(path):  # docs_pieces() gives a compressed file one piece, the whole
        piece = None
    if piece is not None and piece != (0, path.stat().st_size) and file_encoding(path).unit > 1:
        raise ValueError(f"{path}: a UTF-16 or UTF-32 file is read whole (docs_pieces gives it one range)")
    first = piece is None or piece[0] == 0
    if first and not _start_file(path, stats):
        return
    bound = MAX_SENTENCE_CHARS
    documents = sentences = 0
    doc: list[str] = []
    tail = ""
    long_open = False  # the unfinished line in `tail` was already counted as long
    with open_input(path) if piece is None else _open_raw(path) as raw:
        stream = raw if piece is None else _Range(raw, *piece)
        text = _Text(stream, stats, path, first, 0 if piece is None else piece[0], allow_bad_bytes)
        while chunk := text.read():
            lines = (tail + chunk).split("\n") if tail else chunk.split("\n")
            tail = lines.pop()
            if lines and long_open:  # the first line ends the long line already counted
                doc.extend(cut_long(normalize_whitespace(lines[0]), bound))
                del lines[0]
                long_open = False
            for line in lines:
                line = line.strip()
                if line:
                    _add_line(doc, line, bound, stats)
                elif doc:
                    documents += 1
                    sentences += len(doc)
                    yield doc
                    doc = []
            if len(tail) > bound:
                if not long_open:
                    stats.long_lines_split += 1
                    long_open = True
                pieces, tail = split_off(tail, bound)
                doc.extend(pieces)
    if long_open:
        doc.extend(cut_long(normalize_whitespace(tail), bound))
    elif tail := tail.strip():
        _add_line(doc, tail, bound, stats)
    if doc:
        documents += 1
        sentences += len(doc)
        yield doc
    if documents == 0 and first:  # (docs_pieces() gives every piece some text)
        stats.empty_files += 1
        log.debug("%s: only whitespace, skipped", path)
    stats.documents += documents
    stats.sentences += sentences


def _prose(path: Path, stats: ReadStats, per_file: bool, allow_bad_bytes: bool = False) -> Iterator[RawDocument]:
    """ "paragraphs" (a blank line ends a document) and "files" (the file is one document)."""
    if not _start_file(path, stats):
        return
    found = False
    buf: list[str] = []
    parts: list[str] = []  # pieces of a line longer than MAX_LINE_CHARS
    with open_input(path) as stream:
        for piece, complete in _lines(_Text(stream, stats, path, allow_bad_bytes=allow_bad_bytes), MAX_LINE_CHARS):
            if not complete:
                if not parts:
                    stats.long_lines_split += 1
                parts.append(piece)
                continue
            if parts:
                parts.append(piece)
                piece = "".join(parts)
                parts = []
            if per_file:
                buf.append(piece)
            elif piece.strip():
                buf.append(piece)
            elif buf:
                found = True
                yield RawDocument(PROSE, "\n".join(buf))
                buf = []
    if parts:
        buf.append("".join(parts))
    if buf and (not per_file or any(line.strip() for line in buf)):
        found = True
        yield RawDocument(PROSE, "\n".join(buf))
    if not found:
        stats.empty_files += 1
        log.debug("%s: only whitespace, skipped", path)


def _jsonl(
    path: Path, stats: ReadStats, allow_bad_bytes: bool = False, fields: Fields = DEFAULT_FIELDS
) -> Iterator[RawDocument]:
    """JSON lines, one document per line in its text field (`fields.text`); bad lines are counted, skipped. A file
    whose first FIELD_PROBE_OBJECTS JSON objects (all of them, when fewer) all lack the field is refused, naming
    the keys they have."""
    if not _start_file(path, stats):
        return
    found = False
    bad = 0
    lineno = 0
    overlong = False
    field = fields.text
    without_field = 0  # JSON objects lacking the field, while none had it
    keys: dict[str, None] = {}  # the keys of those objects, in order of appearance

    def reject(problem: str) -> None:
        nonlocal bad
        bad += 1
        stats.bad_json_lines += 1
        if bad <= _BAD_JSON_WARNINGS:
            log.warning("%s:%d: %s, line skipped", path, lineno, problem)
        if bad == _BAD_JSON_WARNINGS:
            log.warning("%s: further bad lines are counted but not logged", path)

    with open_input(path) as stream:
        for piece, complete in _lines(_Text(stream, stats, path, allow_bad_bytes=allow_bad_bytes), MAX_LINE_CHARS):
            if not complete:
                overlong = True
                continue
            lineno += 1
            if overlong:
                overlong = False
                found = True
                reject(f"line longer than {MAX_LINE_CHARS} characters")
                continue
            line = piece.strip()
            if not line:
                continue
            found = True
            try:
                record = json.loads(line)
            except ValueError as exc:
                reject(f"invalid JSON ({exc})")
                continue
            if without_field >= 0 and isinstance(record, dict):
                if field in record:
                    without_field = -1  # the field exists: records without it are only bad lines from now on
                else:
                    without_field += 1
                    keys.update((key, None) for key in list(record)[:_NAMED_KEYS] if len(keys) < _NAMED_KEYS)
                    if without_field == FIELD_PROBE_OBJECTS:
                        _no_field(path, field, without_field, keys)
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                title = record.get(fields.title) if fields.title is not None and isinstance(record, dict) else None
                named = f" ({fields.title} {title!r})" if title is not None else ""
                reject(f"not a JSON object with a string {json.dumps(field)} field{named}")
                continue
            yield RawDocument(PROSE, text)
    if without_field > 0:
        _no_field(path, field, without_field, keys)
    if not found:
        stats.empty_files += 1
        log.debug("%s: only whitespace, skipped", path)
    if bad:
        log.warning("%s: %d bad JSON line(s) skipped", path, bad)


def _no_field(path: Path, field: str, objects: int, keys: dict[str, None]) -> None:
    named = ", ".join(keys) if keys else "none"
    raise DataPrepError(
        f"{path}: no {json.dumps(field)} field (--text-field) in its first {objects} JSON object(s); "
        f"keys found: {named}"
    )


def _parquet(
    path: Path, stats: ReadStats, fields: Fields, row_groups: tuple[int, int] | None = None
) -> Iterator[RawDocument]:
    """Rows of a Parquet file (or of its row groups [first, stop)), one document each in its text column; null
    texts are counted, skipped. The file is counted with its first row group."""
    if (row_groups is None or row_groups[0] == 0) and not _start_file(path, stats):
        return
    nulls = NullTexts(path, fields.text)
    for text, where in iter_texts(path, fields, row_groups):
        if text is None:
            nulls.add(where)
            continue
        yield RawDocument(PROSE, text)
    stats.null_texts += nulls.count


def _wiki(path: Path, stats: ReadStats, streams: tuple[int, int] | None = None) -> Iterator[RawDocument]:
    """Articles of a pages-articles dump (or of the bz2 streams in byte range `streams` of a multistream
    dump); redirects, disambiguation and ns != 0 skipped. The file is counted with its first range."""
    if (streams is None or streams[0] == 0) and not _start_file(path, stats):
        return
    skipped: dict[str, int] = {}
    for page in iter_pages(path, streams):
        reason = skip_reason(page)
        if reason is not None:
            stats.skipped_pages += 1
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        yield RawDocument(WIKITEXT, page.text)
    log.debug("%s: skipped pages %s", path, skipped)
