"""The `shard` step: standard-format documents -> shuffled HDF5 shards + manifest.json.

Two phases, each spread over worker processes and MPI ranks:

1. map, one task per piece of an input file (files are cut at document boundaries into pieces of
   about `piece_bytes`, so that one big file still keeps every worker busy): hash the piece's bytes
   (data_prep.stage.Source, kept in its spill file's counts), read documents in
   batches (a batch ends after `docs_per_batch` documents or `sentences_per_batch` sentences, so
   batches depend on the file alone), tokenize, make `dupe_factor` passes of examples, send each
   example to a random shard, and write the piece's records grouped by shard into one spill file
   `.work/spill/fNNNNN-pNNNNN.bin` with a footer indexing the runs and holding the piece's counts
   (data_prep/spill.py). The file is renamed into place when whole: it is the piece's done-marker.
2. reduce, one task per shard: rank 0 reads the pieces' indexes once and hands each rank the runs of
   its shards; a shard reads its runs in (file, piece) order, shuffles, and writes `shard-NNNNN.h5`
   (temporary name, then rename: its presence means the shard is done).

Files created: one per piece, one per shard, and a few more (settings, manifest, vocabulary copy); the
folders `.work` and `.work/spill` are made once by rank 0. Every random draw comes from a generator
seeded by (seed, file, piece, batch) or (seed, shard), and the pieces depend on the files alone, so the
shards are byte-identical whatever the number of workers or ranks. Memory is bounded by one batch plus
SPILL_BUFFER_BYTES in phase 1 and by one shard (about `shard_bytes` with the auto shard count, see
auto_num_shards) in phase 2, not by the corpus.

Both phases run as a resumable stage (data_prep/stage.py): a task that fails, or whose process dies
(SIGKILL, the OOM killer), stops the run on every rank with a line naming the piece or shard. An
interrupted run continues with `resume=True`: finished pieces and shards are kept, the rest is redone;
the settings, inputs (paths and sizes), vocabulary and the versions of the packages that decide the bytes
must be those of the first time. The pieces of an input whose times moved since are hashed again, and those
whose bytes differ are made again, with every shard (data_prep.stage.Stage.keep_current). On a finished
output (manifest.json, no `.work`) `resume=True` only checks that it is that run's, whole, and returns.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path
from common.inventory import file_sha256

from . import readers
from .errors import DataPrepError
from .examples import ExampleSettings, ExampleStats, make_examples, record_dtype, unmasked_record_dtype
from .mpi import get_world
from .shards import MANIFEST, MANIFEST_VERSION, MASKINGS, Manifest, shard_name, shard_schema, write_shard
from .spill import SpillWriter, read_index, read_runs
from .stage import WORK, Finished, Source, Span, Stage, StageFolder, input_identity, recorded_inputs
from .tasks import Task
from .vocab import Vocab

log = logging.getLogger(__name__)

# The layout of `.work` (2: spill files; 3: their counts record the input bytes read, as a source); --resume refuses
# an interrupted run of another layout.
WORK_FORMAT = 3
SPILL_BUFFER_BYTES = 32 << 20  # a map task's records are written as runs per shard past this size
# Auto shard count: tokens per input byte, an upper bound for natural-language text (English Wikipedia with a 4,000-
# piece vocabulary: 0.236; larger vocabularies give fewer tokens), so that shards come out at most about shard_bytes.
TOKENS_PER_TEXT_BYTE = 0.25
VERSIONED = ("albert-pretrain", "h5py", "numpy", "sentencepiece")  # the packages that decide the bytes of the shards


def estimated_record_bytes(input_bytes: int, settings: ShardSettings) -> int:
    """Bytes of example records (what a reduce holds in memory) that `input_bytes` of text make: each token takes
    one of max_seq_length slots of a record (examples are filled close to max_seq_length), dupe_factor times."""
    per_token = settings.record_dtype().itemsize / settings.examples.max_seq_length
    return int(input_bytes * settings.dupe_factor * TOKENS_PER_TEXT_BYTE * per_token)


def auto_num_shards(input_bytes: int, settings: ShardSettings) -> int:
    """Shards are shuffled in memory: size them (shard_bytes of records each) so that memory stays flat in the corpus
    size. Never more shards than the examples the text can make (an upper estimate): a shard of none is a file for
    nothing."""
    examples = settings.examples
    record = settings.record_dtype().itemsize
    if settings.shard_bytes < record:
        raise DataPrepError(
            f"--shard-mb: shards of {settings.shard_bytes} bytes are smaller than one example record ({record} bytes "
            f"at --max-seq-length {examples.max_seq_length}); shards of a few MB or more keep the file count sensible"
        )
    total = estimated_record_bytes(input_bytes, settings)
    return max(1, min(-(-total // settings.shard_bytes), total // record))


def package_versions() -> dict[str, str]:
    """The versions of the packages that decide the bytes of the shards (recorded; --resume refuses to mix them)."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class ShardSettings:
    examples: ExampleSettings = field(default_factory=ExampleSettings)
    dupe_factor: int = 5
    seed: int = 12345
    num_shards: int = 0  # 0: auto, from the input size and shard_bytes (see auto_num_shards)
    shard_bytes: int = 256 << 20  # auto shard count: records per shard (a reduce holds one shard in memory)
    input_format: str = "docs"
    docs_per_batch: int = 1024
    piece_bytes: int = 8 << 20  # map tasks: ~1 s of work each on one core, so workers finish together
    sentences_per_batch: int = 8192  # ~2k examples per pass at seq 128: amortises the vectorised masking, bounds memory
    # static: masked here, dupe_factor masks of each pair; dynamic: each pair unmasked, masked by the loader each epoch
    masking: str = "static"

    def check(self) -> None:
        self.examples.check()
        if self.masking not in MASKINGS:
            raise DataPrepError(f"--masking {self.masking}: must be one of {', '.join(MASKINGS)}")
        if self.dupe_factor < 1:
            raise DataPrepError(f"--dupe-factor {self.dupe_factor}: must be at least 1")
        if self.num_shards < 0:
            raise DataPrepError(f"--num-shards {self.num_shards}: must be at least 1 (or 0 for auto)")
        if self.piece_bytes < 1:
            raise DataPrepError(f"--piece-mb {self.piece_bytes / (1 << 20):g}: must be positive")
        if self.shard_bytes < 1:
            raise DataPrepError(f"--shard-mb {self.shard_bytes / (1 << 20):g}: must be positive")

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self)
        if self.masking == "static":  # recorded as before dynamic masking existed: earlier folders still --resume
            del settings["masking"]
        return settings

    def record_dtype(self) -> np.dtype:
        """One example as the map tasks make it and the shards store it."""
        examples = self.examples
        if self.masking == "dynamic":
            return unmasked_record_dtype(examples.max_seq_length)
        return record_dtype(examples.max_seq_length, examples.max_predictions_per_seq)


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

    def describe(self) -> str:
        return f"piece {self.name} ({self.path} bytes {self.start}-{self.stop})"

    def span(self) -> Span:
        return Span.of(self.path, self.start, self.stop)


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


