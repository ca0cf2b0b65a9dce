"""The `shard` step: standard-format documents -> shuffled HDF5 shards + manifest.json.

Two phases, each spread over worker processes and MPI ranks:

1. map, one task per piece of an input file (files are cut at document boundaries into pieces of
   about `piece_bytes`, so that one big file still keeps every worker busy): read documents in
   batches (a batch ends after `docs_per_batch` documents or `sentences_per_batch` sentences, so
   batches depend on the file alone), tokenize, make `dupe_factor` passes of examples, send each
   example to a random shard, and append the records to `.work/buckets/sNNNNN/fNNNNN-pNNNNN.bin`.
   A piece's marker `.work/done/fNNNNN-pNNNNN.json` (its counts) is written once all its records
   are on disk.
2. reduce, one task per shard: concatenate the shard's buckets in (file, piece) order, shuffle, and
   write `shard-NNNNN.h5` (temporary name, then rename).

Every random draw comes from a generator seeded by (seed, file, piece, batch) or (seed, shard), and
the pieces depend on the files alone, so the shards are byte-identical whatever the number of workers
or ranks. Memory is bounded by one batch plus the bucket buffers in phase 1 and by one shard in
phase 2, not by the corpus.

An interrupted run continues with `resume=True`: pieces with a marker and shards already renamed
are kept, the rest is redone. The settings must be the same as the first time. On a finished output
(manifest.json, no `.work`) `resume=True` only checks that it is that run's, whole, and returns.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import multiprocessing
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import readers
from .atomic import atomic_path, write_text
from .errors import DataPrepError
from .examples import ExampleSettings, ExampleStats, make_examples, record_dtype
from .mpi import World, get_world
from .shards import FORMAT, MANIFEST, SCHEMA_VERSION, Manifest, shard_name, write_shard
from .vocab import Vocab, sha256_file

log = logging.getLogger(__name__)

WORK = ".work"
FLUSH_BYTES = 2 << 20  # bucket buffers of a map task are flushed to disk past this size
SHARD_TEXT_BYTES = 16 << 20  # auto: input bytes x dupe_factor per shard (~14 MB of records at any seq length)


def auto_num_shards(input_bytes: int, dupe_factor: int) -> int:
    """Shards are shuffled in memory: size them so that memory stays flat in the corpus size."""
    return max(1, -(-input_bytes * dupe_factor // SHARD_TEXT_BYTES))


@dataclass(frozen=True)
class ShardSettings:
    examples: ExampleSettings = field(default_factory=ExampleSettings)
    dupe_factor: int = 5
    seed: int = 12345
    num_shards: int = 0  # 0: auto, from the input size (see auto_num_shards)
    input_format: str = "docs"
    docs_per_batch: int = 1024
    piece_bytes: int = 8 << 20  # map tasks: ~1 s of work each on one core, so workers finish together
    sentences_per_batch: int = 8192  # ~2k examples per pass at seq 128: amortises the vectorised masking, bounds memory

    def check(self) -> None:
        self.examples.check()
        if self.dupe_factor < 1:
            raise DataPrepError(f"--dupe-factor {self.dupe_factor}: must be at least 1")
        if self.num_shards < 0:
            raise DataPrepError(f"--num-shards {self.num_shards}: must be at least 1 (or 0 for auto)")
        if self.piece_bytes < 1:
            raise DataPrepError(f"--piece-mb {self.piece_bytes / (1 << 20):g}: must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Paths:
    output: Path

    @property
    def work(self) -> Path:
        return self.output / WORK

    def bucket(self, shard: int, task: Piece) -> Path:
        return self.shard_folder(shard) / f"{task.name}.bin"

    def shard_folder(self, shard: int) -> Path:
        return self.work / "buckets" / f"s{shard:05d}"

    def piece_done(self, task: Piece) -> Path:
        return self.work / "done" / f"{task.name}.json"

    def shard_done(self, shard: int) -> Path:
        return self.work / "done" / f"s{shard:05d}.json"


@functools.cache
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the system after each batch: without it glibc keeps them, and a long
    input file's many batches fragment the heap until the peak grows with the file's size."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=2)
def _vocab(path: str) -> Vocab:
    return Vocab(Path(path))


@dataclass(frozen=True)
class Piece:
    """Bytes [start, stop) of input file number `file`: one map task."""

    file: int
    index: int
    path: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"f{self.file:05d}-p{self.index:05d}"


def _pieces(files: list[Path], piece_bytes: int) -> list[Piece]:
    return [
        Piece(f, k, str(path), a, b)
        for f, path in enumerate(files)
        for k, (a, b) in enumerate(readers.docs_pieces(path, piece_bytes))
    ]


def _batches(
    path: Path, piece: tuple[int, int], settings: ShardSettings, read_stats: readers.ReadStats
) -> Iterator[list[list[str]]]:
    batch: list[list[str]] = []
    n_sent = 0
    for doc in readers.iter_documents(path, settings.input_format, read_stats, piece):
        batch.append(doc)
        n_sent += len(doc)
        if len(batch) >= settings.docs_per_batch or n_sent >= settings.sentences_per_batch:
            yield batch
            batch, n_sent = [], 0
    if batch:
        yield batch


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, sort_keys=True))


def _map_piece(task: tuple[Piece, str, str, ShardSettings]) -> dict[str, Any]:
    """Phase 1 for one piece of an input file. Returns (and stores in its marker) the piece's counts."""
    piece, spm_model, output, settings = task
    paths = _Paths(Path(output))
    vocab = _vocab(spm_model)
    ex = settings.examples
    max_chars = 16 * ex.max_seq_length  # a longer sentence cannot fit one example anyway
    buffers: list[list[np.ndarray]] = [[] for _ in range(settings.num_shards)]
    buffered = 0
    written: set[int] = set()

    def flush() -> None:
        for shard, parts in enumerate(buffers):
            if parts:
                # The first write truncates what an interrupted attempt left: the piece sends its examples to
                # the same shards every time, so no leftover escapes (and no unlink pass over every shard).
                with open(paths.bucket(shard, piece), "ab" if shard in written else "wb") as f:
                    for part in parts:
                        f.write(part.tobytes())
                written.add(shard)
                parts.clear()

    read_stats = readers.ReadStats()
    stats = ExampleStats()
    documents = sentences = 0
    for batch_index, docs in enumerate(_batches(Path(piece.path), (piece.start, piece.stop), settings, read_stats)):
        rng = np.random.default_rng([settings.seed, 0, piece.file, piece.index, batch_index])
        flat = [s for d in docs for s in d]
        tokens, lengths = vocab.encode(flat, max_chars)
        doc_sentences = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        documents += len(docs)
        sentences += len(flat)
        for _ in range(settings.dupe_factor):
            records = make_examples(tokens, lengths, doc_sentences, vocab, ex, rng, stats)
            dest = rng.integers(0, settings.num_shards, size=len(records))
            order = np.argsort(dest, kind="stable")
            bounds = np.searchsorted(dest[order], np.arange(settings.num_shards + 1))
            for shard in range(settings.num_shards):
                part = records[order[bounds[shard] : bounds[shard + 1]]]
                if len(part):
                    buffers[shard].append(part)
                    buffered += part.nbytes
        if buffered > FLUSH_BYTES:
            flush()
            buffered = 0
        _release_freed_memory()
    flush()
    result = {
        "file": piece.path,
        "documents": documents,
        "sentences": sentences,
        "read": asdict(read_stats),
        "examples": asdict(stats),
    }
    _write_json(paths.piece_done(piece), result)
    return result


