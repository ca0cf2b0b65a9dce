"""The `corpus` step: read raw inputs, write balanced files in the standard format.

Standard format: one sentence per line, a blank line between documents, UTF-8, "\\n" line ends.

The inputs are sources (data_prep.mixture: a name, paths and a weight; a plain path is a source of
weight 1), and the sources' files are cut into parts that depend on the inputs alone: one per input
file, one per byte range of about `part_bytes` of a big uncompressed "docs" file (readers.docs_pieces),
one per range of bz2 streams of a multistream Wikipedia dump that has its index beside it
(wiki.stream_ranges), one per run of row groups of about `part_bytes` of a Parquet file
(parquet.row_group_parts). Phases of a resumable stage (data_prep/stage.py: one process per task,
spread over worker processes and MPI ranks):

1. one task per part: hash the input bytes it reads (data_prep.stage.Source), read, clean and
   split its documents into `.work/parts/PART.txt` (standard format, every document followed by a
   blank line) and record its files, counts and source in `.work/done/PART.json`. A big file that
   cannot be cut (a wiki dump without index, a JSON lines or paragraphs file) is "streamed": the
   rank's main process reads its raw documents and hands them out in chunks of about `part_bytes`
   characters, one task each, that cleans its chunk into `.work/parts/PART-cNNNNN.txt` (marker
   `.work/done/PART-cNNNNN.json`, with the sha256 of the chunk's raw documents); one more task hashes
   the file (`.work/done/PART-source.json`); once all are done the main process writes the part's
   marker (its chunk files in order, the counts of the reading and of the cleaning, the source).
   So one such file still keeps every worker busy.
2. only for a source whose weight is not a whole number: one task per part of it holding documents
   that the weight draws (data_prep.mixture.drawn_documents, from the counts of all its parts): copy
   them into `.work/parts/PART-w.txt` (marker `.work/done/PART-w.json`).
3. one task per output file: the documents of all parts' files, in input order, each source's as many
   times as its weight's whole copies and then its drawn documents, are cut into `num_files` runs of
   about equal bytes at document boundaries; file i is a copy of run i.

The output therefore depends on the inputs, the settings and the number of files alone, never on
workers, ranks or chunks. A killed run continues with `resume=True`: finished parts, chunks and
files are kept, as long as the inputs they were made from still hold the same bytes. Parts of an
input whose times moved since the interrupted run are hashed again, and those whose bytes differ
are made again, with every drawn-documents file and output file (data_prep.stage.Stage.keep_current);
a streamed part's finished chunks are kept only if their raw documents, read again, are the same; the
parts of a Parquet file are made again together when its last part (which holds the footer: the
schema and the row-group index that every part reads by) is. At most one part
file and one output file are open per process, whatever the number of files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path
from data_prep.compressed import compression
from data_prep.dedup import (
    NO_DEDUP,
    DedupSettings,
    FileDecision,
    Fingerprints,
    RemovedCounts,
    decide,
    evaluation_ngrams,
)
from data_prep.errors import DataPrepError
from data_prep.mixture import (
    DEFAULT_WEIGHT_SEED,
    InputSource,
    SourceStats,
    as_sources,
    drawn_count,
    drawn_documents,
)
from data_prep.mpi import get_world
from data_prep.parquet import DEFAULT_FIELDS, Fields, check_columns, row_group_parts
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
from data_prep.stage import (
    Finished,
    Source,
    Span,
    Stage,
    StageFolder,
    input_identity,
    read_json,
    recorded_inputs,
    write_json,
)
from data_prep.tasks import Task
from data_prep.wiki import multistream_index, stream_ranges

log = logging.getLogger(__name__)

# The layout of `.work` (2: streamed parts in chunk files; 3: the markers record the input bytes read, as sources and
# digests; 4: Parquet parts by row group, drawn-documents files of weighted sources, the text field and the
# sources' weights among the settings); --resume refuses another.
WORK_FORMAT = 4
SUMMARY = ".corpus.json"  # hidden: readers of the folder (vocab, shard) skip it
# The layout of SUMMARY (3: per-source counts, the text and title fields and the weights among the settings; 2: the
# inputs' times, cuts and sha256 recorded; 1 compared by path and size); a folder of a newer one is refused. What
# dedup removed ("removed", per source and in all) and its settings ("dedup") were added to 3 without a new version:
# a summary without them is of a run without dedup, and a reader that does not know them loses nothing it needs.
SUMMARY_VERSION = 3
# Settings that summaries before version 3 did not record, as those runs had them.
_SETTINGS_BEFORE_3 = {"text_field": "text", "title_field": None, "weights": None, "weight_seed": None}
_SOURCE = "-source"  # a streamed part's marker of the file's bytes: PART-source.json
_DRAWN = "-w"  # the drawn documents of a part of a source with a fractional weight: PART-w.txt, PART-w.json
_SCREENED = "-d"  # a part's documents less what dedup and decontamination removed: PART-d.txt, PART-d.json
_PART_MARKER = re.compile(rf"p\d{{6}}({_SOURCE})?")  # the markers that record a source
# Parts of about this many stored bytes: a multistream range of this size is ~5x as much XML, a
# minute or so of cleaning on one core, so that workers finish together and a resumed run loses little.
PART_BYTES = 16 << 20
# num_files=0: one output file per this many bytes of text (at least AUTO_MIN_FILES).
AUTO_FILE_BYTES = 128 << 20
AUTO_MIN_FILES = 4
# A chunk of a streamed part ends after `part_bytes` characters of raw text or this many documents (bounding the
# memory of a chunk of tiny documents); both fixed, so the chunks depend on the input and the settings alone.
CHUNK_DOCUMENTS = 100_000
_COPY_BYTES = 1 << 20


@dataclass
class CorpusStats(ReadStats):
    """ReadStats of all inputs plus what was written."""

    output_files: list[Path] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    sources: list[SourceStats] = field(default_factory=list)  # per source: read, removed, written after weighting
    removed: RemovedCounts = field(default_factory=RemovedCounts)  # by dedup and decontamination, all sources


@dataclass(frozen=True)
class Part:
    """One phase-1 task: input file `path` (format `fmt`), or bytes [start, stop) of it (of a Parquet file: its
    row groups [first, stop) `row_groups`, stored in those bytes)."""

    index: int
    path: str
    fmt: str
    start: int | None = None
    stop: int | None = None
    size: int = 0  # stored bytes: the order in which parts are dealt out
    streamed: bool = False  # read by the main process, cleaned by the workers in chunks
    source: int = 0  # the index of its source (data_prep.mixture)
    row_groups: tuple[int, int] | None = None
    last_of_file: bool = True  # the file's last part (of a Parquet file: the one holding its footer)

    @property
    def name(self) -> str:
        return f"p{self.index:06d}"

    @property
    def piece(self) -> tuple[int, int] | None:
        """The byte range its reader reads (docs pieces, multistream ranges); None: the whole file or row groups."""
        if self.row_groups is not None or self.start is None or self.stop is None:
            return None
        return (self.start, self.stop)

    def describe(self) -> str:
        if self.row_groups is not None:
            first, stop = self.row_groups
            return f"{self.path} (row groups {first}-{stop - 1}, bytes {self.start}-{self.stop})"
        return self.path if self.start is None else f"{self.path} (bytes {self.start}-{self.stop})"

    def span(self) -> Span:
        """The stored bytes the part reads: its range, or the whole file."""
        return Span.of(self.path, self.start, self.stop)


def plan_parts(
    files: list[Path],
    fmt: str,
    part_bytes: int = PART_BYTES,
    fields: Fields = DEFAULT_FIELDS,
    source_of: list[int] | None = None,
) -> list[Part]:
    """The parts of the inputs, in input order; they depend on the files and `part_bytes` alone. A
    multistream index beside its dump is the dump's index, not an input of its own. `source_of`: the index
    of each file's source (all 0 when None). A Parquet file's columns are checked here (`fields`)."""
    indexes = {idx.resolve() for f in files if (idx := multistream_index(f)) is not None}
    parts: list[Part] = []
    for k, path in enumerate(files):
        source = source_of[k] if source_of is not None else 0
        if path.resolve() in indexes:
            log.info("%s: index of a multistream dump, used to read it in parallel", path)
            continue
        kind = detect_format(path) if fmt == "auto" else fmt
        size = path.stat().st_size
        if kind == "parquet" and size > 0:
            groups = row_group_parts(path, fields, part_bytes)
            parts += [
                Part(
                    len(parts) + j,
                    str(path),
                    kind,
                    group.start,
                    group.end,
                    group.end - group.start,
                    source=source,
                    row_groups=(group.first, group.stop),
                    last_of_file=j == len(groups) - 1,
                )
                for j, group in enumerate(groups)
            ]
            continue
        ranges: list[tuple[int, int]] | None = None
        if kind == "docs" and not compression(path) and size > part_bytes:
            ranges = docs_pieces(path, part_bytes)
        elif kind == "wiki" and (index := multistream_index(path)) is not None:
            ranges = stream_ranges(path, index, part_bytes)
            log.info("%s: multistream dump, %d ranges of bz2 streams (index %s)", path, len(ranges), index.name)
        if ranges and len(ranges) > 1:
            parts += [
                Part(
                    len(parts) + j,
                    str(path),
                    kind,
                    start,
                    stop,
                    stop - start,
                    source=source,
                    last_of_file=j == len(ranges) - 1,
                )
                for j, (start, stop) in enumerate(ranges)
            ]
        else:
            streamed = kind not in ("docs", "files", "parquet") and size > part_bytes
            parts.append(Part(len(parts), str(path), kind, size=size, streamed=streamed, source=source))
    if not parts:
        raise DataPrepError(f"{files[0]}: no input files besides multistream indexes")
    return parts


def output_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:05d}.txt"


def _part_file(folder: StageFolder, name: str) -> Path:
    """The cleaned documents of a part or of a chunk of a streamed part."""
    return folder.sub("parts") / f"{name}.txt"


def write_corpus(
    inputs: list[Any],
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
    fields: Fields = DEFAULT_FIELDS,
    weight_seed: int = DEFAULT_WEIGHT_SEED,
    dedup: DedupSettings = NO_DEDUP,
) -> CorpusStats:
    """Write the documents of `inputs` to `output_dir/{prefix}-00000.txt` … (`num_files` files; 0: one per
    AUTO_FILE_BYTES of text, at least AUTO_MIN_FILES). `inputs`: paths (files or folders, each a source of weight
    1) or data_prep.mixture.InputSource (a name, paths and a weight; a fractional weight draws documents seeded by
    `weight_seed`). `fields`: the text (and title) field of JSON lines and Parquet inputs. `dedup`: exact
    deduplication and decontamination (data_prep.dedup), before the weights apply. Byte-identical whatever
    `workers` and the MPI ranks (`mpi`: auto, on, off as for `shard`). Files appear under their final names only once complete; a
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
    if not fields.text or fields.title == "":
        raise DataPrepError(f"{output_dir}: the text and title fields need a name")
    dedup.check(Path(output_dir))
    start = time.perf_counter()
    sources = as_sources(inputs)
    files, source_of = source_files(sources)
    world = get_world(mpi)
    folder = StageFolder(Path(output_dir), "corpus", WORK_FORMAT, SUMMARY, ("parts", "done"))
    stage = Stage(folder, world, workers, progress and world.rank == 0, progress_every)
    weighted = any(source.weight != 1 for source in sources)
    settings = {
        "format": fmt,
        "num_files": num_files,
        "prefix": prefix,
        "allow_bad_bytes": allow_bad_bytes,
        "part_bytes": part_bytes,
        "text_field": fields.text,
        "title_field": fields.title,
        # (which files each weight applies to; None: every weight 1, the names only label the summary)
        "weights": [[s.name, s.weight, source_of.count(i)] for i, s in enumerate(sources)] if weighted else None,
        "weight_seed": weight_seed if any(source.fraction for source in sources) else None,
    }
    if dedup.active:  # (only then: a run without them has the identity it always had)
        settings["dedup"] = dedup.identity()
    identity: dict[str, Any] = {"settings": settings, "inputs": input_identity(files)}
    with world.abort_on_error():
        # (a Parquet file without the text column is refused before the output folder is made)
        world.run_on_rank0(lambda: _check_parquet(files, fmt, fields))
        if stage.open(identity, resume, lambda: _finished_run(folder, prefix)):
            if world.rank == 0:
                log.info(
                    "%s: corpus already complete (%s; same settings and inputs): nothing to do", folder.output, SUMMARY
                )
            return _stats_from(_read_summary(folder.output / SUMMARY), folder, prefix)
        parts = world.run_on_rank0(lambda: plan_parts(files, fmt, part_bytes, fields, source_of))
        if world.rank == 0:
            log.info("corpus: %d input file(s) in %d part(s)", len(files), len(parts))
        stage.keep_current(
            lambda: _planned(parts),
            lambda: _finished_parts(folder),
            lambda names: _redo(folder, prefix, names, parts),
            "part",
        )
        screen = _screen_of(dedup, world) if dedup.active else None
        _read_parts(stage, parts, allow_bad_bytes, part_bytes, fields, screen)
        written = _write_outputs(stage, files, parts, num_files, prefix, sources, source_of, weight_seed, dedup)
        # (rank 0 writes the summary: it alone hashes a file no part read, a multistream index)
        recorded = recorded_inputs(identity["inputs"], written.spans) if world.rank == 0 else identity["inputs"]
        summary = {
            "summary_version": SUMMARY_VERSION,
            "settings": {**settings, "inputs": recorded},  # (the inputs among the settings, as in version 1)
            "num_files": written.num_files,
            "read": asdict(written.read),
            "bytes_written": written.bytes,
            "sources": [source.to_json() for source in written.sources],
            "removed": asdict(sum_removed(written.sources)),
            "seconds": time.perf_counter() - start,
        }
        if world.rank == 0:
            write_json(folder.output / SUMMARY, summary)
        stage.close()
    stats = _stats_from(summary, folder, prefix)
    if world.rank == 0:
        _log_summary(stats, folder.output, dedup)
    return stats