def _spill_file(output: Path, piece: Piece) -> Path:
    """The piece's records and counts; present only once whole (the piece is done)."""
    return output / WORK / "spill" / f"{piece.name}.bin"


def _map_piece(task: tuple[Piece, str, str, ShardSettings]) -> None:
    """Phase 1 for one piece of an input file: its spill file (records grouped by shard, the piece's counts)."""
    piece, spm_model, output, settings = task
    vocab = _vocab(spm_model)
    examples = settings.examples
    max_chars = 16 * examples.max_seq_length  # a longer sentence cannot fit one example anyway
    source = Source.read(piece.span())  # (before reading: bytes changed meanwhile make it differ at a --resume)
    read_stats = readers.ReadStats()
    stats = ExampleStats()
    documents = sentences = 0
    # (the temporary file exists already: opened without O_CREAT, one file created per piece)
    with atomic_path(_spill_file(Path(output), piece)) as tmp, open(tmp, "r+b") as f:
        spill = SpillWriter(f, settings.num_shards, SPILL_BUFFER_BYTES)
        batches = _batches(Path(piece.path), (piece.start, piece.stop), settings, read_stats)
        for batch_index, docs in enumerate(batches):
            rng = np.random.default_rng([settings.seed, 0, piece.file, piece.index, batch_index])
            flat = [s for d in docs for s in d]
            tokens, lengths = vocab.encode(flat, max_chars)
            doc_sentences = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
            documents += len(docs)
            sentences += len(flat)
            for _ in range(settings.dupe_factor):
                records = make_examples(
                    tokens, lengths, doc_sentences, vocab, examples, rng, stats, settings.masking == "dynamic"
                )
                spill.add(records, rng.integers(0, settings.num_shards, size=len(records)))
            _release_freed_memory()
        spill.close(
            {
                "file": piece.path,
                "documents": documents,
                "sentences": sentences,
                "read": asdict(read_stats),
                "examples": asdict(stats),
                "source": source.to_json(),
            }
        )


