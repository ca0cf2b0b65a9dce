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
back (`decide`). Memory per rank: about 24 bytes per document and 16 per distinct line of its own share, twice
(sent and received), whatever the corpus; nothing is kept between runs, so a resumed run decides the same again.

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


def load_fingerprints(part_file: Path) -> dict[str, np.ndarray]:
    path = fingerprints_path(part_file)
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
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


def _owner(values: np.ndarray, size: int) -> np.ndarray:
    return (values % np.uint64(size)).astype(np.int64)


def _exchange(world: World, payload: list[np.ndarray], owner: np.ndarray) -> tuple[list[list[np.ndarray]], list]:
    """Send each row of the arrays of `payload` to the rank `owner` gives; what every rank sent here, per rank."""
    size = world.size
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(size + 1))
    outgoing = [[a[order[bounds[r] : bounds[r + 1]]] for a in payload] for r in range(size)]
    return world.alltoall(outgoing), [order[bounds[r] : bounds[r + 1]] for r in range(size)]


def _first_of_each(hashes: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """duplicate[i]: an earlier row (smaller order) has the same 128-bit hash."""
    duplicate = np.zeros(len(orders), dtype=bool)
    if len(orders):
        idx = np.lexsort((orders, hashes[:, 1], hashes[:, 0]))
        h = hashes[idx]
        same = np.zeros(len(idx), dtype=bool)
        same[1:] = (h[1:, 0] == h[:-1, 0]) & (h[1:, 1] == h[:-1, 1])
        duplicate[idx] = same
    return duplicate


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values[i] in sorted_set (sorted, distinct), without sorting `values`."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def decide(world: World, files: list[tuple[int, Path]], settings: DedupSettings) -> dict[Path, FileDecision]:
    """The decisions for this rank's part files (`files`: (index of the file in input order, path)); collective:
    every rank calls it with its own share."""
    prints = [load_fingerprints(path) for _, path in files]
    counts = [len(p["sizes"]) for p in prints]
    overlap = np.concatenate([p["overlap"] for p in prints] or [np.zeros(0, dtype=bool)])
    duplicate = np.zeros(len(overlap), dtype=bool)
    if settings.mode != "off":
        hashes = np.concatenate([p["documents"] for p in prints] or [np.zeros((0, 2), dtype=np.uint64)])
        orders = np.concatenate(
            [(np.int64(index) << _ORDER_BITS) + np.arange(n, dtype=np.int64) for (index, _), n in zip(files, counts)]
            or [np.zeros(0, dtype=np.int64)]
        )
        live = np.flatnonzero(~overlap)
        received, sent = _exchange(world, [hashes[live], orders[live]], _owner(hashes[live, 0], world.size))
        got = [len(r[1]) for r in received]
        flags = _first_of_each(
            np.concatenate([r[0] for r in received]).reshape(-1, 2), np.concatenate([r[1] for r in received])
        )
        answers = world.alltoall(np.split(flags, np.cumsum(got)[:-1]))
        for rank, rows in enumerate(sent):
            duplicate[live[rows]] = answers[rank]
    kept = ~(duplicate | overlap)
    line_counts = [p["line_counts"] for p in prints]
    boilerplate = [np.zeros(int(c.sum()), dtype=bool) for c in line_counts]
    if settings.lines:
        kept_lines = np.concatenate(
            [np.repeat(k, c) for k, c in zip(np.split(kept, np.cumsum(counts)[:-1]), line_counts)]
            or [np.zeros(0, dtype=bool)]
        )
        lines = np.concatenate([p["lines"] for p in prints] or [np.zeros(0, dtype=np.uint64)])
        distinct, seen = np.unique(lines[kept_lines], return_counts=True)
        received, sent = _exchange(world, [distinct, seen.astype(np.int64)], _owner(distinct, world.size))
        got = [len(r[0]) for r in received]
        values = np.concatenate([r[0] for r in received])
        totals = np.concatenate([r[1] for r in received])
        unique, inverse = np.unique(values, return_inverse=True)
        summed = np.bincount(inverse, weights=totals, minlength=len(unique)) if len(values) else np.zeros(0)
        frequent = summed[inverse] > settings.min_repeats
        answers = world.alltoall(np.split(frequent, np.cumsum(got)[:-1]))
        boiler = np.zeros(len(distinct), dtype=bool)
        for rank, rows in enumerate(sent):
            boiler[rows] = answers[rank]
        flagged = _member(lines, distinct[boiler]) & kept_lines
        boilerplate = np.split(flagged, np.cumsum([int(c.sum()) for c in line_counts])[:-1])
    decisions = {}
    first = 0
    for (_, path), n, lines_of in zip(files, counts, boilerplate):
        decisions[path] = FileDecision(duplicate[first : first + n], overlap[first : first + n], lines_of)
        first += n
    return decisions
