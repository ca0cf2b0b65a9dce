"""Exact deduplication and decontamination of the `corpus` step (`--dedup`, `--exclude-overlap`).

Normalisation (the one text compared): Unicode NFC, every run of whitespace (line ends included) collapsed to one
space, leading and trailing whitespace dropped, case kept. A document is compared by its whole text so normalised
(its sentences joined), a line by its own text.

What is kept: the documents of the corpus are ordered by source (as given), then file (in each source's order),
then document (in the file); of documents with the same normalised text the first in that order is kept, the later
ones removed. The order depends on the inputs alone, never on parts, workers or ranks.

`--dedup paragraphs` removes documents as `documents` does, then every line (a sentence of the standard format: the
unit a paragraph is split into) whose normalised text occurs more than `--dedup-min-repeats` times in the kept
documents: boilerplate, all its occurrences removed. A document left with fewer than two lines is removed too (as
the reader drops one-sentence documents).

`--exclude-overlap FILE ...` removes every document that shares an n-gram of `--overlap-ngram` tokens with one of
the evaluation texts: tokens are whitespace-separated words, NFC, case-folded, stripped of punctuation at their
ends (empty ones dropped); an evaluation file's n-grams are taken within each of its blocks of lines between blank
lines, a document's over its whole text. Decontamination comes first: a document removed for an overlap is not a
duplicate's kept first copy.

Each document's fingerprint (a 128-bit hash of its normalised text, 64-bit hashes of its lines, its overlap flag,
its bytes and lines) is computed by the task that cleans it and stored beside its part file
(`PART.fingerprints.npz`). The decisions need every fingerprint: each MPI rank loads those of its share of the
part files and sends every hash to the rank that owns its value (hash modulo the ranks), which decides for the
hashes it owns (documents: the first of each hash in the order above; lines: the total count) and sends the answers
back (`decide`; MPI Alltoallv of numpy buffers). Memory per rank grows with its share alone (measured in
docs/scale.md: about 60 bytes per document and per line in one process, 80 and 75 under MPI); nothing is kept
between runs, so a resumed run decides the same again.

Near duplicates (MinHash) are not detected: no MinHash library is among the project's dependencies.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path
from data_prep.errors import DataPrepError
from data_prep.mpi import World

log = logging.getLogger(__name__)

DEDUP_MODES = ("off", "documents", "paragraphs")
DEFAULT_MIN_REPEATS = 20
DEFAULT_OVERLAP_NGRAM = 13
FINGERPRINTS = ".fingerprints.npz"  # beside a part file: NAME.fingerprints.npz
# A document's place in the order of keeping: (part file's index in input order) << _ORDER_BITS | (index in the file).
_ORDER_BITS = 40
# Polynomial of the rolling n-gram hash (odd: invertible modulo 2**64).
_NGRAM_BASE = np.uint64(0x100000001B3)
_PUNCTUATION = re.compile(r"^\W+|\W+$")


@dataclass(frozen=True)
class DedupSettings:
    """What `--dedup`, `--dedup-min-repeats`, `--exclude-overlap` and `--overlap-ngram` ask for."""

    mode: str = "off"
    min_repeats: int = DEFAULT_MIN_REPEATS
    exclude_overlap: tuple[Path, ...] = ()
    overlap_ngram: int = DEFAULT_OVERLAP_NGRAM

    def check(self, where: Path) -> None:
        if self.mode not in DEDUP_MODES:
            raise DataPrepError(f"{where}: unknown dedup mode {self.mode!r} (choose from {', '.join(DEDUP_MODES)})")
        if self.min_repeats < 1 or self.overlap_ngram < 1:
            raise DataPrepError(f"{where}: --dedup-min-repeats and --overlap-ngram must be >= 1")
        for path in self.exclude_overlap:
            if not Path(path).is_file():
                raise DataPrepError(f"{path}: no such file (--exclude-overlap)")

    @property
    def active(self) -> bool:
        return self.mode != "off" or bool(self.exclude_overlap)

    @property
    def lines(self) -> bool:
        return self.mode == "paragraphs"

    def identity(self) -> dict[str, Any]:
        """The settings as a run records them (only when active, so that runs without them keep their identity):
        the evaluation files by path and sha256 (other texts are other settings)."""
        return {
            "mode": self.mode,
            "min_repeats": self.min_repeats if self.lines else None,
            "exclude_overlap": [
                {"path": str(Path(p).resolve()), "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()}
                for p in self.exclude_overlap
            ],
            "overlap_ngram": self.overlap_ngram if self.exclude_overlap else None,
        }


NO_DEDUP = DedupSettings()


def normalised(text: str) -> str:
    """NFC, whitespace collapsed, case kept: the text that duplicates are compared by."""
    text = " ".join(text.split())
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def document_hash(doc: list[str]) -> bytes:
    return hashlib.blake2b(normalised(" ".join(doc)).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def line_hash(line: str) -> bytes:
    return hashlib.blake2b(normalised(line).encode("utf-8", "surrogatepass"), digest_size=8).digest()


# --- decontamination ------------------------------------------------------------------------------------------


@lru_cache(maxsize=1 << 18)
def _token_hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def overlap_tokens(text: str) -> list[str]:
    """The tokens n-grams are made of: whitespace-separated, NFC, case-folded, punctuation at the ends stripped."""
    text = unicodedata.normalize("NFC", text.casefold())
    return [t for word in text.split() if (t := _PUNCTUATION.sub("", word))]


def ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """64-bit hashes of every n-gram of the tokens (none when fewer than n)."""
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    ids = np.fromiter((_token_hash(t) for t in tokens), dtype=np.uint64, count=len(tokens))
    count = len(tokens) - n + 1
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            acc = acc * _NGRAM_BASE + ids[i : i + count]
    return acc


def evaluation_ngrams(paths: Iterable[Path], n: int) -> np.ndarray:
    """The sorted distinct n-gram hashes of the evaluation texts (UTF-8 plain text; n-grams within each block of
    lines between blank lines)."""
    found = [np.zeros(0, dtype=np.uint64)]
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataPrepError(f"{path}: not UTF-8 text (--exclude-overlap): {e.reason} at byte {e.start}") from None
        grams = [ngram_hashes(overlap_tokens(block), n) for block in re.split(r"\n\s*\n", text)]
        count = sum(len(g) for g in grams)
        if count == 0:
            log.warning("%s: no %d-gram of tokens (--exclude-overlap): it excludes nothing", path, n)
        found += grams
    return np.unique(np.concatenate(found))


def overlaps(doc: list[str], ngrams: np.ndarray, n: int) -> bool:
    """Whether the document shares an n-gram with the evaluation texts (`ngrams`: evaluation_ngrams)."""
    if len(ngrams) == 0:
        return False
    return bool(_member(ngram_hashes(overlap_tokens(" ".join(doc)), n), ngrams).any())


# --- fingerprints of a part file ------------------------------------------------------------------------------


@dataclass
class Fingerprints:
    """What the decisions need of each document of a part file, gathered while it is written."""

    settings: DedupSettings
    ngrams: np.ndarray | None = None  # evaluation_ngrams, when --exclude-overlap
    documents: bytearray = field(default_factory=bytearray)  # 16 bytes each
    lines: bytearray = field(default_factory=bytearray)  # 8 bytes each, of every line in order
    line_counts: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # bytes in the part file, with the blank line
    overlap: list[bool] = field(default_factory=list)

    def add(self, doc: list[str], size: int) -> None:
        if self.settings.mode != "off":
            self.documents += document_hash(doc)
        if self.settings.lines:
            for line in doc:
                self.lines += line_hash(line)
        self.line_counts.append(len(doc))
        self.sizes.append(size)
        if self.ngrams is not None:
            self.overlap.append(overlaps(doc, self.ngrams, self.settings.overlap_ngram))

    def save(self, part_file: Path) -> None:
        n = len(self.sizes)
        with atomic_path(fingerprints_path(part_file)) as tmp:
            with open(tmp, "wb") as out:
                np.savez(
                    out,
                    documents=np.frombuffer(bytes(self.documents), dtype=np.uint64).reshape(-1, 2),
                    lines=np.frombuffer(bytes(self.lines), dtype=np.uint64),
                    line_counts=np.asarray(self.line_counts, dtype=np.int64),
                    sizes=np.asarray(self.sizes, dtype=np.int64),
                    overlap=np.asarray(self.overlap if self.ngrams is not None else [False] * n, dtype=bool),
                )


def fingerprints_path(part_file: Path) -> Path:
    return part_file.with_name(part_file.stem + FINGERPRINTS)


def load_fingerprints(part_file: Path, key: str) -> np.ndarray:
    """One array of the fingerprints of a part file: documents, lines, line_counts, sizes or overlap."""
    path = fingerprints_path(part_file)
    try:
        with np.load(path) as data:
            return data[key]
    except (OSError, ValueError, KeyError) as e:
        raise DataPrepError(f"{path}: cannot read the fingerprints of a part file ({e}); remove the folder") from None


# --- the decisions --------------------------------------------------------------------------------------------


@dataclass
class FileDecision:
    """What goes out of one part file: documents (duplicates, overlaps) and lines (boilerplate)."""

    duplicate: np.ndarray  # bool per document
    overlap: np.ndarray  # bool per document
    boilerplate: np.ndarray  # bool per line of the file, only in kept documents

    @property
    def changes(self) -> bool:
        return bool(self.duplicate.any() or self.overlap.any() or self.boilerplate.any())


@dataclass
class RemovedCounts:
    """What the screening removed from a source: documents and their bytes (as they stand in the corpus text, each
    with its blank line), and lines of boilerplate (their bytes with their line end; a document left with fewer
    than two lines is counted in `emptied_documents` and its remaining bytes in `boilerplate_bytes`)."""

    duplicate_documents: int = 0
    duplicate_bytes: int = 0
    overlap_documents: int = 0
    overlap_bytes: int = 0
    boilerplate_lines: int = 0
    boilerplate_bytes: int = 0
    emptied_documents: int = 0

    def __iadd__(self, other: RemovedCounts) -> RemovedCounts:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)
        return self

    @property
    def documents(self) -> int:
        return self.duplicate_documents + self.overlap_documents + self.emptied_documents


def _exchange(
    world: World, payload: list[np.ndarray], key: np.ndarray
) -> tuple[list[np.ndarray], list[int], np.ndarray | None]:
    """Send each row of the 1-D arrays of `payload` to the rank that owns its `key` (key modulo the ranks); returns
    the rows every rank sent here (one array per payload array, in rank order), how many came from each rank, and
    the order in which this rank's rows were sent (None: all, in order, to itself: a single rank)."""
    if world.size == 1:
        return payload, [len(key)], None
    owner = (key % np.uint64(world.size)).astype(np.int64)
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=world.size).tolist()
    del owner
    received, got = [], [len(key)]
    for column in payload:
        rows, got = world.alltoallv(column[order], counts)
        received.append(rows)
    return received, got, order