@dataclass(frozen=True)
class _ReduceTask:
    shard: int
    output: str
    settings: ShardSettings
    attrs: dict[str, Any]
    spills: list[str]  # every piece's spill file, in (file, piece) order
    runs: np.ndarray  # the shard's runs, in order: piece (index into spills), byte offset, records


def _describe_shard(path: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        n = int(f.attrs["num_examples"])
    return {"name": path.name, "num_examples": n, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _reduce_shard(task: _ReduceTask) -> dict[str, Any]:
    """Phase 2 for one shard: read its runs in (file, piece) order, shuffle, write the HDF5 file. A shard already
    written (an interrupted run) is only described."""
    final = Path(task.output) / shard_name(task.shard)
    if not final.exists():
        records = np.empty(int(task.runs[:, 2].sum()), dtype=task.settings.record_dtype())
        start = 0
        pieces, first = np.unique(task.runs[:, 0], return_index=True)
        bounds = list(first) + [len(task.runs)]
        for k, piece in enumerate(pieces):  # one open per piece; read straight into one array, no concatenation
            runs = task.runs[bounds[k] : bounds[k + 1]]
            n = int(runs[:, 2].sum())
            read_runs(Path(task.spills[piece]), runs[:, 1:], records[start : start + n])
            start += n
        order = np.random.default_rng([task.settings.seed, 1, task.shard]).permutation(len(records))
        attrs = {**task.attrs, "shard_index": task.shard, "num_shards": task.settings.num_shards}
        write_shard(final, records, attrs, order)
    return {"shard": task.shard, **_describe_shard(final)}


def _runs_by_shard(spills: list[Path], num_shards: int) -> tuple[list[np.ndarray], list[dict[str, Any]], list[Source]]:
    """Read every piece's index once: (for each shard its runs: piece, byte offset, records, in (file, piece) order;
    each piece's counts; what each piece read)."""
    tables, counts, sources = [], [], []
    for k, path in enumerate(spills):
        table, meta = read_index(path)
        tables.append(np.column_stack([np.full(len(table), k, dtype=np.int64), table]))
        sources.append(Source.from_json(meta.pop("source")))
        counts.append(meta)
    runs = np.concatenate(tables) if tables else np.zeros((0, 4), dtype=np.int64)
    runs = runs[np.argsort(runs[:, 1], kind="stable")]  # by shard; within a shard still by piece, then run
    bounds = np.searchsorted(runs[:, 1], np.arange(num_shards + 1))
    by_shard = [runs[bounds[s] : bounds[s + 1]][:, [0, 2, 3]] for s in range(num_shards)]
    return by_shard, counts, sources


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


def _finished_run(output: Path, settings: ShardSettings) -> Finished:
    """What a finished folder's manifest says it was made from (its settings, inputs and vocabulary; not the package
    versions: a finished run stands) and the files it lists."""
    manifest = Manifest.load(output)
    data = manifest.data
    if manifest.version == 1:
        data = _upgrade_manifest_v1(data, settings)
    inputs = data["inputs"]
    if manifest.version < 3 and inputs is not None:  # recorded the inputs' paths and sizes only
        inputs = [{"path": entry["path"], "bytes": entry["bytes"]} for entry in inputs]
    identity = {"settings": data["settings"], "inputs": inputs, "vocab_sha256": data["vocab"]["sha256"]}
    files = [(s["name"], s["bytes"]) for s in data["shards"]] + [(data["vocab"]["file"], None)]
    return Finished(identity, files)


def _upgrade_manifest_v1(data: dict[str, Any], settings: ShardSettings) -> dict[str, Any]:
    """A version-1 manifest in the layout of this version, for the check of a finished folder: made before
    --shard-mb, it may not record shard_bytes (its shard count is recorded, so shard_bytes could not change the bytes:
    the current one is taken); made before the inputs, shard sizes or vocabulary file were recorded, it lacks them
    (no inputs: refused as made from other inputs; no sizes: not compared)."""
    vocab = {"file": "spiece.model", "sha256": None, **data["vocab"]}
    shards = [{"bytes": None, **shard} for shard in data["shards"]]
    recorded = {"shard_bytes": settings.shard_bytes, **data["settings"]}
    return {**data, "settings": recorded, "inputs": data.get("inputs"), "vocab": vocab, "shards": shards}


def shard_corpus(
    inputs: list[Path],
    spm_model: Path,
    output: Path,
    settings: ShardSettings,
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
    mpi: str = "auto",
    progress_seconds: float | None = None,
) -> Manifest | None:
    """Make the shards. Returns the manifest on rank 0 (None on the other MPI ranks). `progress`: bars on a
    terminal (rank 0); otherwise every rank logs a line every `progress_seconds` (data_prep/progress.py)."""
    started = time.perf_counter()
    world = get_world(mpi)
    error = None
    try:  # the same checks on every rank; an error on any of them is raised on all (none waits for the others)
        settings.check()
        files = readers.expand_inputs(inputs)
        input_bytes = sum(f.stat().st_size for f in files)
        if settings.num_shards == 0:
            settings = dataclasses.replace(settings, num_shards=auto_num_shards(input_bytes, settings))
        spm_path = str(Path(spm_model).resolve())
        vocab = _vocab(spm_path)  # refuses a bad model before any work; the forked tasks inherit it
    except DataPrepError as e:
        error = str(e)
    world.raise_together(error)
    folder = StageFolder(Path(output), "shard", WORK_FORMAT, MANIFEST, ("spill",))
    stage = Stage(folder, world, workers, progress and world.rank == 0, progress_seconds)
    job = _Job(stage, files, Path(spm_model), spm_path, vocab, settings)
    with world.abort_on_error():
        return _shard(job, resume, started)


@dataclass
class _Job:
    """What every phase of one run needs."""

    stage: Stage
    files: list[Path]
    spm_model: Path  # as given (the manifest records it)
    spm_path: str  # resolved (the tasks load it)
    vocab: Vocab
    settings: ShardSettings

    @property
    def output(self) -> Path:
        return self.stage.folder.output

    def identity(self) -> dict[str, Any]:
        """What the shards' bytes depend on (data_prep/stage.py: --resume continues only the same)."""
        return {
            "settings": self.settings.to_dict(),
            "inputs": input_identity(self.files),
            "vocab_sha256": self.vocab.sha256,
            "versions": package_versions(),
        }

    def attributes(self) -> dict[str, Any]:
        """The HDF5 files' attributes (each shard adds its index and the count)."""
        examples = self.settings.examples
        attributes = {
            "max_seq_length": examples.max_seq_length,
            "max_predictions_per_seq": examples.max_predictions_per_seq,
            "vocab_size": self.vocab.vocab_size,
            "vocab_sha256": self.vocab.sha256,
            "seed": self.settings.seed,
            "sentence_task": "sop",
            "sop_label_swapped": 1,
            "masked_lm_prob": examples.masked_lm_prob,
            "ngram": examples.ngram,
            "dupe_factor": self.settings.dupe_factor,
        }
        if self.settings.masking == "dynamic":  # (static shards keep the bytes they had before dynamic masking)
            # masked_lm_prob, ngram and max_predictions_per_seq above are the loader's defaults
            attributes["masking"] = "dynamic"
        return attributes


def _shard(job: _Job, resume: bool, started: float) -> Manifest | None:
    stage, settings = job.stage, job.settings
    world = stage.world
    if world.rank == 0:
        estimate = estimated_record_bytes(sum(f.stat().st_size for f in job.files), settings) / settings.num_shards
        log.info(
            "%d shards of about %.0f MB of records each (--shard-mb %g)",
            settings.num_shards,
            estimate / (1 << 20),
            settings.shard_bytes / (1 << 20),
        )
    identity = job.identity()
    if stage.open(identity, resume, lambda: _finished_run(job.output, settings)):
        if world.rank == 0:
            log.info(
                "%s: shards already complete (%s, no unfinished work; same settings and inputs): nothing to do",
                job.output,
                MANIFEST,
            )
        return Manifest.load(job.output) if world.rank == 0 else None
    pieces = _pieces(job.files, settings.piece_bytes)
    if world.rank == 0:
        log.info("%d input files in %d pieces", len(job.files), len(pieces))
    stage.keep_current(
        lambda: {p.name: p.span() for p in pieces},
        lambda: _finished_pieces(job.output),
        lambda names: _redo(job.output, names),
        "piece",
    )
    _map_phase(job, pieces)
    reduced = _reduce_phase(job, pieces)
    if reduced is None:  # not rank 0
        stage.close()
        return None
    per_piece, per_shard, sources = reduced
    totals = _sum_counts(per_piece)
    manifest = _write_manifest(job, recorded_inputs(identity["inputs"], sources), identity, per_shard, totals)
    stage.close()
    log_summary(totals, manifest.data["num_examples"], time.perf_counter() - started, settings.masking)
    return manifest


def _finished_pieces(output: Path) -> dict[str, Source]:
    """The pieces done before the run was interrupted (their spill files), with what each read."""
    return {
        spill.stem: Source.from_json(read_index(spill)[1]["source"])
        for spill in (output / WORK / "spill").glob("f*-p*.bin")
    }


def _redo(output: Path, names: list[str]) -> None:
    """Pieces to make again: first the shards (each holds examples of every piece), then the pieces' spill files."""
    for shard in output.glob("shard-*.h5"):
        shard.unlink()
    for name in names:
        (output / WORK / "spill" / f"{name}.bin").unlink(missing_ok=True)


def _map_phase(job: _Job, pieces: list[Piece]) -> None:
    """This rank's pieces not done yet: the biggest first, dealt round-robin to the ranks."""
    output = job.output
    mine = [p for p in job.stage.share(pieces, lambda p: p.stop - p.start) if not _spill_file(output, p).exists()]
    tasks = [Task(p.describe(), (p, job.spm_path, str(output), job.settings), p.stop - p.start) for p in mine]
    job.stage.run(_map_piece, tasks, "examples", "B")


def _reduce_phase(
    job: _Job, pieces: list[Piece]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Source]] | None:
    """Rank 0 reads the pieces' indexes once and hands each rank the runs of its shards; every rank makes its shards.
    Returns, on rank 0, (each piece's counts, each shard's description in shard order, what each piece read); None
    elsewhere."""
    world, num_shards = job.stage.world, job.settings.num_shards
    spills = [_spill_file(job.output, p) for p in pieces]
    shares: list[dict[int, np.ndarray]] | None = None
    per_piece: list[dict[str, Any]] = []
    sources: list[Source] = []
    if world.rank == 0:
        by_shard, per_piece, sources = _runs_by_shard(spills, num_shards)
        shares = [{s: by_shard[s] for s in range(r, num_shards, world.size)} for r in range(world.size)]
        del by_shard
    share = world.scatter(shares)
    del shares
    attrs, spill_names, output = job.attributes(), [str(p) for p in spills], str(job.output)
    tasks = [
        Task(
            f"shard {s} ({shard_name(s)}, {int(runs[:, 2].sum())} examples)",
            _ReduceTask(s, output, job.settings, attrs, spill_names, runs),
        )
        for s, runs in share.items()
    ]
    results = world.gather(job.stage.run(_reduce_shard, tasks, "shards", "shard"))
    if results is None:  # not rank 0
        return None
    # every rank's shards (a resumed run's finished shards are described again)
    described = {r.pop("shard"): r for rank in results for r in rank}
    return per_piece, [described[s] for s in range(num_shards)], sources


def _write_manifest(
    job: _Job,
    inputs: list[dict[str, Any]],
    identity: dict[str, Any],
    per_shard: list[dict[str, Any]],
    totals: dict[str, Any],
) -> Manifest:
    with atomic_path(job.output / "spiece.model") as tmp:
        shutil.copyfile(job.spm_model, tmp)
    manifest = Manifest(
        {
            **dict(zip(("format", "schema_version"), shard_schema(job.settings.masking))),
            "manifest_version": MANIFEST_VERSION,
            "num_examples": sum(s["num_examples"] for s in per_shard),
            "shards": per_shard,
            "settings": job.settings.to_dict(),
            "attributes": job.attributes(),
            "vocab": {
                "file": "spiece.model",
                "sha256": job.vocab.sha256,
                "vocab_size": job.vocab.vocab_size,
                "source": str(job.spm_model),
            },
            "inputs": inputs,
            "versions": identity["versions"],
            "stats": totals,
        }
    )
    manifest.save(job.output)
    return manifest


def log_summary(totals: dict[str, Any], num_examples: int, seconds: float, masking: str = "static") -> None:
    examples = totals.get("examples", {})
    maskable = max(examples.get("maskable_tokens", 0), 1)
    masked = (
        "unmasked (masked by the loader)"
        if masking == "dynamic"
        else f"masked {100.0 * examples.get('predictions', 0) / maskable:.2f}% of maskable tokens"
    )
    log.info(
        "%d documents, %d sentences -> %d examples, %d tokens in %.1f s (%.0f examples/s); "
        "%s; SOP swapped %.1f%%; skipped %d one-sentence documents, "
        "dropped %d examples without a prediction",
        totals.get("documents", 0),
        totals.get("sentences", 0),
        num_examples,
        examples.get("tokens", 0),
        seconds,
        num_examples / max(seconds, 1e-9),
        masked,
        100.0 * examples.get("swapped", 0) / max(num_examples, 1),
        examples.get("one_sentence_documents", 0),
        examples.get("dropped_without_predictions", 0),
    )