def source_files(sources: list[InputSource]) -> tuple[list[Path], list[int]]:
    """The input files of the sources, in order (data_prep.readers.expand_inputs of each), and the index of each
    one's source. Every path is checked before any folder is walked. A file reached again (through another path)
    stays where it came first; a file in two sources of which one is weighted is refused (its weight would be
    ambiguous)."""
    for source in sources:
        for path in source.paths:
            if not path.exists():
                raise DataPrepError(f"{path}: no such file or directory")
    files: list[Path] = []
    source_of: list[int] = []
    owner: dict[Path, int] = {}
    for index, source in enumerate(sources):
        before = len(files)
        for file in expand_inputs(source.paths):
            key = file.resolve()
            first = owner.get(key)
            if first is None:
                owner[key] = index
                files.append(file)
                source_of.append(index)
            elif first != index and (sources[first].weight != 1 or source.weight != 1):
                raise DataPrepError(
                    f"{file}: in sources {sources[first].name!r} and {source.name!r}, one of them weighted: "
                    "give the file to one source"
                )
        if len(files) == before:
            log.warning("source %s: all its files are in an earlier source already; it adds nothing", source.name)
    return files, source_of


def _check_parquet(files: list[Path], fmt: str, fields: Fields) -> None:
    for path in files:
        if (fmt if fmt != "auto" else detect_format(path)) == "parquet" and path.stat().st_size > 0:
            check_columns(path, fields)


