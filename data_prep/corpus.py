"""The `corpus` step: read raw inputs, write balanced files in the standard format.

Standard format: one sentence per line, a blank line between documents, UTF-8, "\\n" line ends.

The inputs are cut into parts that depend on the inputs alone: one per input file, one per byte
range of about `part_bytes` of a big uncompressed "docs" file (readers.docs_pieces), one per range of
bz2 streams of a multistream Wikipedia dump that has its index beside it (wiki.stream_ranges).
Two phases, each spread over worker processes and MPI ranks:

1. one task per part: read, clean and split its documents into `.work/parts/PART.txt` (standard
   format, every document followed by a blank line) and record its counts in `.work/done/PART.json`.
   A worker reads and cleans a part itself; a big file that cannot be cut (a wiki dump without
   index, a JSON lines file) is read by the rank's main process, which sends batches of documents
   to the workers for cleaning, so that one such file still keeps every worker busy.
2. one task per output file: the documents of all parts, in input order, are cut into `num_files`
   runs of about equal bytes at document boundaries; file i is a copy of run i.

The output therefore depends on the inputs, the format and the number of files alone, never on
workers or ranks. A killed run continues with `resume=True`: finished parts and files are kept. At
most one part file and one output file are open per process, whatever the number of files.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import atomic_path, write_text
from data_prep.compressed import compression
from data_prep.errors import DataPrepError
from data_prep.mpi import World, get_world
from data_prep.progress import progress as progress_of
from data_prep.readers import (
    FORMATS,
    SENTENCES,
    RawDocument,
    ReadStats,
    count_document,
    detect_format,
    docs_pieces,
    expand_inputs,
    iter_documents,
    iter_raw_documents,
    process_raw,
)
from data_prep.tasks import Task, run_tasks
from data_prep.wiki import multistream_index, stream_ranges

log = logging.getLogger(__name__)

WORK = ".work"
SUMMARY = ".corpus.json"  # hidden: readers of the folder (vocab, shard) skip it
# Parts of about this many stored bytes: a multistream range of this size is ~5x as much XML, a
# minute or so of cleaning on one core, so that workers finish together and a resumed run loses little.
PART_BYTES = 16 << 20
# num_files=0: one output file per this many bytes of text (at least AUTO_MIN_FILES).
AUTO_FILE_BYTES = 128 << 20
AUTO_MIN_FILES = 4
# A batch sent to a worker from a file read by the main process: big enough to amortise pickling,
# small enough to keep all workers busy and bound the memory of batches in flight.
_BATCH_DOCS = 64
_BATCH_CHARS = 1 << 20
# Batches in flight per worker: enough to hide the reader's latency, bounded so that memory does
# not grow when reading outpaces cleaning.
_IN_FLIGHT_PER_WORKER = 3
_COPY_BYTES = 1 << 20


@dataclass
class CorpusStats(ReadStats):
    """ReadStats of all inputs plus what was written."""

    output_files: list[Path] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Part:
    """One phase-1 task: input file `path` (format `fmt`), or bytes [start, stop) of it."""

    index: int
    path: str
    fmt: str
    start: int | None = None
    stop: int | None = None
    size: int = 0  # stored bytes: the order in which parts are dealt out
    streamed: bool = False  # read by the main process, cleaned by the workers in batches

    @property
    def name(self) -> str:
        return f"p{self.index:06d}"

    @property
    def piece(self) -> tuple[int, int] | None:
        return None if self.start is None else (self.start, self.stop)

    def describe(self) -> str:
        return self.path if self.start is None else f"{self.path} (bytes {self.start}-{self.stop})"


@dataclass
class _Paths:
    output: Path
    prefix: str

    @property
    def work(self) -> Path:
        return self.output / WORK

    def part_file(self, part: Part) -> Path:
        return self.work / "parts" / f"{part.name}.txt"

    def part_done(self, part: Part) -> Path:
        return self.work / "done" / f"{part.name}.json"

    def output_file(self, i: int) -> Path:
        return self.output / f"{self.prefix}-{i:05d}.txt"

    def output_done(self, i: int) -> Path:
        return self.work / "done" / f"out-{i:05d}.json"

    def claim(self) -> Path:
        """This worker's note of the part it is reading (for the message when it dies)."""
        return self.work / "running" / f"{socket.gethostname()}-{os.getpid()}"


