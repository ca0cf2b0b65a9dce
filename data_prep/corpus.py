"""The `corpus` step: read raw inputs, write balanced files in the standard format.

Standard format: one sentence per line, a blank line between documents, UTF-8, "\\n" line
ends. Each document goes to the output file with the fewest bytes so far (ties: lowest
index), so the split depends only on the documents, never on timing or worker count.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult, Pool
from pathlib import Path

from tqdm import tqdm

from data_prep.errors import DataPrepError
from data_prep.readers import (
    FORMATS,
    SENTENCES,
    RawDocument,
    ReadStats,
    count_document,
    detect_format,
    expand_inputs,
    iter_documents,
    iter_raw_documents,
    process_raw,
)

log = logging.getLogger(__name__)

# A batch sent to a worker: big enough to amortise pickling, small enough to keep all
# workers busy on a small corpus and bound the memory of batches in flight.
_BATCH_DOCS = 64
_BATCH_CHARS = 1 << 20
# Batches in flight per worker: enough to hide the reader's latency, bounded so that memory
# does not grow when reading outpaces cleaning (Pool.imap would queue the whole input).
_IN_FLIGHT_PER_WORKER = 3


@dataclass
class CorpusStats(ReadStats):
    """ReadStats of all inputs plus what was written."""

    output_files: list[Path] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0


def write_corpus(
    inputs: list[Path],
    output_dir: Path,
    num_files: int = 1,
    fmt: str = "auto",
    workers: int = 1,
    prefix: str = "corpus",
    progress: bool = True,
) -> CorpusStats:
    """Write the documents of `inputs` to `output_dir/{prefix}-00000.txt` … (`num_files` files).

    With workers > 1, markup cleaning and sentence splitting run in a process pool; the
    output is byte-identical to workers=1. Files appear under their final names only once
    complete.
    """
    if num_files < 1:
        raise DataPrepError(f"{output_dir}: number of output files must be >= 1, got {num_files}")
    if workers < 1:
        raise DataPrepError(f"{output_dir}: workers must be >= 1, got {workers}")
    if fmt not in FORMATS:
        raise DataPrepError(f"{output_dir}: unknown input format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise DataPrepError(f"{output_dir}: bad output file prefix {prefix!r}")
    files = expand_inputs(inputs)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise DataPrepError(f"{output_dir}: exists and is not a directory")
    output_dir.mkdir(parents=True, exist_ok=True)
    _warn_stale(output_dir, prefix, num_files)

    start = time.perf_counter()
    stats = CorpusStats()
    finals = [output_dir / f"{prefix}-{i:05d}.txt" for i in range(num_files)]
    temps = [output_dir / f".{p.name}.tmp" for p in finals]
    sizes = [0] * num_files
    handles = []
    try:
        handles = [open(t, "wb") for t in temps]
        heap = [(0, i) for i in range(num_files)]  # (bytes so far, index): fewest bytes first
        bar = tqdm(unit=" docs", disable=not progress or not sys.stderr.isatty(), desc="corpus")
        with bar, closing(_documents(files, fmt, workers, stats)) as documents:
            for doc in documents:
                size, i = heapq.heappop(heap)
                data = ("\n".join(doc) + "\n").encode("utf-8")
                if size:
                    data = b"\n" + data  # the blank line between documents
                handles[i].write(data)
                size += len(data)
                sizes[i] = size
                heapq.heappush(heap, (size, i))
                bar.update()
        for h in handles:
            h.close()
        if stats.documents == 0:
            where = f"{files[0]}{' …' if len(files) > 1 else ''}"
            raise DataPrepError(f"{where}: no documents found in {len(files)} input file(s) (wrong --format?)")
        for temp, final in zip(temps, finals, strict=True):
            os.replace(temp, final)
    finally:
        for h in handles:
            h.close()
        for temp in temps:
            temp.unlink(missing_ok=True)

    stats.output_files = finals
    stats.bytes_written = sum(sizes)
    stats.seconds = time.perf_counter() - start
    _log_summary(stats, files, output_dir)
    return stats


def _documents(files: list[Path], fmt: str, workers: int, stats: ReadStats) -> Iterator[list[str]]:
    """Processed documents of all files in input order, from a pool when that helps."""
    if workers == 1 or all((detect_format(f) if fmt == "auto" else fmt) == "docs" for f in files):
        for path in files:
            yield from iter_documents(path, fmt, stats)
        return
    # spawn, not fork: a forked child would inherit tqdm's monitor thread and any locks held.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pending: deque[tuple[list[RawDocument], AsyncResult | None]] = deque()
        limit = workers * _IN_FLIGHT_PER_WORKER
        for batch in _raw_batches(files, fmt, stats):
            pending.append((batch, _submit(pool, batch)))
            while len(pending) >= limit:
                yield from _collect(*pending.popleft(), stats)
        while pending:
            yield from _collect(*pending.popleft(), stats)


def _raw_batches(files: list[Path], fmt: str, stats: ReadStats) -> Iterator[list[RawDocument]]:
    batch: list[RawDocument] = []
    chars = 0
    for path in files:
        for raw in iter_raw_documents(path, fmt, stats):
            batch.append(raw)
            chars += len(raw.payload) if raw.kind != SENTENCES else 0
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _submit(pool: Pool, batch: list[RawDocument]) -> AsyncResult | None:
    work = [raw for raw in batch if raw.kind != SENTENCES]
    return pool.apply_async(_process_batch, (work,)) if work else None


def _process_batch(batch: list[RawDocument]) -> list[tuple[list[str], int]]:
    return [process_raw(raw) for raw in batch]


def _collect(batch: list[RawDocument], result: AsyncResult | None, stats: ReadStats) -> Iterator[list[str]]:
    """The batch's documents in order: ready ones as they are, the others from the worker."""
    processed = iter(result.get() if result is not None else ())
    for raw in batch:
        if raw.kind == SENTENCES:  # "docs" input: already counted by its reader
            yield list(raw.payload)
        else:
            sentences, cut = next(processed)
            if count_document(sentences, cut, stats):
                yield sentences


def _warn_stale(output_dir: Path, prefix: str, num_files: int) -> None:
    """Files of an earlier run with more output files would be read as part of this corpus."""
    stale = []
    for path in sorted(output_dir.glob(f"{prefix}-*.txt")):
        index = path.stem[len(prefix) + 1 :]
        if index.isdigit() and int(index) >= num_files:
            stale.append(path)
    if stale:
        log.warning(
            "%s: %d file(s) of an earlier run remain beyond the %d written now (%s…); delete them",
            output_dir,
            len(stale),
            num_files,
            stale[0].name,
        )


def _log_summary(stats: CorpusStats, files: list[Path], output_dir: Path) -> None:
    mb_in = stats.bytes / 1e6
    log.info(
        "corpus: %d documents, %d sentences from %d file(s) (%.1f MB) -> %d file(s) in %s (%.1f MB) in %.1fs (%.1f MB/s)",
        stats.documents,
        stats.sentences,
        stats.files,
        mb_in,
        len(stats.output_files),
        output_dir,
        stats.bytes_written / 1e6,
        stats.seconds,
        mb_in / stats.seconds if stats.seconds else 0.0,
    )
    skipped = {
        "empty files": stats.empty_files,
        "empty documents": stats.empty_documents,
        "wiki pages skipped (redirect/disambiguation/non-article)": stats.skipped_pages,
        "bad JSON lines": stats.bad_json_lines,
        "undecodable bytes replaced": stats.replaced_chars,
        "long lines cut": stats.long_lines_split,
        "long sentences cut": stats.long_sentences_split,
    }
    noted = ", ".join(f"{k}: {v}" for k, v in skipped.items() if v)
    if noted:
        log.info("corpus: %s", noted)
    empty = sum(1 for p in stats.output_files if p.stat().st_size == 0)
    if empty:
        log.warning(
            "%s: %d of %d output files are empty (fewer documents than files)",
            output_dir,
            empty,
            len(stats.output_files),
        )