def _read_summary(path: Path) -> dict[str, Any]:
    summary = read_json(path)
    version = summary.get("summary_version", 1)  # (version 1 did not record it)
    if version > SUMMARY_VERSION:
        raise DataPrepError(
            f"{path}: made by a newer albert-data (summary version {version}; this one reads up to {SUMMARY_VERSION})"
        )
    return summary


def _finished_run(folder: StageFolder, prefix: str) -> Finished:
    summary = _read_summary(folder.output / SUMMARY)
    settings = dict(summary["settings"])
    inputs = settings.pop("inputs")
    if summary.get("summary_version", 1) < 3:  # the runs before these settings were recorded had these values
        settings = {**_SETTINGS_BEFORE_3, **settings}
    if summary.get("summary_version", 1) < 2:  # recorded the inputs' paths and sizes only
        inputs = [{"path": entry["path"], "bytes": entry["bytes"]} for entry in inputs]
    files: list[tuple[str, int | None]] = [(output_name(prefix, i), None) for i in range(summary["num_files"])]
    return Finished({"settings": settings, "inputs": inputs}, files)


def _stats_from(summary: dict[str, Any], folder: StageFolder, prefix: str) -> CorpusStats:
    stats = CorpusStats(**summary["read"])
    stats.output_files = [folder.output / output_name(prefix, i) for i in range(summary["num_files"])]
    stats.bytes_written = summary["bytes_written"]
    stats.seconds = summary["seconds"]
    stats.sources = [SourceStats.from_json(source) for source in summary.get("sources", [])]
    stats.removed = sum_removed(stats.sources)
    return stats


def sum_removed(sources: list[SourceStats]) -> RemovedCounts:
    """What dedup and decontamination removed of all sources."""
    total = RemovedCounts()
    for source in sources:
        total += source.removed
    return total


# --- phase 1 -------------------------------------------------------------------------------------


def _planned(parts: list[Part]) -> dict[str, Span]:
    """What each part's task reads (a streamed part: also the task that hashes its file)."""
    planned = {}
    for part in parts:
        planned[part.name] = part.span()
        if part.streamed:
            planned[part.name + _SOURCE] = planned[part.name]
    return planned


def _finished_parts(folder: StageFolder) -> dict[str, Source]:
    """The finished tasks that recorded what they read: parts, and the hashes of streamed parts' files."""
    return {
        marker.stem: Source.from_json(read_json(marker)["source"])
        for marker in folder.sub("done").glob("p*.json")
        if _PART_MARKER.fullmatch(marker.stem)
    }


def _redo(folder: StageFolder, prefix: str, names: list[str], parts: list[Part]) -> None:
    """Parts to make again: first the output files, the drawn documents and the deduplicated parts (made from every
    part, so all are made again), then the parts' markers (a streamed part's chunks are kept where their documents, read again, are the
    same). The last part of a Parquet file holds its footer, which every part of the file is read by: when it is
    made again, so are they all."""
    done = folder.sub("done")
    for marker in [*done.glob("out-*.json"), *done.glob(f"p*{_DRAWN}.json"), *done.glob(f"p*{_SCREENED}.json")]:
        marker.unlink()
    for output in folder.output.glob(f"{glob.escape(prefix)}-[0-9]*.txt"):
        output.unlink()
    redo = set(names)
    for part in parts:
        if part.row_groups is not None and part.last_of_file and part.name in redo:
            same_file = [other.name for other in parts if other.path == part.path]
            log.info("%s: its footer changed: all %d parts of the file are made again", part.path, len(same_file))
            redo.update(same_file)
    for name in sorted(redo):
        folder.marker(name).unlink(missing_ok=True)


@dataclass(frozen=True)
class _Screen:
    """What the tasks that clean documents need to fingerprint them for dedup and decontamination."""

    settings: DedupSettings
    ngrams: np.ndarray | None  # of the evaluation texts (data_prep.dedup.evaluation_ngrams), when --exclude-overlap

    def fingerprints(self) -> Fingerprints:
        return Fingerprints(self.settings, self.ngrams)


def _screen_of(dedup: DedupSettings, world: Any) -> _Screen:
    """The settings, and the evaluation texts' n-grams made once on rank 0 and sent to every rank."""
    if not dedup.exclude_overlap:
        return _Screen(dedup, None)
    ngrams = world.run_on_rank0(lambda: evaluation_ngrams(dedup.exclude_overlap, dedup.overlap_ngram))
    if world.rank == 0:
        log.info(
            "corpus: --exclude-overlap: %d distinct %d-grams in %d evaluation file(s)",
            len(ngrams),
            dedup.overlap_ngram,
            len(dedup.exclude_overlap),
        )
    return _Screen(dedup, ngrams)


def _read_parts(
    stage: Stage,
    parts: list[Part],
    allow_bad_bytes: bool,
    part_bytes: int,
    fields: Fields,
    screen: _Screen | None = None,
) -> None:
    """This rank's parts not done yet, biggest first: whole parts one task each; streamed parts read here and
    cleaned in chunks, one task each, a whole part between two chunks (so that no worker waits while this process
    reads); then the streamed parts' markers. With `screen`, every part file gets its fingerprints beside it."""
    folder = stage.folder
    mine = [p for p in stage.share(parts, lambda p: p.size) if not folder.marker(p.name).exists()]
    whole = (
        Task(_task_name(p), ("part", (p, folder, allow_bad_bytes, fields, screen)), p.size)
        for p in mine
        if not p.streamed
    )
    streamed = [_Streamed(p, folder, allow_bad_bytes, part_bytes, fields, screen) for p in mine if p.streamed]

    def tasks() -> Iterator[Task]:
        for part in streamed:
            for task in part.tasks():
                yield task
                if (between := next(whole, None)) is not None:
                    yield between
        yield from whole

    def record_streamed() -> None:
        for part in streamed:
            part.write_marker()

    total = sum(p.size for p in mine)
    stage.run(_part_task, tasks(), "corpus parts", "B", total, then=record_streamed)


def _task_name(part: Part) -> str:
    return f"part {part.name} ({part.describe()})"


def _part_task(task: tuple[str, Any]) -> None:
    kind, args = task
    if kind == "part":
        _read_part(args)
    elif kind == "source":
        _hash_source(args)
    else:
        _clean_batch(args)


def _read_part(task: tuple[Part, StageFolder, bool, Fields, _Screen | None]) -> None:
    """A whole part in one task: read, clean, split; its part file (and its fingerprints) and its marker."""
    part, folder, allow_bad_bytes, fields, screen = task
    source = Source.read(part.span())  # (before reading: bytes changed meanwhile make it differ at a --resume)
    stats = ReadStats()
    docs = iter_documents(Path(part.path), part.fmt, stats, part.piece, allow_bad_bytes, fields, part.row_groups)
    size = _write_documents(_part_file(folder, part.name), docs, screen)
    write_json(
        folder.marker(part.name),
        {"part": part.describe(), "files": [[part.name, size]], "read": asdict(stats), "source": source.to_json()},
    )


def _hash_source(task: tuple[Part, StageFolder]) -> None:
    """The bytes of a streamed part's file, hashed beside its reading: its marker PART-source.json."""
    part, folder = task
    write_json(folder.marker(part.name + _SOURCE), {"source": Source.read(part.span()).to_json()})


def _clean_batch(task: tuple[list[RawDocument], StageFolder, str, _Screen | None]) -> None:
    """A chunk of a streamed part in one task: clean and split its documents; its part file (and its fingerprints)
    and its marker (with the sha256 of the raw documents, which a --resume compares with those it reads again)."""
    raws, folder, name, screen = task
    stats = ReadStats()
    size = _write_documents(_part_file(folder, name), _cleaned(raws, stats), screen)
    write_json(folder.marker(name), {"bytes": size, "read": asdict(stats), "documents_sha256": _documents_sha256(raws)})


