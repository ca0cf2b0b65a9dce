"""argparse types for numeric flags with a range: a value outside it (nan and the infinities included) is refused by
argparse before any work starts, with its one-line usage error naming the flag, the range and the value given:

    albert-data shard: error: argument --shard-mb: must be a number in [1e-06, 1048576], got 'nan'
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _format(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def integer(low: int, high: int | None = None, note: str = "") -> Callable[[str], int]:
    """A flag's type: an integer in [low, high] (no upper bound when `high` is None). `note` (such as "0: auto")
    follows the range in the error."""
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    if note:
        allowed += f" ({note})"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A flag's type: a finite number between `low` and `high`, each bound included unless `*_open`."""
    allowed = f"a number in {'(' if low_open else '['}{_format(low)}, {_format(high)}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not inside:  # (nan compares false: refused here too)
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse
