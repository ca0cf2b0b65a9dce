"""JSON-lines logs that a run appends to and a resumed run reads back (metrics.jsonl, batches-rank<r>.jsonl).

A process killed in the middle of a write, or a disk that filled during one, leaves a torn last line; it is dropped
with a warning instead of blocking every later resume. A damaged line anywhere else is an error that names the file
and the line: that is not what an interrupted append leaves."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import write_text

log = logging.getLogger(__name__)


class JsonlError(ValueError):
    """A JSON-lines file damaged other than by an interrupted append."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of `path`, without a torn last line."""
    return [record for record, _ in _parse(path)]


def keep_through_step(path: Path, step: int, always: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Rewrite `path` (atomically) with the lines of steps <= `step` only, as they were: what a lost run logged after
    the checkpoint a run resumes from is dropped, and so is a torn last line. Records for which `always` is true
    stay wherever they are."""
    kept = [
        line
        for record, line in _parse(path)
        if record.get("step", 0) <= step or (always is not None and always(record))
    ]
    write_text(path, "".join(line + "\n" for line in kept))


def _parse(path: Path) -> list[tuple[dict[str, Any], str]]:
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line.strip()]
    parsed = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if position == len(lines) - 1:
                log.warning("%s: line %d is torn (an interrupted write); dropped", path, number)
                break
            raise JsonlError(f"{path}: line {number} is not a JSON record ({e}); move the file away to go on") from None
        parsed.append((record, line))
    return parsed