def _documents_sha256(raws: list[RawDocument]) -> str:
    """What a chunk of a streamed part was made from: its raw documents, each with its kind and length."""
    digest = hashlib.sha256()
    for raw in raws:
        text = raw.payload if isinstance(raw.payload, str) else "\n".join(raw.payload)
        data = text.encode("utf-8", "surrogatepass")  # (JSON text may hold lone surrogates)
        digest.update(f"{raw.kind}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def _cleaned(raws: list[RawDocument], stats: ReadStats) -> Iterator[list[str]]:
    for raw in raws:
        if raw.kind == SENTENCES:  # "docs" input: already counted by its reader
            yield list(raw.payload)
        else:
            sentences, cut = process_raw(raw)
            if count_document(sentences, cut, stats):
                yield sentences


def _write_documents(path: Path, docs: Iterator[list[str]], screen: _Screen | None = None) -> int:
    """Documents in the standard format, each followed by a blank line; the bytes written. With `screen`, their
    fingerprints too (PART.fingerprints.npz, written before the part file: the part's marker comes after both)."""
    size = 0
    prints = screen.fingerprints() if screen is not None else None
    with atomic_path(path) as tmp:
        with open(tmp, "wb", buffering=1 << 20) as out:
            for doc in docs:
                data = ("\n".join(doc) + "\n\n").encode("utf-8")
                out.write(data)
                size += len(data)
                if prints is not None:
                    prints.add(doc, len(data))
        if prints is not None:
            prints.save(path)
    return size


class _Streamed:
    """A part read by this process and cleaned in chunks by the workers."""

    def __init__(
        self,
        part: Part,
        folder: StageFolder,
        allow_bad_bytes: bool,
        chunk_chars: int,
        fields: Fields,
        screen: _Screen | None = None,
    ):
        self.part, self.folder, self.allow_bad_bytes, self.chunk_chars = part, folder, allow_bad_bytes, chunk_chars
        self.fields, self.screen = fields, screen
        self.reading = ReadStats()  # what the reading counted (files, bytes, pages skipped, bad lines …)
        self.chunks: list[str] = []

    def tasks(self) -> Iterator[Task]:
        """The task that hashes the file (unless done), then a task per chunk not done yet, read as they are taken;
        the last one brings the part's progress. A chunk done before the run was interrupted is kept if its raw
        documents are the same now."""
        part = self.part
        if not self.folder.marker(part.name + _SOURCE).exists():
            yield Task(f"{_task_name(part)} sha256", ("source", (part, self.folder)), 0)
        raws = iter_raw_documents(
            Path(part.path), part.fmt, self.reading, part.piece, self.allow_bad_bytes, self.fields
        )
        held: Task | None = None
        for k, batch in enumerate(_chunks(raws, self.chunk_chars)):
            name = f"{part.name}-c{k:05d}"
            self.chunks.append(name)
            if self._done_from(name, batch):
                continue
            if held is not None:
                yield held
            held = Task(f"{_task_name(part)} chunk {k}", ("chunk", (batch, self.folder, name, self.screen)), 0)
        if held is not None:
            yield Task(held.name, held.args, part.size)

    def _done_from(self, name: str, batch: list[RawDocument]) -> bool:
        """Whether chunk `name` was done before the run was interrupted, from these raw documents."""
        marker = self.folder.marker(name)
        if not marker.exists():
            return False
        if read_json(marker)["documents_sha256"] == _documents_sha256(batch):
            return True
        log.warning(
            "%s: modified since the interrupted run: the documents of part %s chunk %s differ; cleaned again",
            self.part.path,
            self.part.name,
            name.rsplit("-c", 1)[1],
        )
        return False

    def write_marker(self) -> None:
        """Once every chunk is done: the part's files in order, its counts and its source (the file's bytes)."""
        stats = ReadStats().merge(self.reading)
        files = []
        for name in self.chunks:
            chunk = read_json(self.folder.marker(name))
            stats += ReadStats(**chunk["read"])
            files.append([name, chunk["bytes"]])
        source = read_json(self.folder.marker(self.part.name + _SOURCE))["source"]
        write_json(
            self.folder.marker(self.part.name),
            {"part": self.part.describe(), "files": files, "read": asdict(stats), "source": source},
        )


def _chunks(raws: Iterator[RawDocument], chars: int) -> Iterator[list[RawDocument]]:
    batch: list[RawDocument] = []
    size = 0
    for raw in raws:
        batch.append(raw)
        size += len(raw.payload) if raw.kind != SENTENCES else 0
        if size >= chars or len(batch) >= CHUNK_DOCUMENTS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --- phases 2 and 3 ------------------------------------------------------------------------------


@dataclass
class _Written:
    """What the output phase gives every rank: the counts of the reading, the number of output files, the bytes
    written, what the parts read (their sources), and the counts of each input source."""

    read: ReadStats
    num_files: int
    bytes: int
    spans: list[Source]
    sources: list[SourceStats]


def _write_outputs(
    stage: Stage,
    files: list[Path],
    parts: list[Part],
    num_files: int,
    prefix: str,
    sources: list[InputSource],
    source_of: list[int],
    weight_seed: int,
    dedup: DedupSettings,
) -> _Written:
    """The output files, cut from the parts' files (less what dedup and decontamination removed) in input order,
    each source's whole copies then its drawn documents; every rank reads the same markers, so all agree on the
    counts and the cuts."""
    folder, world = stage.folder, stage.world
    markers = [read_json(folder.marker(p.name)) for p in parts]
    read = ReadStats()
    per_source = [SourceStats(s.name, s.weight, source_of.count(i)) for i, s in enumerate(sources)]
    for part, marker in zip(parts, markers):
        counted = ReadStats(**marker["read"])
        read += counted
        per_source[part.source].read += counted
    if read.documents == 0:
        where = f"{files[0]}{' …' if len(files) > 1 else ''}"
        raise DataPrepError(f"{where}: no documents found in {len(files)} input file(s) (wrong --format?)")
    if dedup.active:
        contents = _screen_parts(stage, parts, markers, dedup)
    else:
        contents = [_Content.of(folder, marker) for marker in markers]
    drawn = _draw(stage, parts, contents, sources, weight_seed)
    layout: list[tuple[str, int]] = []
    for index, source in enumerate(sources):
        held = [content for part, content in zip(parts, contents) if part.source == index]
        own = [file for content in held for file in content.files]
        mine = [(part.name, drawn[part.name]) for part in parts if part.source == index and part.name in drawn]
        layout += own * source.copies + [(str(_part_file(folder, name + _DRAWN)), made["bytes"]) for name, made in mine]
        stats = per_source[index]
        for content in held:
            stats.removed += content.removed
        documents, sentences = sum(c.documents for c in held), sum(c.sentences for c in held)
        stats.documents_written = source.copies * documents + sum(made["documents"] for _, made in mine)
        stats.sentences_written = source.copies * sentences + sum(made["sentences"] for _, made in mine)
        stats.bytes_written = source.copies * sum(size for _, size in own) + sum(made["bytes"] for _, made in mine)
    total = sum(size for _, size in layout)
    n_files = num_files or max(AUTO_MIN_FILES, math.ceil(total / AUTO_FILE_BYTES))
    if not num_files and world.rank == 0:
        log.info("corpus: --num-files auto: %d", n_files)
    outputs = [folder.output / output_name(prefix, i) for i in range(n_files)]
    todo = [i for i in stage.share(list(range(n_files)), lambda i: 0) if not folder.marker(f"out-{i:05d}").exists()]
    cuts = {i: _boundary(layout, i * total // n_files) for i in {*todo, *(i + 1 for i in todo)} if 0 < i < n_files}
    cuts.update({0: 0, n_files: total})
    tasks = [
        Task(
            f"output file {outputs[i]}",
            (_segments(layout, cuts[i], cuts[i + 1]), str(outputs[i]), str(folder.marker(f"out-{i:05d}"))),
            cuts[i + 1] - cuts[i],
        )
        for i in todo
    ]
    stage.run(_write_output, tasks, "corpus files", "B")
    written = sum(read_json(folder.marker(f"out-{i:05d}"))["bytes"] for i in range(n_files))
    spans = [Source.from_json(marker["source"]) for marker in markers]
    return _Written(read, n_files, written, spans, per_source)


@dataclass
class _Content:
    """What a part gives the corpus before weighting: its files in order (path, bytes), its documents and sentences,
    and what dedup and decontamination removed of it."""

    files: list[tuple[str, int]]
    documents: int
    sentences: int
    removed: RemovedCounts = field(default_factory=RemovedCounts)

    @classmethod
    def of(cls, folder: StageFolder, marker: dict[str, Any]) -> _Content:
        """A part as read: its part files."""
        files = [(str(_part_file(folder, name)), size) for name, size in marker["files"]]
        return cls(files, marker["read"]["documents"], marker["read"]["sentences"])


def _screen_parts(
    stage: Stage, parts: list[Part], markers: list[dict[str, Any]], dedup: DedupSettings
) -> list[_Content]:
    """Dedup and decontamination (data_prep.dedup): every rank decides for its share of the parts (an exchange of
    hashes with the other ranks), then copies the kept documents of each of them that loses any into PART-d.txt
    (one task per part, phase `corpus dedup`; a finished one is kept if made from the same files and decisions).
    Returns, on every rank, what each part gives the corpus."""
    folder, world = stage.folder, stage.world
    numbered = [(part, name) for part, marker in zip(parts, markers) for name, _ in marker["files"]]
    mine = stage.share(parts, lambda p: p.size)
    owned = {part.name for part in mine}
    files = [(k, _part_file(folder, name)) for k, (part, name) in enumerate(numbered) if part.name in owned]
    decisions = decide(world, files, dedup)
    changed, tasks = [], []
    for part in mine:
        content = _Content.of(folder, markers[part.index])
        made = [decisions[Path(path)] for path, _ in content.files]
        done = folder.marker(part.name + _SCREENED)
        if not any(decision.changes for decision in made):
            done.unlink(missing_ok=True)
            continue
        changed.append(part.name)
        digest = hashlib.sha256(json.dumps(content.files).encode())
        for decision in made:
            for flags in (decision.duplicate, decision.overlap, decision.boilerplate):
                digest.update(np.packbits(flags).tobytes() + len(flags).to_bytes(8, "little"))
        if done.exists() and read_json(done)["screened_sha256"] == digest.hexdigest():
            continue
        name = f"deduplicated part {part.name} ({part.describe()})"
        tasks.append(Task(name, (content.files, made, digest.hexdigest(), folder, part.name), part.size))
    stage.run(_write_screened, tasks, "corpus dedup", "B")
    screened = {name for names in world.allgather(changed) for name in names}
    contents = []
    for part, marker in zip(parts, markers):
        if part.name not in screened:
            contents.append(_Content.of(folder, marker))
            continue
        screened_part = read_json(folder.marker(part.name + _SCREENED))
        contents.append(
            _Content(
                [(str(_part_file(folder, part.name + _SCREENED)), screened_part["bytes"])],
                screened_part["documents"],
                screened_part["sentences"],
                RemovedCounts(**screened_part["removed"]),
            )
        )
    return contents


def _write_screened(task: tuple[list[tuple[str, int]], list[FileDecision], str, StageFolder, str]) -> None:
    """The documents of one part less those decided out, and its kept documents less their boilerplate lines (a
    document left with fewer than two is removed); its marker with the counts."""
    files, decisions, digest, folder, name = task
    removed = RemovedCounts()
    documents = sentences = size = 0
    with atomic_path(_part_file(folder, name + _SCREENED)) as tmp:
        with open(tmp, "wb", buffering=1 << 20) as out:
            for (path, _), decision in zip(files, decisions):
                index = line = 0
                for index, document in enumerate(_documents_in(Path(path)), 1):
                    lines = document.count(b"\n") - 1
                    drop = decision.boilerplate[line : line + lines]
                    line += lines
                    if decision.overlap[index - 1]:
                        removed.overlap_documents += 1
                        removed.overlap_bytes += len(document)
                        continue
                    if decision.duplicate[index - 1]:
                        removed.duplicate_documents += 1
                        removed.duplicate_bytes += len(document)
                        continue
                    if drop.any():
                        kept = [text for text, gone in zip(document[:-2].split(b"\n"), drop) if not gone]
                        removed.boilerplate_lines += int(drop.sum())
                        if len(kept) < 2:
                            removed.emptied_documents += 1
                            removed.boilerplate_bytes += len(document)
                            continue
                        shorter = b"\n".join(kept) + b"\n\n"
                        removed.boilerplate_bytes += len(document) - len(shorter)
                        document = shorter
                    out.write(document)
                    documents += 1
                    sentences += document.count(b"\n") - 1
                    size += len(document)
                if index != len(decision.duplicate) or line != len(decision.boilerplate):
                    raise DataPrepError(f"{path}: part file and its fingerprints disagree (changed during the run?)")
    marker = {
        "bytes": size,
        "documents": documents,
        "sentences": sentences,
        "removed": asdict(removed),
        "screened_sha256": digest,
    }
    write_json(folder.marker(name + _SCREENED), marker)


def _draw(
    stage: Stage, parts: list[Part], contents: list[_Content], sources: list[InputSource], weight_seed: int
) -> dict[str, dict[str, Any]]:
    """The documents that fractional weights draw (data_prep.mixture), copied out of their parts' files into
    PART-w.txt, one task per part that holds some, spread over the ranks; a finished task is kept if it was made
    from the same part files and draw. Returns, on every rank, part name -> the marker of its drawn documents
    (their bytes, documents and sentences)."""
    folder = stage.folder
    items = []
    for index, source in enumerate(sources):
        if not source.fraction:
            continue
        own = [(part, content) for part, content in zip(parts, contents) if part.source == index]
        documents = sum(content.documents for _, content in own)
        chosen = drawn_documents(documents, drawn_count(documents, source.fraction), weight_seed, source.name)
        first = 0
        for part, content in own:
            count = content.documents
            lo, hi = np.searchsorted(chosen, [first, first + count])
            if hi > lo:
                files = content.files
                picks = chosen[lo:hi] - first
                digest = hashlib.sha256(json.dumps(files).encode() + picks.tobytes()).hexdigest()
                items.append((part, files, picks, count, digest))
            first += count
    if not items:
        return {}

    def done(name: str, digest: str) -> bool:
        marker = folder.marker(name + _DRAWN)
        return marker.exists() and read_json(marker)["drawn_sha256"] == digest

    mine = [item for item in stage.share(items, lambda item: item[0].size) if not done(item[0].name, item[4])]
    tasks = [
        Task(
            f"drawn documents of part {part.name} ({part.describe()})",
            (files, picks, count, digest, folder, part.name),
            sum(size for _, size in files),
        )
        for part, files, picks, count, digest in mine
    ]
    stage.run(_write_drawn, tasks, "corpus weights", "B")
    return {part.name: read_json(folder.marker(part.name + _DRAWN)) for part, *_ in items}


def _write_drawn(task: tuple[list[tuple[str, int]], np.ndarray, int, str, StageFolder, str]) -> None:
    """The drawn documents of one part (local indices `picks`, sorted), copied in order; its marker."""
    files, picks, count, digest, folder, name = task
    wanted = iter(picks.tolist())
    pick = next(wanted, -1)
    index = documents = sentences = size = 0
    with atomic_path(_part_file(folder, name + _DRAWN)) as tmp:
        with open(tmp, "wb", buffering=1 << 20) as out:
            for path, _ in files:
                for document in _documents_in(Path(path)):
                    if index == pick:
                        out.write(document)
                        documents += 1
                        sentences += document.count(b"\n") - 1  # (its lines, then the blank line)
                        size += len(document)
                        pick = next(wanted, -1)
                    index += 1
    if index != count:
        raise DataPrepError(f"{files[0][0]}: {index} documents in the part's files, {count} recorded (changed?)")
    marker = {"bytes": size, "documents": documents, "sentences": sentences, "drawn_sha256": digest}
    write_json(folder.marker(name + _DRAWN), marker)


def _documents_in(path: Path) -> Iterator[bytes]:
    """The documents of a part file, each with the blank line after it (every document ends with "\n\n", and
    "\n\n" occurs nowhere else); one document and one block in memory."""
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(_COPY_BYTES):
            data = rest + block
            start, end = 0, data.find(b"\n\n", max(len(rest) - 1, 0))
            while end >= 0:
                yield data[start : end + 2]
                start = end + 2
                end = data.find(b"\n\n", start)
            rest = data[start:]
    if rest:
        raise DataPrepError(f"{path}: part file does not end with a blank line (changed during the run?)")


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
    write_json(Path(marker), {"bytes": written})


def _log_summary(stats: CorpusStats, output_dir: Path, dedup: DedupSettings) -> None:
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
    if len(stats.sources) > 1 or any(source.weight != 1 for source in stats.sources) or dedup.active:
        for source in stats.sources:
            log.info(
                "corpus: source %s (weight %g, %d file(s)): %d documents, %d sentences read (%.1f MB) -> "
                "%d documents, %d sentences written (%.1f MB)",
                source.name,
                source.weight,
                source.files,
                source.read.documents,
                source.read.sentences,
                source.read.bytes / 1e6,
                source.documents_written,
                source.sentences_written,
                source.bytes_written / 1e6,
            )
            if dedup.active:
                _log_removed(f"source {source.name}", source.removed, dedup)
    if dedup.active:
        _log_removed("all sources", stats.removed, dedup)
    skipped = {
        "empty files": stats.empty_files,
        "empty documents": stats.empty_documents,
        "wiki pages skipped (redirect/disambiguation/non-article)": stats.skipped_pages,
        "bad JSON lines": stats.bad_json_lines,
        "null Parquet texts": stats.null_texts,
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


def _log_removed(what: str, removed: RemovedCounts, dedup: DedupSettings) -> None:
    """One line of what dedup and decontamination removed (of a source, or of all)."""
    said = []
    if dedup.mode != "off":
        said.append(
            f"{removed.duplicate_documents} duplicate documents ({removed.duplicate_bytes / 1e6:.1f} MB) removed"
        )
    if dedup.lines:
        said.append(
            f"{removed.boilerplate_lines} boilerplate lines ({removed.boilerplate_bytes / 1e6:.1f} MB, "
            f"{removed.emptied_documents} documents left with fewer than 2 lines) removed"
        )
    if dedup.exclude_overlap:
        said.append(
            f"{removed.overlap_documents} documents ({removed.overlap_bytes / 1e6:.1f} MB) dropped for a "
            f"{dedup.overlap_ngram}-gram shared with the evaluation texts"
        )
    log.info("corpus: %s: %s", what, "; ".join(said))
