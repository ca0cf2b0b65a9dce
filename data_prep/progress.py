"""Progress of a long phase: a tqdm bar on a terminal, a log line every few seconds in a batch job.

    with progress("examples", total=len(tasks), unit="task") as p:
        for ... :
            p.update()      # one more done
            p.update(0)     # nothing done, but a due log line is written (call it while waiting)

Without a terminal (stderr is not a TTY, as in a Slurm job's log) or with bars turned off, a line such as
`examples: 120/2430 task (4.9%), 2.1 task/s, ETA 0:18:20` is logged at most every `every` seconds (default: the
environment variable ALBERT_PROGRESS_SECONDS, else 60; 0 turns the lines off); under MPI every rank logs its own,
the rank in the log format. Lines are written from the caller's thread (no timer thread: the pipeline forks).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ENV_SECONDS = "ALBERT_PROGRESS_SECONDS"
DEFAULT_SECONDS = 60.0


def default_seconds() -> float:
    value = os.environ.get(ENV_SECONDS, "")
    try:
        return float(value) if value else DEFAULT_SECONDS
    except ValueError:
        return DEFAULT_SECONDS


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class LogLines:
    """The batch-job form of a progress bar: a log line when `every` seconds have passed since the last one."""

    desc: str
    total: int
    unit: str
    every: float
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.every > 0 and now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        scale, unit, digits = (1 << 20, "MB", 1) if self.unit == "B" else (1, self.unit, 0)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.desc}: {self.done / scale:.{digits}f}/{self.total / scale:.{digits}f} {unit} ({pct:.1f}%), "
            f"{rate / scale:.3g} {unit}/s, ETA {eta}"
        )


@contextmanager
def progress(desc: str, total: int, unit: str = "task", bar: bool = True, every: float | None = None) -> Iterator:
    """A tqdm bar when `bar` and stderr is a terminal, else `LogLines` (see the module docstring).
    `unit="B"`: counts bytes, shown in MB."""
    if bar and sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True) as t:
            yield t
    else:
        lines = LogLines(desc, total, unit, default_seconds() if every is None else every)
        yield lines
        if lines.every > 0 and lines.last > lines.started:  # a phase that logged along the way also logs its end
            log.info("%s (done)", lines.line(time.monotonic()))
