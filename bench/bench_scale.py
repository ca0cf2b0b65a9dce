"""Scaled-down cluster jobs of `albert-data shard` and `albert-data corpus`, 1 and 2 workers and 2 MPI ranks;
per run: wall time, throughput per worker, peak memory per task, files created, metadata calls.

Shard phase. The text is real: the Wikipedia excerpt and the Lee news corpus that data_prep/sample_corpora.py fetches,
made into standard-format documents by `albert-data corpus`, then repeated (each copy in another seeded document
order) up to --mb. One vocabulary is trained on the base text. Then `albert-data shard` runs as a subprocess:

- 1 worker, 2 workers, and (--mpi) `mpirun -np 2` with 1 worker per rank: small pieces (--piece-mb) and many shards
  (--shard-mb); the shards must be byte-identical across the three;
- 2 workers with albert-data's defaults (8 MB pieces, dupe factor 5, 256 MB shards): the unit costs that
  docs/scale.md projects to a cluster, and the memory of a reduce at the default shard size.

Corpus phase. The Wikipedia excerpt's pages repeated to --xml-mb of XML (each copy in another seeded page order),
laid out as English Wikipedia is published: --wiki-files part files (enwiki-partNN.xml.bz2, each a whole dump with
its header), read whole, one task each; the same part files with --part-mb below their size (as enwiki's part
files are at the default 16 MB): read by the main process, their pages cleaned by the workers in batches; and one
multistream dump with its index, cut at stream offsets into about as many parts. `albert-data corpus` runs on each
with 1 worker, 2 workers and (--mpi) `mpirun -np 2`; the corpus files must be byte-identical across all of them.

Every run is traced with `strace -f` (bench/syscalls.py: files created, open/mkdir/unlink/rename/stat calls under
the input and output folders; for shard split into phases by the time the first reduce task started). Each task's
process records its wall time and memory (VmHWM, the peak resident set, and VmRSS when it started: the difference
is what the task itself added) through this script's `record-tasks` mode, which wraps the task functions from
outside.
1 and 2 workers take turns --repeats times; the fastest of each is kept.

    python bench/bench_scale.py                      # both phases: 256 MB of text for shard, 48 MB of XML for corpus
    python bench/bench_scale.py --mb 64 --no-mpi     # a quicker look
    python bench/bench_scale.py --phases corpus --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import syscalls  # noqa: E402

DEFAULTS = "2 workers, defaults (8 MB pieces, dupe 5, 256 MB shards)"
RECORD_TASKS = "record-tasks"  # the mode's first argument: `bench_scale.py record-tasks shard|corpus ARGS`
TASK_LOG = "BENCH_SCALE_TASK_LOG"  # record-tasks mode: where each task appends its line (JSON)


# ------------------------------------------------------------------------------------- record-tasks mode


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def record_shard_tasks(argv: list[str]) -> int:
    """`albert-data ARGS` with each map and reduce task timed and its memory recorded (to $BENCH_SCALE_TASK_LOG)."""
    from data_prep import cli, sharding

    log_path = os.environ[TASK_LOG]

    def recorded(phase: str, fn, size):
        def task(args):
            start, rss, cpu = time.time(), _status()["VmRSS"], time.process_time()
            result = fn(args)
            record = {
                "phase": phase,
                "start": start,
                "end": time.time(),
                "cpu": time.process_time() - cpu,
                "start_rss": rss,
                **_status(),
                **size(args),
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            return result

        return task

    sharding._map_piece = recorded("map", sharding._map_piece, lambda a: {"bytes": a[0].stop - a[0].start})
    sharding._reduce_shard = recorded(
        "reduce", sharding._reduce_shard, lambda t: {"records": int(t.runs[:, 2].sum()), "shard": t.shard}
    )
    return cli.main(argv)


# --------------------------------------------------------------------------------------------- the corpus


def mpirun(ranks: int) -> list[str]:
    """The launcher prefix of a command run on `ranks` MPI ranks (none for one)."""
    if ranks <= 1:
        return []
    return [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks)]


def calls_text(meta: syscalls.Metadata) -> str:
    return " ".join(f"{k} {meta.calls[k]}" for k in ("open", "mkdir", "unlink", "rename", "stat"))


def albert_data(*args: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=REPO, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise SystemExit(f"albert-data {args[0]} failed:\n{proc.stderr}")
    return proc


def base_corpus(work: Path) -> Path:
    """The Wikipedia excerpt and the Lee news corpus (one story a line, given as JSON lines) as documents."""
    from data_prep.sample_corpora import lee_background, wikipedia_excerpt

    base = work / "base"
    if not base.exists():
        lee = work / "lee.jsonl"
        lines = [line for line in lee_background().read_text().splitlines() if line.strip()]
        lee.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
        albert_data("corpus", "--input", str(wikipedia_excerpt()), str(lee), "--output", str(base), "--num-files", "4")
    return base


def scaled_corpus(base: Path, out: Path, mb: float, file_mb: float) -> int:
    """Copies of the base documents, each in another seeded order, in files of about `file_mb`, to `mb` in all."""
    docs = [d for path in sorted(base.glob("*.txt")) for d in path.read_text().split("\n\n") if d.strip()]
    out.mkdir(parents=True)
    target, file_bytes = int(mb * (1 << 20)), int(file_mb * (1 << 20))
    written, copy, out_file, index = 0, 0, None, 0
    while written < target:
        random.Random(copy).shuffle(docs)
        for doc in docs:
            if out_file is None or out_file.tell() >= file_bytes:
                if out_file is not None:
                    out_file.close()
                out_file = open(out / f"corpus-{index:05d}.txt", "w")
                index += 1
            text = doc.strip("\n") + "\n\n"
            out_file.write(text)
            written += len(text.encode())
            if written >= target:
                break
        copy += 1
    out_file.close()
    return written


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Phase:
    wall: float  # first task start to last task end
    task_seconds: float
    cpu_seconds: float  # of the tasks' processes: the unit cost, whatever else runs on the machine
    units: float  # MB of input (map) or shards (reduce)
    records: int  # bytes of example records made (map) or shuffled and written (reduce)
    peak_rss: int  # the largest VmHWM of a task's process
    peak_added: int  # the largest VmHWM - VmRSS at its start
    largest_shard: int = 0  # reduce: bytes of records of the largest shard


@dataclass
class Run:
    name: str
    workers: int  # processes doing tasks at once, all ranks together
    seconds: float
    phases: dict[str, Phase]
    metadata: dict[str, syscalls.Metadata]  # phase -> calls on the input and output folders
    pieces: int
    shards: int
    shas: list[str]
    load: tuple[float, float]  # the machine's 1-minute load average before and after


def run_shard(name: str, corpus: Path, spm: Path, out: Path, settings: list[str], workers: int, ranks: int) -> Run:
    from data_prep.examples import record_dtype
    from data_prep.shards import Manifest

    shutil.rmtree(out, ignore_errors=True)
    task_log = out.with_suffix(".tasks.jsonl")
    task_log.unlink(missing_ok=True)
    cmd = [*mpirun(ranks), sys.executable, str(Path(__file__).resolve()), RECORD_TASKS, "shard", "--input", str(corpus)]
    cmd += ["--spm-model", str(spm), "--output", str(out), "--workers", str(workers), "--no-progress", *settings]
    started, load = time.time(), os.getloadavg()[0]
    env = {**os.environ, TASK_LOG: str(task_log), "PYTHONPATH": str(REPO)}
    proc, strace_log = syscalls.traced_log(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.time() - started
    if proc.returncode:
        raise SystemExit(f"{name}: albert-data shard failed:\n{proc.stderr}")
    tasks = [json.loads(line) for line in task_log.read_text().splitlines()]
    itemsize = record_dtype(128, 20).itemsize
    phases = {}
    for phase in ("map", "reduce"):
        mine = [t for t in tasks if t["phase"] == phase]
        phases[phase] = Phase(
            wall=max(t["end"] for t in mine) - min(t["start"] for t in mine),
            task_seconds=sum(t["end"] - t["start"] for t in mine),
            cpu_seconds=sum(t["cpu"] for t in mine),
            records=sum(t.get("records", 0) for t in tasks if t["phase"] == "reduce") * itemsize,
            units=sum(t["bytes"] for t in mine) / (1 << 20) if phase == "map" else len(mine),
            peak_rss=max(t["VmHWM"] for t in mine),
            peak_added=max(t["VmHWM"] - t["start_rss"] for t in mine),
            largest_shard=max((t.get("records", 0) * itemsize for t in mine), default=0),
        )
    reduce_from = min(t["start"] for t in tasks if t["phase"] == "reduce")
    roots = [corpus, out]
    metadata = {
        "map": syscalls.count(strace_log, roots, until=reduce_from),
        "reduce": syscalls.count(strace_log, roots, since=reduce_from),
    }
    shutil.rmtree(strace_log)
    manifest = Manifest.load(out).data
    pieces = int(proc.stderr.split(" input files in ")[1].split()[0])
    shas = [s["sha256"] for s in manifest["shards"]]
    return Run(
        name,
        workers * ranks,
        seconds,
        phases,
        metadata,
        pieces,
        len(manifest["shards"]),
        shas,
        (load, os.getloadavg()[0]),
    )


# --------------------------------------------------------------------------------------------- report


def mb(n: float) -> str:
    return f"{n / (1 << 20):.0f}"


@dataclass(frozen=True)
class Cluster:
    text_gb: float = 20.0  # English Wikipedia + books, clean text
    nodes: int = 64
    cores: int = 32  # workers per node (one MPI rank per node)


def projection(run: Run, many: Run | None, text_mb: float, cluster: Cluster) -> str:
    """The defaults run's unit costs (and, for the reduce's opens per piece, the many-shards run's) projected to the
    cluster's corpus: pieces, shards, files, metadata calls, memory per process, time per phase."""
    from bench.harness import markdown_table
    from data_prep.sharding import ShardSettings, auto_num_shards

    text = cluster.text_gb * (1 << 30)
    workers = cluster.nodes * cluster.cores
    map_phase, reduce_phase = run.phases["map"], run.phases["reduce"]
    pieces = int(text // (8 << 20))
    shards = auto_num_shards(int(text), ShardSettings(dupe_factor=5))
    records = reduce_phase.records / (text_mb * (1 << 20)) * text  # measured records per byte of text, at dupe 5
    shard_bytes = records / shards
    map_calls = run.metadata["map"].total / run.pieces
    # reduce: one open of every piece's file per shard, plus what each shard costs alone
    ref = many or run
    pairs = ref.shards * ref.pieces
    per_shard = (ref.metadata["reduce"].total - pairs) / ref.shards
    map_cpu = map_phase.cpu_seconds / map_phase.units * text / (1 << 20)
    red_cpu = reduce_phase.cpu_seconds / (reduce_phase.records / (1 << 30)) * records / (1 << 30)
    map_task = map_phase.cpu_seconds / run.pieces
    red_task = reduce_phase.cpu_seconds / run.shards * shard_bytes / max(reduce_phase.records / run.shards, 1)
    rows = [
        [
            "map",
            f"{pieces:,} pieces",
            f"{pieces:,}",
            f"{pieces * map_calls:,.0f}",
            f"{mb(map_phase.peak_rss)} MB",
            f"{map_cpu / 3600:.1f} core-h: {-(-pieces // workers) * map_task:.0f} s on {workers:,} workers "
            f"({-(-pieces // workers)} waves of {map_task:.1f} s tasks)",
        ],
        [
            "reduce",
            f"{shards:,} shards of {mb(shard_bytes)} MB",
            f"{shards:,}",
            f"{shards * (pieces + per_shard):,.0f} ({shards * pieces:,} opens of spill files)",
            f"{mb(shard_bytes + reduce_phase.peak_rss - reduce_phase.largest_shard)} MB",
            f"{red_cpu / 3600:.1f} core-h: {red_task:.0f} s on {min(workers, shards):,} workers (1 task each)",
        ],
    ]
    table = markdown_table(
        ["phase", "tasks", "files created", "metadata calls", "memory per process", "time (CPU only)"], rows
    )
    return (
        f"Projected: {cluster.text_gb:g} GB of text, dupe factor 5, seq 128, 8 MB pieces, 256 MB shards, "
        f"{cluster.nodes} nodes x {cluster.cores} workers; {records / (1 << 30):.0f} GB of records\n\n{table}"
    )


def report(runs: list[Run], text_mb: float) -> str:
    from bench.harness import markdown_table

    rows = []
    for r in runs:
        for phase, p in r.phases.items():
            meta = r.metadata[phase]
            per_worker = p.units / p.wall / min(r.workers, max(1, round(p.units)) if phase == "reduce" else r.workers)
            rows.append(
                [
                    r.name,
                    phase,
                    f"{p.wall:.1f}",
                    f"{per_worker:.2f} {'MB text/s' if phase == 'map' else 'shards/s'}",
                    f"{p.task_seconds / p.wall:.2f}",
                    f"{p.cpu_seconds / p.task_seconds:.0%}",
                    f"{p.cpu_seconds / p.units:.2f} s/MB text"
                    if phase == "map"
                    else f"{p.cpu_seconds / (p.records / (1 << 30)):.1f} s/GB records",
                    mb(p.peak_rss),
                    mb(p.peak_added),
                    mb(p.largest_shard) if phase == "reduce" else "",
                    str(len(meta.created)),
                    calls_text(meta),
                ]
            )
    table = markdown_table(
        [
            "run",
            "phase",
            "wall s",
            "per worker",
            "tasks running",
            "CPU share",
            "CPU",
            "peak RSS MB",
            "added MB",
            "largest shard MB",
            "files created",
            "metadata calls",
        ],
        rows,
        numeric={2, 4, 5, 7, 8, 9, 10},
    )
    lines = [table, ""]
    for r in runs:
        created = sum(len(m.created) for m in r.metadata.values())
        lines.append(
            f"- {r.name}: {r.seconds:.1f} s in all; {r.pieces} pieces, {r.shards} shards: {created} files created "
            f"(target <= pieces + shards + 16 = {r.pieces + r.shards + 16}); load average {r.load[0]:.1f} before, "
            f"{r.load[1]:.1f} after ({os.cpu_count()} cores)"
        )
    by_name = {r.name: r for r in runs}
    one, two = by_name.get("1 worker"), by_name.get("2 workers")
    if one and two:
        speed = (one.phases["map"].wall + one.phases["reduce"].wall) / (
            two.phases["map"].wall + two.phases["reduce"].wall
        )
        lines.append(f"- shard step (map + reduce), 2 workers vs 1: {speed:.2f}x (target >= 1.8x)")
        lines.append(
            "  (tasks running: task time / wall time, the workers kept busy; CPU share: CPU time / task time, below "
            "100% when other processes compete for the cores)"
        )
    big = by_name.get(DEFAULTS)
    if big:
        reduce_phase = big.phases["reduce"]
        lines.append(
            f"- reduce at the default 256 MB shards: largest shard {mb(reduce_phase.largest_shard)} MB of records, "
            f"peak RSS {mb(reduce_phase.peak_rss)} MB = {reduce_phase.peak_rss / (256 << 20):.2f}x the target shard "
            f"size (target <= 1.5x); {mb(reduce_phase.peak_rss - reduce_phase.largest_shard)} MB more than the shard"
        )
    same = {tuple(r.shas) for r in runs if r.name != DEFAULTS}
    lines.append(f"- shards byte-identical across the runs with the same settings: {'yes' if len(same) == 1 else 'NO'}")
    lines.append(f"- input: {text_mb:.0f} MB of text")
    if big:
        lines += ["", projection(big, by_name.get("2 workers"), text_mb, Cluster())]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the corpus step


# record-tasks mode: the corpus task functions it wrapped (empty in a spawned worker: not wrapped there)
_ORIGINAL: dict = {}


def _recorded(phase: str, name: str, args, size: dict) -> object:
    """The corpus task function `name` on `args`, timed, with this process's memory appended to the task log."""
    from data_prep import corpus

    fn = _ORIGINAL.get(name) or getattr(corpus, name)
    start, rss, cpu = time.time(), _status()["VmRSS"], time.process_time()
    result = fn(args)
    record = {"phase": phase, "pid": os.getpid(), "start": start, "end": time.time(), "cpu": time.process_time() - cpu}
    record.update(start_rss=rss, **_status(), **size)
    with open(os.environ[TASK_LOG], "a") as f:
        f.write(json.dumps(record) + "\n")
    return result


# module-level, so that corpus's spawned workers can unpickle them; they call the original task functions


def recorded_read_part(args):
    return _recorded("read", "_read_part", args, {"bytes": args[0].size})


def recorded_clean_batch(args):
    return _recorded("clean", "_clean_batch", args, {"docs": len(args[0])})


def recorded_write_output(args):
    return _recorded("write", "_write_output", args, {"bytes": sum(hi - lo for _, lo, hi in args[0])})


def record_corpus_tasks(argv: list[str]) -> int:
    """`albert-data corpus ARGS` with each part read, batch cleaned and file written timed and its memory recorded,
    and the main process's CPU time and peak memory (one line per rank, phase "main")."""
    from data_prep import cli, corpus

    wrappers = {
        "_read_part": recorded_read_part,
        "_clean_batch": recorded_clean_batch,
        "_write_output": recorded_write_output,
    }
    for name, wrapper in wrappers.items():
        _ORIGINAL[name] = getattr(corpus, name)
        setattr(corpus, name, wrapper)
    start = time.time()
    try:
        return cli.main(argv)
    finally:
        record = {"phase": "main", "pid": os.getpid(), "start": start, "end": time.time(), "cpu": time.process_time()}
        with open(os.environ[TASK_LOG], "a") as f:
            f.write(json.dumps({**record, **_status()}) + "\n")


def _dump_parts() -> tuple[bytes, list[bytes], bytes]:
    """The Wikipedia excerpt's XML: its header (<mediawiki>, <siteinfo>), its pages, its closing tag."""
    import bz2
    import re

    from data_prep.sample_corpora import wikipedia_excerpt

    xml = bz2.decompress(wikipedia_excerpt().read_bytes())
    starts = [m.start() for m in re.finditer(rb"  <page>", xml)]
    end = xml.rindex(b"</mediawiki>")
    return xml[: starts[0]], [xml[a:b] for a, b in zip(starts, starts[1:] + [end])], xml[end:]


@dataclass
class WikiInput:
    name: str
    folder: Path
    xml_bytes: int  # of the pages and headers, uncompressed
    stored_bytes: int  # the .bz2 files (and the index)
    files: int
    part_mb: float  # the --part-mb to use


def wiki_inputs(work: Path, xml_mb: float, files: int) -> list[WikiInput]:
    """The excerpt's pages repeated to `xml_mb` of XML (each copy in another seeded page order), as
    - `files` part files enwiki-partNN.xml.bz2, each a valid dump (header, its run of the pages, closing tag);
    - one multistream dump of the same pages in the same order (header stream, streams of 10 pages, closing stream)
      with its index `offset:page_id:title` beside it. enwiki's streams hold 100 pages of about 4 KB of XML; the
      excerpt's pages are longer (about 30 KB), so 10 to a stream keeps each --part-mb range many streams long.
    Both give the same documents in the same order, so the same corpus files."""
    import bz2
    import re

    header, pages, footer = _dump_parts()
    target, seq, size, copy = int(xml_mb * (1 << 20)), [], 0, 0
    while size < target:
        order = list(pages)
        random.Random(copy).shuffle(order)
        for page in order:
            if size >= target:
                break
            seq.append(page)
            size += len(page)
        copy += 1
    parts_dir, multi_dir = work / "wiki-parts", work / "wiki-multistream"
    for d in (parts_dir, multi_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    xml_bytes = 0
    for k in range(files):
        run = seq[k * len(seq) // files : (k + 1) * len(seq) // files]
        data = header + b"".join(run) + footer
        xml_bytes += len(data)
        (parts_dir / f"enwiki-part{k:02d}.xml.bz2").write_bytes(bz2.compress(data))
    dump = multi_dir / "enwiki-bench-pages-articles-multistream.xml.bz2"
    index = []
    with open(dump, "wb") as out:
        out.write(bz2.compress(header))
        for g in range(0, len(seq), 10):
            offset = out.tell()
            for page in seq[g : g + 10]:
                page_id = re.search(rb"<id>(\d+)</id>", page).group(1).decode()
                title = re.search(rb"<title>(.*?)</title>", page).group(1).decode()
                index.append(f"{offset}:{page_id}:{title}\n")
            out.write(bz2.compress(b"".join(seq[g : g + 10])))
        out.write(bz2.compress(footer))
    (multi_dir / "enwiki-bench-pages-articles-multistream-index.txt.bz2").write_bytes(
        bz2.compress("".join(index).encode())
    )
    stored = sum(f.stat().st_size for f in parts_dir.iterdir())
    multi_stored = sum(f.stat().st_size for f in multi_dir.iterdir())
    file_mb = stored / files / (1 << 20)
    return [
        # every file below --part-mb: one task each, read whole by a worker
        WikiInput("part files", parts_dir, xml_bytes, stored, files, 16),
        # every file above --part-mb (as enwiki's part files are at the default 16 MB): read by the main process,
        # its pages cleaned by the workers in batches
        WikiInput("part files, streamed", parts_dir, xml_bytes, stored, files, round(file_mb / 2, 3)),
        # cut at stream offsets into about as many parts as there are part files
        WikiInput(
            "multistream",
            multi_dir,
            len(header) + len(footer) + sum(map(len, seq)),
            multi_stored,
            1,
            round(dump.stat().st_size / files / (1 << 20), 3),
        ),
    ]


@dataclass
class CorpusRun:
    name: str
    input: WikiInput
    workers: int  # processes doing tasks at once, all ranks together
    seconds: float  # the whole command
    read_wall: float  # start of the command's main function to the first output file's task
    write_wall: float  # first output file's task start to last one's end
    task_seconds: float  # read: parts read whole and batches cleaned, in the workers (or the main process)
    task_cpu: float
    cpu: float  # all processes: main processes and worker tasks
    main_cpu: float  # the main processes (rank 0's and the others'), tasks run there included
    main_rss: int  # peak RSS of a main process
    worker_rss: int  # peak RSS of a worker process (0: none)
    metadata: syscalls.Metadata
    parts: int
    outputs: int
    shas: list[str]
    load: tuple[float, float]


def run_corpus(name: str, wiki: WikiInput, out: Path, workers: int, ranks: int) -> CorpusRun:
    import hashlib

    shutil.rmtree(out, ignore_errors=True)
    task_log = out.with_suffix(".tasks.jsonl")
    task_log.unlink(missing_ok=True)
    cmd = [
        *mpirun(ranks),
        sys.executable,
        str(Path(__file__).resolve()),
        RECORD_TASKS,
        "corpus",
        "--input",
        str(wiki.folder),
    ]
    cmd += ["--output", str(out), "--workers", str(workers), "--part-mb", str(wiki.part_mb), "--no-progress"]
    started, load = time.time(), os.getloadavg()[0]
    env = {**os.environ, TASK_LOG: str(task_log), "PYTHONPATH": str(REPO)}
    proc, meta = syscalls.traced(cmd, [wiki.folder, out], capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.time() - started
    if proc.returncode:
        raise SystemExit(f"{name}: albert-data corpus failed:\n{proc.stderr}")
    records = [json.loads(line) for line in task_log.read_text().splitlines()]
    mains = [r for r in records if r["phase"] == "main"]
    main_pids = {r["pid"] for r in mains}
    reads = [r for r in records if r["phase"] in ("read", "clean")]
    writes = [r for r in records if r["phase"] == "write"]
    in_workers = [r for r in records if r["pid"] not in main_pids and r["phase"] != "main"]
    outputs = sorted(out.glob("corpus-*.txt"))
    return CorpusRun(
        name=name,
        input=wiki,
        workers=workers * ranks,
        seconds=seconds,
        read_wall=min(w["start"] for w in writes) - min(m["start"] for m in mains),
        write_wall=max(w["end"] for w in writes) - min(w["start"] for w in writes),
        task_seconds=sum(r["end"] - r["start"] for r in reads),
        task_cpu=sum(r["cpu"] for r in reads),
        cpu=sum(m["cpu"] for m in mains) + sum(r["cpu"] for r in in_workers),
        main_cpu=sum(m["cpu"] for m in mains),
        main_rss=max(m["VmHWM"] for m in mains),
        worker_rss=max((r["VmHWM"] for r in in_workers), default=0),
        metadata=meta,
        parts=int(proc.stderr.split(" input file(s) in ")[1].split()[0]),
        outputs=len(outputs),
        shas=[hashlib.sha256(p.read_bytes()).hexdigest() for p in outputs],
        load=(load, os.getloadavg()[0]),
    )


@dataclass(frozen=True)
class Enwiki:
    xml_gb: float = 95.0  # English Wikipedia's pages-articles XML, uncompressed (about 90-100 GB)
    part_files: int = 27  # the dump published in part files
    nodes: int = 64
    cores: int = 32  # workers per node (one MPI rank per node)


def corpus_projection(runs: list[CorpusRun], enwiki: Enwiki) -> str:
    """The corpus step's measured costs per MB of XML projected to English Wikipedia on the cluster, for its two
    layouts: a multistream dump with its index (parts of --part-mb 16 of bz2 streams, read in parallel by all
    workers) and the 27 part files (each above --part-mb: read by its rank's main process, cleaned by its workers)."""
    from bench.harness import markdown_table

    by_run = {(r.input.name, r.name): r for r in runs}
    one = by_run.get(("part files", "1 worker")) or runs[0]
    xml_mb = one.input.xml_bytes / (1 << 20)
    cpu_per_mb = one.cpu / xml_mb  # all the work, one process: the per-core rate
    workers = enwiki.nodes * enwiki.cores
    xml = enwiki.xml_gb * 1024  # MB
    rows = []
    multi = by_run.get(("multistream", "1 worker"))
    if multi:
        ratio = multi.input.xml_bytes / multi.input.stored_bytes
        parts = math.ceil(xml / ratio / 16)
        part_s = 16 * ratio * multi.cpu / (multi.input.xml_bytes / (1 << 20))
        rows.append(
            [
                "multistream + index",
                f"{parts:,} parts of 16 MB bz2 ({16 * ratio:.0f} MB XML)",
                f"{xml * multi.cpu / (multi.input.xml_bytes / (1 << 20)) / 3600:,.0f} core-h",
                f"{-(-parts // workers) * part_s / 60:.1f} min ({-(-parts // workers)} wave(s) of {part_s:.0f} s tasks "
                f"on {workers:,} workers)",
            ]
        )
    streamed2 = by_run.get(("part files, streamed", "2 workers"))
    if streamed2:
        s_mb = streamed2.input.xml_bytes / (1 << 20)
        # the main process reads (bz2, XML) the file alone; the workers clean its pages: the slower of the two
        main_s_per_mb = streamed2.main_cpu / s_mb
        clean_s_per_mb = streamed2.task_cpu / s_mb
        file_mb = xml / enwiki.part_files
        file_s = max(file_mb * main_s_per_mb, file_mb * clean_s_per_mb / enwiki.cores)
        rows.append(
            [
                f"{enwiki.part_files} part files",
                f"{enwiki.part_files} files of {file_mb / 1024:.1f} GB XML on average, on {enwiki.part_files} of "
                f"{enwiki.nodes} ranks",
                f"{xml * cpu_per_mb / 3600:,.0f} core-h",
                f"{file_s / 60:.0f} min for an average file: its main process reads {1 / main_s_per_mb:.0f} MB XML/s, "
                f"{enwiki.cores} workers clean {enwiki.cores / clean_s_per_mb:.0f} MB/s (the largest file sets the "
                "time)",
            ]
        )
    table = markdown_table(["layout", "tasks", "CPU", "time (CPU only)"], rows)
    return (
        f"Projected: English Wikipedia, {enwiki.xml_gb:g} GB of XML, {enwiki.nodes} nodes x {enwiki.cores} workers; "
        f"{cpu_per_mb:.2f} CPU s per MB of XML (1 worker, part files)\n\n{table}"
    )


def corpus_report(runs: list[CorpusRun]) -> str:
    from bench.harness import markdown_table

    rows = []
    for r in runs:
        xml_mb = r.input.xml_bytes / (1 << 20)
        rows.append(
            [
                r.name,
                r.input.name,
                f"{r.seconds:.1f}",
                f"{r.read_wall:.1f}",
                f"{r.write_wall:.1f}",
                f"{xml_mb / r.seconds:.2f}",
                f"{xml_mb / r.seconds / r.workers:.2f}",
                f"{r.task_seconds / r.read_wall:.2f}",
                f"{r.task_cpu / r.task_seconds:.0%}" if r.task_seconds else "",
                f"{r.cpu / xml_mb:.2f}",
                f"{r.main_cpu / xml_mb:.2f}",
                mb(r.main_rss),
                mb(r.worker_rss) if r.worker_rss else "",
                f"{r.parts}",
                str(len(r.metadata.created)),
                calls_text(r.metadata),
            ]
        )
    table = markdown_table(
        [
            "run",
            "input",
            "wall s",
            "read s",
            "write s",
            "MB XML/s",
            "per worker",
            "tasks running",
            "CPU share",
            "CPU s/MB XML",
            "main CPU s/MB XML",
            "main peak RSS MB",
            "worker peak RSS MB",
            "parts",
            "files created",
            "metadata calls",
        ],
        rows,
        numeric={2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14},
    )
    lines = [table, ""]
    for r in runs:
        lines.append(
            f"- {r.name}, {r.input.name}: {r.outputs} corpus files; load average {r.load[0]:.1f} before, "
            f"{r.load[1]:.1f} after ({os.cpu_count()} cores)"
        )
    for name in dict.fromkeys(r.input.name for r in runs):
        mine = {r.name: r for r in runs if r.input.name == name}
        one, two = mine.get("1 worker"), mine.get("2 workers")
        if one and two:
            lines.append(
                f"- {name}, 2 workers vs 1: {one.seconds / two.seconds:.2f}x the whole command, "
                f"{one.read_wall / two.read_wall:.2f}x the read phase (target: scales with workers)"
            )
    lines.append(
        "  (read: from the start to the first output file; tasks running: time of the parts read and batches "
        "cleaned / read wall time; CPU share: their CPU time / their time; CPU: all processes; main CPU: the main "
        "processes, which read everything with 1 worker and the streamed files' XML with more)"
    )
    same = {tuple(r.shas) for r in runs}
    lines.append(f"- corpus files byte-identical across all runs and inputs: {'yes' if len(same) == 1 else 'NO'}")
    wiki = runs[0].input
    lines.append(
        f"- input: {wiki.xml_bytes / (1 << 20):.0f} MB of XML; {wiki.files} part files, {wiki.stored_bytes / (1 << 20):.1f} "
        f"MB of bz2 (the Wikipedia excerpt's pages repeated, each copy in another order)"
    )
    lines += ["", corpus_projection(runs, Enwiki())]
    return "\n".join(lines)


def shard_phase(args) -> None:
    base = base_corpus(args.work)
    spm = args.work / "vocab" / "spiece.model"
    if not spm.exists():
        albert_data("vocab", "--input", str(base), "--output-prefix", str(spm.with_suffix("")), "--vocab-size", "8000")
    corpus = args.work / f"corpus-{args.mb:g}mb"
    shutil.rmtree(corpus, ignore_errors=True)
    text = scaled_corpus(base, corpus, args.mb, args.file_mb)
    settings = ["--dupe-factor", str(args.dupe_factor), "--piece-mb", str(args.piece_mb)]
    many = [*settings, "--shard-mb", str(args.shard_mb)]
    # 1 and 2 workers take turns, --repeats times: the fastest of each is kept (other work on the machine only
    # ever adds time)
    plan = [("1 worker", many, 1, 1), ("2 workers", many, 2, 1)] * args.repeats
    if args.mpi:
        plan.append(("2 MPI ranks x 1 worker", many, 1, 2))
    if args.big:
        plan.append((DEFAULTS, ["--piece-mb", "8", "--dupe-factor", "5", "--shard-mb", "256"], 2, 1))
    runs = []
    for name, flags, workers, ranks in plan:
        runs.append(run_shard(name, corpus, spm, args.work / "out", flags, workers, ranks))
        print(f"{name}: {runs[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    # strace and the task recording take CPU of their own: on 2 cores they compete with 2 workers. The wall clock of
    # the plain command, 1 and 2 workers in turns, is the speed-up a user sees.
    plain: dict[int, float] = {}
    for workers in (1, 2) * args.repeats:
        shutil.rmtree(args.work / "out", ignore_errors=True)
        started = time.time()
        albert_data(
            "shard",
            "--input",
            str(corpus),
            "--spm-model",
            str(spm),
            "--output",
            str(args.work / "out"),
            "--workers",
            str(workers),
            "--no-progress",
            "--mpi",
            "off",
            *many,
        )
        plain[workers] = min(plain.get(workers, float("inf")), time.time() - started)
        print(f"untraced, {workers} worker(s): {time.time() - started:.1f} s", file=sys.stderr, flush=True)
    shutil.rmtree(args.work / "out", ignore_errors=True)
    print(report(fastest(runs, lambda r: r.name), text / (1 << 20)))
    print(
        f"- the plain command (no strace, no task recording), fastest of {args.repeats}: 1 worker {plain[1]:.1f} s, "
        f"2 workers {plain[2]:.1f} s: {plain[1] / plain[2]:.2f}x (target >= 1.8x); "
        f"load average {os.getloadavg()[0]:.1f} after"
    )


def corpus_phase(args) -> None:
    inputs = wiki_inputs(args.work, args.xml_mb, args.wiki_files)
    plan = [(w, name, workers, 1) for w in inputs for name, workers in (("1 worker", 1), ("2 workers", 2))]
    plan *= args.repeats
    if args.mpi:
        plan += [(w, "2 MPI ranks x 1 worker", 1, 2) for w in inputs]
    runs = []
    for wiki, name, workers, ranks in plan:
        runs.append(run_corpus(name, wiki, args.work / "corpus-out", workers, ranks))
        print(f"corpus, {wiki.name}, {name}: {runs[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    shutil.rmtree(args.work / "corpus-out", ignore_errors=True)
    print(corpus_report(fastest(runs, lambda r: (r.input.name, r.name))))


def fastest(runs: list, key) -> list:
    """The fastest run of each kind, in the order the kinds first ran."""
    best: dict = {}
    for r in runs:
        if key(r) not in best or r.seconds < best[key(r)].seconds:
            best[key(r)] = r
    return list(best.values())


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == RECORD_TASKS:
        return record_corpus_tasks(sys.argv[2:]) if sys.argv[2] == "corpus" else record_shard_tasks(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", nargs="+", choices=("shard", "corpus"), default=["shard", "corpus"])
    parser.add_argument("--mb", type=float, default=256, help="shard: MB of text")
    parser.add_argument("--file-mb", type=float, default=16, help="shard: size of each corpus file")
    parser.add_argument("--piece-mb", type=float, default=1, help="albert-data shard --piece-mb")
    parser.add_argument("--shard-mb", type=float, default=8, help="albert-data shard --shard-mb (many shards)")
    parser.add_argument("--dupe-factor", type=int, default=2)
    parser.add_argument("--xml-mb", type=float, default=48, help="corpus: MB of wiki XML")
    parser.add_argument("--wiki-files", type=int, default=8, help="corpus: number of part files")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of 1 and 2 workers each, in turns; the fastest kept"
    )
    parser.add_argument("--no-mpi", dest="mpi", action="store_false", help="skip the mpirun -np 2 runs")
    parser.add_argument("--no-defaults", dest="big", action="store_false", help="shard: skip the run with the defaults")
    parser.add_argument(
        "--work", type=Path, default=REPO / "runs" / "bench_scale", help="folder for corpora and outputs"
    )
    args = parser.parse_args()
    if not syscalls.available():
        raise SystemExit("strace is needed (apt-get install strace)")
    args.work.mkdir(parents=True, exist_ok=True)
    if "shard" in args.phases:
        shard_phase(args)
    if "corpus" in args.phases:
        if "shard" in args.phases:
            print()
        corpus_phase(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