def _reduce_shard(task: tuple[int, str, ShardSettings, dict[str, Any]]) -> dict[str, Any]:
    """Phase 2 for one shard: gather its buckets in (file, piece) order, shuffle, write the HDF5 file."""
    shard, output, settings, attrs = task
    paths = _Paths(Path(output))
    ex = settings.examples
    dtype = record_dtype(ex.max_seq_length, ex.max_predictions_per_seq)
    # one listing of the shard's folder, not a lookup per piece; Piece.name is zero-padded: sorted is (file, piece) order
    buckets = [(b, b.stat().st_size // dtype.itemsize) for b in sorted(paths.shard_folder(shard).glob("*.bin"))]
    records = np.empty(sum(n for _, n in buckets), dtype=dtype)
    start = 0
    for b, n in buckets:  # read straight into one array: no second copy for concatenation
        with open(b, "rb") as f:
            f.readinto(records[start : start + n].view(np.uint8))
        start += n
    order = np.random.default_rng([settings.seed, 1, shard]).permutation(len(records))
    final = paths.output / shard_name(shard)
    write_shard(final, records, {**attrs, "shard_index": shard, "num_shards": settings.num_shards}, order)
    result = {
        "name": final.name,
        "num_examples": int(len(records)),
        "sha256": sha256_file(final),
        "bytes": final.stat().st_size,
    }
    _write_json(paths.shard_done(shard), result)
    shutil.rmtree(paths.shard_folder(shard), ignore_errors=True)
    return result


def _run_tasks(fn, tasks: list, workers: int, desc: str, progress: bool) -> list:
    """Each task runs in a fresh forked process (also with one worker): the memory a task used goes back
    to the system when it ends, so the peak does not creep up with the number of tasks (the corpus size)."""
    from tqdm import tqdm

    results = []
    if not tasks:
        return results
    # The parent's objects go to the permanent generation: the tasks' garbage collections then do not
    # touch (and so copy) the pages they inherited.
    gc.collect()
    gc.freeze()
    try:
        with tqdm(total=len(tasks), desc=desc, unit="task", disable=not progress, dynamic_ncols=True) as bar:
            with multiprocessing.get_context("fork").Pool(min(workers, len(tasks)), maxtasksperchild=1) as pool:
                for r in pool.imap_unordered(fn, tasks):
                    results.append(r)
                    bar.update()
    finally:
        gc.unfreeze()
    return results


def _run_phase(world: World, fn, tasks: list, workers: int, desc: str, progress: bool) -> None:
    """This rank's tasks, then a barrier; a failure ends every rank (no one waits at the barrier forever)."""
    try:
        _run_tasks(fn, tasks, workers, desc, progress)
    except BaseException:
        world.abort()
        raise
    world.barrier()


def _sum_counts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum nested counters (ints and int lists) field by field."""
    total: dict[str, Any] = {}
    for item in items:
        for key, value in item.items():
            if isinstance(value, dict):
                total[key] = _sum_counts([total.get(key, {}), value])
            elif isinstance(value, list):
                mine = total.setdefault(key, [])
                mine.extend([0] * (len(value) - len(mine)))
                for i, v in enumerate(value):
                    mine[i] += v
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def _prepare_output(paths: _Paths, settings_doc: dict[str, Any], resume: bool) -> tuple[str | None, bool]:
    """Rank 0 checks and claims the output folder. Returns (an error message or None, whether it is already complete)."""
    out = paths.output
    if out.exists() and not out.is_dir():
        return f"{out}: exists and is not a folder", False
    saved = paths.work / "settings.json"
    if out.exists() and any(out.iterdir()):
        if not resume:
            return (
                f"{out}: folder is not empty; pass --resume to continue an interrupted run, or choose an empty folder",
                False,
            )
        if (out / MANIFEST).exists() and not paths.work.exists():
            return _check_complete(out, settings_doc), True
        if not saved.exists():
            return (
                f"{out}: not an interrupted `albert-data shard` output (no {WORK}/settings.json); cannot resume",
                False,
            )
        if json.loads(saved.read_text()) != settings_doc:
            return f"{out}: --resume with settings or inputs different from the interrupted run ({saved})", False
        return None, False
    (paths.work / "done").mkdir(parents=True, exist_ok=True)
    _write_json(saved, settings_doc)
    return None, False


def _check_complete(out: Path, settings_doc: dict[str, Any]) -> str | None:
    """A finished output folder met again by --resume: the same settings, inputs and vocabulary, and every file its
    manifest lists there with its size (`albert-data verify` checks the contents). Returns an error message or None."""
    try:
        data = Manifest.load(out).data
    except DataPrepError as e:
        return str(e)
    made = {"settings": data["settings"], "inputs": data.get("inputs"), "vocab_sha256": data["vocab"].get("sha256")}
    if made != settings_doc:
        if made["inputs"] != settings_doc["inputs"]:
            was = {(i["path"], i["bytes"]) for i in made["inputs"] or []}
            now = {(i["path"], i["bytes"]) for i in settings_doc["inputs"]}
            what = (
                "inputs ("
                + "; ".join(
                    [f"{p}: {b} bytes then" for p, b in sorted(was - now)]
                    + [f"{p}: {b} bytes now" for p, b in sorted(now - was)]
                )[:500]
                + ")"
            )
        else:
            what = "settings" if made["settings"] != settings_doc["settings"] else "vocabulary"
        return f"{out}: already complete, but made with other {what} ({MANIFEST}); choose another --output"
    files = [(s["name"], s.get("bytes")) for s in data["shards"]] + [(data["vocab"].get("file", "spiece.model"), None)]
    missing = [
        name for name, size in files if not (out / name).is_file() or size not in (None, (out / name).stat().st_size)
    ]
    if missing:
        return f"{out}: {MANIFEST} lists files that are missing or of another size: {', '.join(missing)}; remove the folder and run again"
    return None


def shard_corpus(
    inputs: list[Path],
    spm_model: Path,
    output: Path,
    settings: ShardSettings,
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
    mpi: str = "auto",
) -> Manifest | None:
    """Make the shards. Returns the manifest on rank 0 (None on the other MPI ranks)."""
    started = time.perf_counter()
    settings.check()
    files = readers.expand_inputs(inputs)
    if settings.num_shards == 0:
        settings = dataclasses.replace(
            settings, num_shards=auto_num_shards(sum(f.stat().st_size for f in files), settings.dupe_factor)
        )
        log.info("--num-shards auto: %d", settings.num_shards)
    spm_path = str(Path(spm_model).resolve())
    vocab = _vocab(spm_path)  # refuses a bad model before any work; the forked tasks inherit it
    world = get_world(mpi)
    paths = _Paths(Path(output))
    settings_doc = {
        "settings": settings.to_dict(),
        # resolved, with sizes: the same files however they are named, and a corpus rewritten in place is not the same
        "inputs": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
        "vocab_sha256": vocab.sha256,
    }
    error, complete = _prepare_output(paths, settings_doc, resume) if world.rank == 0 else (None, False)
    error, complete = world.bcast((error, complete))
    if error:
        raise DataPrepError(error)
    if complete:
        if world.rank == 0:
            log.info(
                "%s: shards already complete (%s, no unfinished work; same settings and inputs): nothing to do",
                paths.output,
                MANIFEST,
            )
        return Manifest.load(paths.output) if world.rank == 0 else None
    world.barrier()
    progress = progress and world.rank == 0

    # phase 1: biggest pieces first, dealt round-robin to the ranks
    pieces = _pieces(files, settings.piece_bytes)
    by_size = sorted(pieces, key=lambda p: (p.start - p.stop, p.file, p.index))
    mine = [p for k, p in enumerate(by_size) if k % world.size == world.rank and not paths.piece_done(p).exists()]
    if world.rank == 0:
        log.info("%d input files in %d pieces", len(files), len(pieces))
    for s in range(settings.num_shards):
        paths.shard_folder(s).mkdir(parents=True, exist_ok=True)
    world.barrier()
    tasks = [(p, spm_path, str(paths.output), settings) for p in mine]
    _run_phase(world, _map_piece, tasks, workers, "examples", progress)

    # phase 2
    ex = settings.examples
    attrs = {
        "max_seq_length": ex.max_seq_length,
        "max_predictions_per_seq": ex.max_predictions_per_seq,
        "vocab_size": vocab.vocab_size,
        "vocab_sha256": vocab.sha256,
        "seed": settings.seed,
        "sentence_task": "sop",
        "sop_label_swapped": 1,
        "masked_lm_prob": ex.masked_lm_prob,
        "ngram": ex.ngram,
        "dupe_factor": settings.dupe_factor,
    }
    todo = [s for s in range(settings.num_shards) if s % world.size == world.rank and not paths.shard_done(s).exists()]
    tasks = [(s, str(paths.output), settings, attrs) for s in todo]
    _run_phase(world, _reduce_shard, tasks, workers, "shards", progress)
    if world.rank != 0:
        return None

    # manifest, from the markers on disk (so resumed and multi-rank runs are counted whole)
    per_piece = [json.loads(paths.piece_done(p).read_text()) for p in pieces]
    per_shard = [json.loads(paths.shard_done(s).read_text()) for s in range(settings.num_shards)]
    totals = _sum_counts(per_piece)
    with atomic_path(paths.output / "spiece.model") as tmp:
        shutil.copyfile(spm_model, tmp)
    manifest = Manifest(
        {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "num_examples": sum(s["num_examples"] for s in per_shard),
            "shards": per_shard,
            "settings": settings.to_dict(),
            "attributes": attrs,
            "vocab": {
                "file": "spiece.model",
                "sha256": vocab.sha256,
                "vocab_size": vocab.vocab_size,
                "source": str(spm_model),
            },
            "inputs": settings_doc["inputs"],
            "stats": totals,
        }
    )
    manifest.save(paths.output)
    shutil.rmtree(paths.work, ignore_errors=True)
    seconds = time.perf_counter() - started
    log_summary(totals, manifest.data["num_examples"], seconds)
    return manifest


def log_summary(totals: dict[str, Any], num_examples: int, seconds: float) -> None:
    ex = totals.get("examples", {})
    maskable = max(ex.get("maskable_tokens", 0), 1)
    log.info(
        "%d documents, %d sentences -> %d examples, %d tokens in %.1f s (%.0f examples/s); "
        "masked %.2f%% of maskable tokens; SOP swapped %.1f%%; skipped %d one-sentence documents, "
        "dropped %d examples without a prediction",
        totals.get("documents", 0),
        totals.get("sentences", 0),
        num_examples,
        ex.get("tokens", 0),
        seconds,
        num_examples / max(seconds, 1e-9),
        100.0 * ex.get("predictions", 0) / maskable,
        100.0 * ex.get("swapped", 0) / max(num_examples, 1),
        ex.get("one_sentence_documents", 0),
        ex.get("dropped_without_predictions", 0),
    )