def plan_parts(files: list[Path], fmt: str, part_bytes: int = PART_BYTES) -> list[Part]:
    """The parts of the inputs, in input order; they depend on the files and `part_bytes` alone. A
    multistream index beside its dump is the dump's index, not an input of its own."""
    indexes = {idx.resolve() for f in files if (idx := multistream_index(f)) is not None}
    parts: list[Part] = []
    for path in files:
        if path.resolve() in indexes:
            log.info("%s: index of a multistream dump, used to read it in parallel", path)
            continue
        kind = detect_format(path) if fmt == "auto" else fmt
        size = path.stat().st_size
        ranges: list[tuple[int, int]] | None = None
        if kind == "docs" and not compression(path) and size > part_bytes:
            ranges = docs_pieces(path, part_bytes)
        elif kind == "wiki" and (index := multistream_index(path)) is not None:
            ranges = stream_ranges(path, index, part_bytes)
            log.info("%s: multistream dump, %d ranges of bz2 streams (index %s)", path, len(ranges), index.name)
        if ranges and len(ranges) > 1:
            parts += [Part(len(parts) + k, str(path), kind, a, b, b - a) for k, (a, b) in enumerate(ranges)]
        else:
            streamed = kind != "docs" and kind != "files" and size > part_bytes
            parts.append(Part(len(parts), str(path), kind, size=size, streamed=streamed))
    if not parts:
        raise DataPrepError(f"{files[0]}: no input files besides multistream indexes")
    return parts


