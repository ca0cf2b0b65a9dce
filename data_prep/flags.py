"""argparse types for albert-data's numeric flags, each range written once.

A value outside its range (nan and the infinities included) is refused by argparse before any work starts, with
its one-line usage error naming the flag, the range and the value given:

    albert-data shard: error: argument --shard-mb: must be a number in [1e-06, 1048576], got 'nan'

Relations between flags (--max-predictions-per-seq at most --max-seq-length - 3) are checked by the settings
classes (ExampleSettings.check, ShardSettings.check) once all flags are known.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from .vocab import CONTROL_SYMBOLS, MAX_VOCAB_SIZE


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


# Sizes in MB (--part-mb, --piece-mb, --shard-mb), turned into int(MB x 2**20) bytes: at least one byte, and at
# most 1 TiB (far above any part, piece or shard) so that the byte count is finite.
MEGABYTES = number(1e-6, float(1 << 20))
# Processes per machine (or per MPI rank); each running task holds a pipe, and 1024 is a common open-file limit.
WORKERS = integer(1, 1024)
# numpy's and SentencePiece's generators take seeds as unsigned 32-bit integers.
SEED = integer(0, 2**32 - 1)
# --num-files, --num-shards: a count of output files, 0 for the automatic count.
FILE_COUNT = integer(0, 1 << 20, "0: auto")
# --progress-seconds: 0 turns the log lines off; a year at most.
SECONDS = number(0.0, 365 * 24 * 3600.0)
# Probabilities: --masked-lm-prob must mask something and not everything; --short-seq-prob may be 0 or 1.
OPEN_PROBABILITY = number(0.0, 1.0, low_open=True, high_open=True)
PROBABILITY = number(0.0, 1.0)
# Sequence lengths and positions are stored as uint16; [CLS] a [SEP] b [SEP] needs room for two sentences.
SEQ_LENGTH = integer(8, 65535)
PREDICTIONS = integer(1, 65535 - 3, "and at most --max-seq-length - 3")
NGRAM = integer(1, 10)
# Passes over the corpus: BERT and ALBERT use 5 to 10; a bound keeps a typo from planning years of work.
DUPE_FACTOR = integer(1, 1000)
# The special pieces (<pad>, <unk>, [CLS], [SEP], [MASK]) plus at least one of the text's own; ids are uint16.
VOCAB_SIZE = integer(len(CONTROL_SYMBOLS) + 3, MAX_VOCAB_SIZE, "the shards store ids as uint16")
# --input-sentence-size: the vocabulary's sample holds at least one sentence.
SENTENCES = integer(1)
# inspect -n: examples printed (0: statistics only).
EXAMPLES = integer(0)
