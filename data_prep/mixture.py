"""Weighted mixtures of input sources for the `corpus` step.

`--input wiki=enwiki/ books=books/ --weights wiki=1 books=2.5`: each source is a name and one or more paths (a
plain path is a source named after it, as written); its weight (1 unless given) says how many times its documents
go into the corpus: `floor(weight)` whole copies of all of them, then a seeded draw of
`floor(fraction x documents + 1/2)` of them (`fraction` = weight - floor(weight), taken exactly from the decimal
written). The draw takes the documents whose keys are the smallest, a key being a splitmix64 hash of
(`--weight-seed`, the source's name, the document's index in the source): it depends on the source's documents,
its name and the seed alone, never on the parts, workers or ranks, and the drawn documents keep their order.

The corpus is the sources in the order of their first appearance, each as its copies and then its drawn documents,
each source's files in the order given.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from common.flags import number
from data_prep.dedup import RemovedCounts
from data_prep.errors import DataPrepError
from data_prep.readers import ReadStats

# A source's name: letters, digits, "_", "." and "-" (what comes before "=" in --input NAME=PATH).
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# A weight above this is a typo rather than a mixture (copies of a source cost its size each).
MAX_WEIGHT = 1000.0
_WEIGHT = number(0.0, MAX_WEIGHT, low_open=True)
DEFAULT_WEIGHT_SEED = 12345


@dataclass(frozen=True)
class InputSource:
    """A named source of a mixture: its paths (files or folders) and its weight."""

    name: str
    paths: tuple[Path, ...]
    weight: float = 1.0

    @property
    def copies(self) -> int:
        """Whole copies of the source's documents."""
        return math.floor(self.weight)

    @property
    def fraction(self) -> Fraction:
        """The rest of the weight, exactly as written in decimal (2.3 -> 3/10)."""
        return Fraction(repr(self.weight)) - self.copies


def weight_argument(text: str) -> tuple[str, float]:
    """argparse type of a --weights entry, NAME=WEIGHT (NAME: a source of --input)."""
    name, equals, value = text.rpartition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"must be NAME=WEIGHT (a source of --input and its weight), got {text!r}")
    try:
        weight = _WEIGHT(value)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{name}: weight {exc}") from None
    return name, weight


def parse_sources(inputs: list[str], weights: list[tuple[str, float]] | None = None) -> list[InputSource]:
    """The sources of --input (NAME=PATH, or a plain PATH: a source named after it) with the weights of --weights,
    in the order of first appearance; a name given again adds its paths to its source. A PATH that exists as
    written is a plain path even if it holds "=". An unknown or repeated name in --weights is refused."""
    paths: dict[str, list[Path]] = {}
    for text in inputs:
        name, equals, path = text.partition("=")
        if equals and path and _NAME.fullmatch(name) and not Path(text).exists():
            paths.setdefault(name, []).append(Path(path))
        else:
            paths.setdefault(text, []).append(Path(text))
    given: dict[str, float] = {}
    for name, weight in weights or []:
        if name in given:
            raise DataPrepError(f"--weights: {name} is given twice")
        if name not in paths:
            raise DataPrepError(f"--weights: no source {name!r} in --input (sources: {', '.join(paths)})")
        given[name] = weight
    return [InputSource(name, tuple(found), given.get(name, 1.0)) for name, found in paths.items()]


def as_sources(inputs: list[Any]) -> list[InputSource]:
    """Sources from a list of InputSource and plain paths (each its own source of weight 1, named as written)."""
    return [item if isinstance(item, InputSource) else InputSource(str(item), (Path(item),)) for item in inputs]


def drawn_count(documents: int, fraction: Fraction) -> int:
    """How many of a source's `documents` its fractional weight draws: fraction x documents, rounded half up."""
    return math.floor(fraction * documents + Fraction(1, 2))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 values (wrapping arithmetic: the same bits on every machine)."""
    z = values * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def drawn_documents(documents: int, count: int, seed: int, name: str) -> np.ndarray:
    """The indices (sorted) of the `count` documents of source `name` (of `documents`) that its fractional weight
    draws: those of the smallest keys, ties by index."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    base = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    index = np.arange(documents, dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = _splitmix64(index + np.uint64(base) + np.uint64(1))
    order = np.argsort(keys, kind="stable")[:count]
    return np.sort(order).astype(np.int64)


@dataclass
class SourceStats:
    """What a source gave the corpus: what was read of it, what deduplication and decontamination removed of it
    (data_prep.dedup), and what was written after weighting (documents and sentences; bytes of its documents as
    they stand in the corpus text, each with the blank line after it)."""

    name: str
    weight: float
    files: int
    read: ReadStats = field(default_factory=ReadStats)
    documents_written: int = 0
    sentences_written: int = 0
    bytes_written: int = 0
    removed: RemovedCounts = field(default_factory=RemovedCounts)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": self.weight,
            "files": self.files,
            "read": asdict(self.read),
            "written": {
                "documents": self.documents_written,
                "sentences": self.sentences_written,
                "bytes": self.bytes_written,
            },
            "removed": asdict(self.removed),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SourceStats:
        written = data["written"]
        return cls(
            data["name"],
            data["weight"],
            data["files"],
            ReadStats(**data["read"]),
            written["documents"],
            written["sentences"],
            written["bytes"],
            RemovedCounts(**data.get("removed", {})),  # (absent: a run without dedup)
        )