def _answer(world: World, flags: np.ndarray, got: list[int], sent: np.ndarray | None) -> np.ndarray:
    """Flags for the rows received (in the order received) sent back to their ranks; this rank's rows' flags, in
    their own order (`sent`: the order _exchange sent them in)."""
    back, _ = world.alltoallv(flags, got)
    if sent is None:
        return back
    result = np.zeros(len(back), dtype=bool)
    result[sent] = back
    return result


def _first_of_each(high: np.ndarray, low: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """duplicate[i]: an earlier row (smaller order) has the same 128-bit hash (high, low)."""
    duplicate = np.zeros(len(orders), dtype=bool)
    if len(orders) > 1:
        idx = np.lexsort((orders, low, high))
        same = np.ones(len(idx) - 1, dtype=bool)
        for column in (high, low):
            ordered = column[idx]
            same &= ordered[1:] == ordered[:-1]
        duplicate[idx[1:]] = same
    return duplicate


def _frequent(values: np.ndarray, counts: np.ndarray, limit: int) -> np.ndarray:
    """frequent[i]: the counts of all rows of value values[i] add up to more than `limit`."""
    if len(values) == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    del ordered
    totals = np.add.reduceat(counts[order], starts)
    lengths = np.diff(np.append(starts, len(values)))
    frequent = np.empty(len(values), dtype=bool)
    frequent[order] = np.repeat(totals > limit, lengths)
    return frequent


def _load(files: list[tuple[int, Path]], key: str) -> tuple[np.ndarray, list[int]]:
    """One fingerprint array of every file, joined; the length of each file's."""
    arrays = [load_fingerprints(path, key) for _, path in files]
    return np.concatenate(arrays) if len(arrays) != 1 else arrays[0], [len(a) for a in arrays]


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values[i] in sorted_set (sorted, distinct), without sorting `values`."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def decide(world: World, files: list[tuple[int, Path]], settings: DedupSettings) -> dict[Path, FileDecision]:
    """The decisions for this rank's part files (`files`: (index of the file in input order, path); none on a rank
    without parts); collective: every rank calls it with its own share."""
    overlap, counts = _load(files, "overlap") if files else (np.zeros(0, dtype=bool), [])
    duplicate = _duplicates(world, files, overlap, counts) if settings.mode != "off" else np.zeros_like(overlap)
    kept = ~(duplicate | overlap)
    if settings.lines:
        boilerplate, line_counts = _boilerplate(world, files, kept, settings.min_repeats)
    else:
        line_counts = [int(load_fingerprints(path, "line_counts").sum()) for _, path in files]
        boilerplate = np.zeros(sum(line_counts), dtype=bool)
    decisions = {}
    first = line = 0
    for (_, path), n, lines in zip(files, counts, line_counts):
        decisions[path] = FileDecision(
            duplicate[first : first + n], overlap[first : first + n], boilerplate[line : line + lines]
        )
        first, line = first + n, line + lines
    return decisions


def _duplicates(world: World, files: list[tuple[int, Path]], overlap: np.ndarray, counts: list[int]) -> np.ndarray:
    """duplicate[i]: document i of this rank's files (not overlapping) has an earlier twin, on any rank."""
    hashes, _ = _load(files, "documents") if files else (np.zeros((0, 2), dtype=np.uint64), [])
    index = np.repeat(np.asarray([k for k, _ in files], dtype=np.int64), counts)
    starts = np.repeat(np.cumsum([0, *counts])[:-1].astype(np.int64), counts)
    orders = (index << _ORDER_BITS) + np.arange(len(hashes), dtype=np.int64) - starts
    del index, starts
    live = np.flatnonzero(~overlap)
    high, low = hashes[live, 0], hashes[live, 1]
    del hashes
    received, got, sent = _exchange(world, [high, low, orders[live]], high)
    del high, low, orders
    flags = _first_of_each(received[0], received[1], received[2])
    del received
    duplicate = np.zeros(len(overlap), dtype=bool)
    duplicate[live] = _answer(world, flags, got, sent)
    return duplicate


def _boilerplate(
    world: World, files: list[tuple[int, Path]], kept: np.ndarray, min_repeats: int
) -> tuple[np.ndarray, list[int]]:
    """boilerplate[j]: line j of this rank's files is in a kept document and its text occurs more than
    `min_repeats` times in the kept documents of all ranks; and the number of lines of each file."""
    lines, line_counts = _load(files, "lines") if files else (np.zeros(0, dtype=np.uint64), [])
    per_document, _ = _load(files, "line_counts") if files else (np.zeros(0, dtype=np.int64), [])
    in_kept = np.repeat(kept, per_document)
    del per_document
    distinct, seen = np.unique(lines[in_kept], return_counts=True)
    received, got, sent = _exchange(world, [distinct, seen.astype(np.int64)], distinct)
    del seen
    frequent = _frequent(received[0], received[1], min_repeats)
    del received
    found = _answer(world, frequent, got, sent)
    del frequent
    boilerplate = _member(lines, distinct[found])
    boilerplate &= in_kept
    return boilerplate, line_counts