def write_corpus(
    inputs: list[Path],
    output_dir: Path,
    num_files: int = 0,
    fmt: str = "auto",
    workers: int = 1,
    prefix: str = "corpus",
    progress: bool = True,
    *,
    resume: bool = False,
    mpi: str = "off",
    allow_bad_bytes: bool = False,
    part_bytes: int = PART_BYTES,
    progress_every: float | None = None,
) -> CorpusStats:
    """Write the documents of `inputs` to `output_dir/{prefix}-00000.txt` … (`num_files` files; 0: one per
    AUTO_FILE_BYTES of text, at least AUTO_MIN_FILES). Byte-identical whatever `workers` and the MPI ranks
    (`mpi`: auto, on, off as for `shard`). Files appear under their final names only once complete; a
    non-empty `output_dir` is refused unless `resume`, which continues an interrupted run (or, on a finished
    one with the same settings and inputs, only returns its counts). Progress: bars on rank 0 with `progress` on a
    terminal, else a log line per rank every `progress_every` seconds (data_prep.progress)."""
    if num_files < 0:
        raise DataPrepError(f"{output_dir}: number of output files must be >= 1 (or 0: auto), got {num_files}")
    if workers < 1:
        raise DataPrepError(f"{output_dir}: workers must be >= 1, got {workers}")
    if fmt not in FORMATS:
        raise DataPrepError(f"{output_dir}: unknown input format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise DataPrepError(f"{output_dir}: bad output file prefix {prefix!r}")
    start = time.perf_counter()
    files = expand_inputs(inputs)
    world = get_world(mpi)
    paths = _Paths(Path(output_dir), prefix)
    settings = {
        "format": fmt,
        "num_files": num_files,
        "prefix": prefix,
        "allow_bad_bytes": allow_bad_bytes,
        "part_bytes": part_bytes,
        "inputs": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
    }
    error, parts, done = None, [], None
    if world.rank == 0:
        try:
            done = _prepare_output(paths, settings, resume)
            parts = [] if done else plan_parts(files, fmt, part_bytes)
        except DataPrepError as e:
            error = str(e)
    error, parts, done = world.bcast((error, parts, done))
    if error:
        raise DataPrepError(error)
    if done is not None:
        if world.rank == 0:
            log.info("%s: corpus already complete (%s; same settings and inputs): nothing to do", paths.output, SUMMARY)
        return _stats_from(done, paths)
    bar = progress and world.rank == 0

    # phase 1: biggest parts first, dealt round-robin to the ranks
    by_size = sorted(parts, key=lambda p: (-p.size, p.index))
    mine = [p for k, p in enumerate(by_size) if k % world.size == world.rank and not paths.part_done(p).exists()]
    if world.rank == 0:
        log.info("corpus: %d input file(s) in %d part(s)", len(files), len(parts))
    _run_phase(world, lambda: _read_parts(mine, paths, workers, allow_bad_bytes, bar, progress_every))

    # phase 2: every rank reads the same markers, so all agree on the counts and the cuts
    markers = [json.loads(paths.part_done(p).read_text()) for p in parts]
    read = ReadStats()
    for m in markers:
        read += ReadStats(**m["read"])
    if read.documents == 0:
        where = f"{files[0]}{' …' if len(files) > 1 else ''}"
        raise DataPrepError(f"{where}: no documents found in {len(files)} input file(s) (wrong --format?)")
    sizes = [m["bytes"] for m in markers]
    total = sum(sizes)
    n_files = num_files or max(AUTO_MIN_FILES, math.ceil(total / AUTO_FILE_BYTES))
    if not num_files and world.rank == 0:
        log.info("corpus: --num-files auto: %d", n_files)
    layout = [(str(paths.part_file(p)), s) for p, s in zip(parts, sizes, strict=True)]
    todo = [i for i in range(n_files) if i % world.size == world.rank and not paths.output_done(i).exists()]
    cuts = {i: _boundary(layout, i * total // n_files) for i in {*todo, *(i + 1 for i in todo)} if 0 < i < n_files}
    cuts.update({0: 0, n_files: total})
    tasks = [
        Task(
            f"output file {paths.output_file(i)}",
            (_segments(layout, cuts[i], cuts[i + 1]), str(paths.output_file(i)), str(paths.output_done(i))),
            cuts[i + 1] - cuts[i],
        )
        for i in todo
    ]
    _run_phase(world, lambda: run_tasks(_write_output, tasks, workers, "corpus files", bar, progress_every, "B"))

    summary = {
        "settings": settings,
        "num_files": n_files,
        "read": asdict(read),
        "bytes_written": sum(json.loads(paths.output_done(i).read_text())["bytes"] for i in range(n_files)),
        "seconds": time.perf_counter() - start,
    }
    stats = _stats_from(summary, paths)
    if world.rank == 0:
        write_text(paths.output / SUMMARY, json.dumps(summary, sort_keys=True, indent=1))
        shutil.rmtree(paths.work, ignore_errors=True)
        _log_summary(stats, paths.output)
    world.barrier()
    return stats


def _stats_from(summary: dict[str, Any], paths: _Paths) -> CorpusStats:
    stats = CorpusStats(**summary["read"])
    stats.output_files = [paths.output_file(i) for i in range(summary["num_files"])]
    stats.bytes_written = summary["bytes_written"]
    stats.seconds = summary["seconds"]
    return stats


def _prepare_output(paths: _Paths, settings: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Rank 0 checks and claims the output folder. Returns the summary of a finished run to keep, else None."""
    out = paths.output
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"{out}: exists and is not a directory")
    saved = paths.work / "settings.json"
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise DataPrepError(
                f"{out}: folder is not empty; pass --resume to continue an interrupted run, or choose an empty folder"
            )
        if (out / SUMMARY).exists() and not paths.work.exists():
            summary = json.loads((out / SUMMARY).read_text())
            if summary.get("settings") != settings:
                raise DataPrepError(
                    f"{out}: already complete, but made with other settings or inputs ({SUMMARY}); choose another --output"
                )
            missing = [p.name for p in _stats_from(summary, paths).output_files if not p.is_file()]
            if missing:
                raise DataPrepError(
                    f"{out}: {SUMMARY} lists files that are missing ({', '.join(missing[:5])}); remove the folder and run again"
                )
            return summary
        if not saved.exists():
            raise DataPrepError(
                f"{out}: not an interrupted `albert-data corpus` output (no {WORK}/settings.json); cannot resume"
            )
        if json.loads(saved.read_text()) != settings:
            raise DataPrepError(f"{out}: --resume with settings or inputs different from the interrupted run ({saved})")
        log.info("%s: resuming an interrupted run", out)
    for sub in ("parts", "done", "running"):
        (paths.work / sub).mkdir(parents=True, exist_ok=True)
    if not saved.exists():
        write_text(saved, json.dumps(settings, sort_keys=True))
    return None


def _run_phase(world: World, body) -> None:
    """This rank's tasks, then a barrier; a failure ends every rank (no one waits at the barrier forever)."""
    try:
        body()
    except BaseException as e:
        if world.size > 1:  # Abort ends this process too: say why first
            log.error("%s", e)
            world.abort()
        raise
    world.barrier()


# --- phase 1 -------------------------------------------------------------------------------------


def _claim(paths: _Paths, what: str) -> None:
    paths.claim().write_text(what)


def _read_part(task: tuple[Part, _Paths, bool]) -> None:
    """A whole part in one worker: read, clean, split, write its part file and marker."""
    part, paths, allow_bad_bytes = task
    _claim(paths, part.describe())
    stats = ReadStats()
    docs = iter_documents(Path(part.path), part.fmt, stats, part.piece, allow_bad_bytes)
    _write_part(paths, part, docs, stats)


def _write_part(paths: _Paths, part: Part, docs: Iterator[list[str]], stats: ReadStats) -> None:
    size = 0
    with atomic_path(paths.part_file(part)) as tmp:
        with open(tmp, "wb", buffering=1 << 20) as out:
            for doc in docs:
                data = ("\n".join(doc) + "\n\n").encode("utf-8")
                out.write(data)
                size += len(data)
    write_text(paths.part_done(part), json.dumps({"part": part.describe(), "bytes": size, "read": asdict(stats)}))


def _clean_batch(task: tuple[list[RawDocument], _Paths, str]) -> list[tuple[list[str], int]]:
    batch, paths, what = task
    _claim(paths, what)
    return [process_raw(raw) for raw in batch]


class _Pool:
    """A ProcessPoolExecutor whose dead worker (SIGKILL, out of memory, a crash) ends the run at once with
    a DataPrepError naming the part that worker was reading."""

    def __init__(self, workers: int, paths: _Paths):
        # spawn, not fork: a forked child would inherit tqdm's monitor thread, locks held and MPI's state.
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.paths = paths
        self.what: dict[Future, str] = {}
        self._procs: dict[int, Any] = {}

    def submit(self, fn, task, what: str) -> Future:
        fut = self.executor.submit(fn, task)
        self.what[fut] = what
        self._procs.update(getattr(self.executor, "_processes", None) or {})  # kept for their exit codes
        return fut

    def result(self, fut: Future):
        try:
            return fut.result()
        except BrokenProcessPool:
            raise self._died(fut) from None
        finally:
            self.what.pop(fut, None)

    def _died(self, fut: Future) -> DataPrepError:
        self.executor.shutdown(wait=True, cancel_futures=True)
        # the dead worker's exit code is its own (-9 for SIGKILL); the others were ended with SIGTERM
        dead = {pid for pid, p in self._procs.items() if p.exitcode not in (None, -signal.SIGTERM)}
        names = []
        for pid in dead:
            claim = self.paths.work / "running" / f"{socket.gethostname()}-{pid}"
            if claim.exists():
                names.append(claim.read_text())
        codes = sorted({p.exitcode for pid, p in self._procs.items() if pid in dead})
        how = ", ".join(f"killed by signal {-c}" if c < 0 else f"exit code {c}" for c in codes) or "died"
        what = names[0] if len(names) == 1 else (self.what.get(fut) or "one of the parts in progress")
        return DataPrepError(
            f"{what}: a worker process died while reading it ({how}; out of memory?); "
            "run the same command with --resume to continue"
        )

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def _read_parts(
    parts: list[Part], paths: _Paths, workers: int, allow_bad_bytes: bool, bar: bool, every: float | None
) -> None:
    if not parts:
        return
    with progress_of("corpus parts", sum(p.size for p in parts), "B", bar, every) as shown:
        if workers == 1:  # in this process, streamed parts too
            for part in parts:
                _read_part((part, paths, allow_bad_bytes))
                shown.update(part.size)
            return
        pool = _Pool(workers, paths)
        try:
            whole = {
                pool.submit(_read_part, (p, paths, allow_bad_bytes), p.describe()): p for p in parts if not p.streamed
            }
            for part in (p for p in parts if p.streamed):
                stats = ReadStats()
                _write_part(paths, part, _streamed_documents(part, paths, pool, workers, allow_bad_bytes, stats), stats)
                shown.update(part.size)
                _check_finished(pool, whole, shown)
            while whole:
                wait(whole, timeout=1.0, return_when=FIRST_COMPLETED)
                _check_finished(pool, whole, shown)
        finally:
            pool.close()


def _check_finished(pool: _Pool, futures: dict[Future, Part], shown) -> None:
    for fut in [f for f in futures if f.done()]:
        pool.result(fut)  # raises the worker's error
        shown.update(futures.pop(fut).size)
    shown.update(0)  # a due progress line


def _streamed_documents(
    part: Part, paths: _Paths, pool: _Pool, workers: int, allow_bad_bytes: bool, stats: ReadStats
) -> Iterator[list[str]]:
    """Documents of a part read here and cleaned by the workers, in order."""
    pending: deque[tuple[list[RawDocument], Future | None]] = deque()
    limit = workers * _IN_FLIGHT_PER_WORKER
    what = part.describe()
    raws = iter_raw_documents(Path(part.path), part.fmt, stats, part.piece, allow_bad_bytes)
    for batch in _raw_batches(raws):
        work = [raw for raw in batch if raw.kind != SENTENCES]
        pending.append((batch, pool.submit(_clean_batch, (work, paths, what), what) if work else None))
        while len(pending) >= limit:
            yield from _collect(*pending.popleft(), pool, stats)
    while pending:
        yield from _collect(*pending.popleft(), pool, stats)


def _raw_batches(raws: Iterator[RawDocument]) -> Iterator[list[RawDocument]]:
    batch: list[RawDocument] = []
    chars = 0
    for raw in raws:
        batch.append(raw)
        chars += len(raw.payload) if raw.kind != SENTENCES else 0
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _collect(batch: list[RawDocument], fut: Future | None, pool: _Pool, stats: ReadStats) -> Iterator[list[str]]:
    """The batch's documents in order: ready ones as they are, the others from the worker."""
    processed = iter(pool.result(fut) if fut is not None else ())
    for raw in batch:
        if raw.kind == SENTENCES:  # "docs" input: already counted by its reader
            yield list(raw.payload)
        else:
            sentences, cut = next(processed)
            if count_document(sentences, cut, stats):
                yield sentences


# --- phase 2 -------------------------------------------------------------------------------------


def _boundary(layout: list[tuple[str, int]], target: int) -> int:
    """The first document boundary at or after byte `target` of the parts joined in order (every
    document in a part file ends with "\n\n", and "\n\n" occurs nowhere else)."""
    start = 0
    for path, size in layout:
        if target <= start:
            return start
        if target < start + size:
            with open(path, "rb") as f:
                pos = max(target - start - 2, 0)
                f.seek(pos)
                carry = b""
                while block := f.read(1 << 16):
                    i = (carry + block).find(b"\n\n")
                    if i >= 0:
                        return start + pos - len(carry) + i + 2
                    carry = block[-1:]
                    pos += len(block)
            raise DataPrepError(f"{path}: part file does not end with a blank line (changed during the run?)")
        start += size
    return start


def _segments(layout: list[tuple[str, int]], begin: int, end: int) -> list[tuple[str, int, int]]:
    """(part file, first byte, last byte + 1) of bytes [begin, end) of the parts joined in order, without
    the blank line after the last document."""
    stop = end - 1 if end > begin else end
    segments, start = [], 0
    for path, size in layout:
        lo, hi = max(begin, start), min(stop, start + size)
        if lo < hi:
            segments.append((path, lo - start, hi - start))
        start += size
    return segments


def _write_output(task: tuple[list[tuple[str, int, int]], str, str]) -> None:
    """One output file: a copy of its segments of the part files; its marker records its size."""
    segments, final, marker = task
    written = 0
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as out:
            for path, lo, hi in segments:
                with open(path, "rb") as f:
                    f.seek(lo)
                    left = hi - lo
                    while left:
                        block = f.read(min(_COPY_BYTES, left))
                        if not block:
                            raise DataPrepError(f"{path}: part file shorter than recorded (changed during the run?)")
                        out.write(block)
                        left -= len(block)
                written += hi - lo
    write_text(marker, json.dumps({"bytes": written}))


def _log_summary(stats: CorpusStats, output_dir: Path) -> None:
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
    if stats.replaced_chars:
        log.warning(
            "corpus: %d undecodable byte sequence(s) replaced by U+FFFD (--allow-bad-bytes)", stats.replaced_chars
        )
    empty = sum(1 for p in stats.output_files if p.stat().st_size == 0)
    if empty:
        log.warning(
            "%s: %d of %d output files are empty (fewer documents than files)",
            output_dir,
            empty,
            len(stats.output_files),
        )
