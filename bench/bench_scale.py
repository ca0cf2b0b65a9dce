"""A scaled-down cluster job of `albert-data shard`: hundreds of MB of text, small pieces, many shards, 2 workers, and
2 MPI ranks; per phase: wall time, throughput per worker, peak memory per task, files created, metadata calls.

The text is real: the Wikipedia excerpt and the Lee news corpus that data_prep/demo_corpus.py fetches, made into
standard-format documents by `albert-data corpus`, then repeated (each copy in another seeded document order) up to
--mb. One vocabulary is trained on the base text. Then `albert-data shard` runs as a subprocess:

- 1 worker, 2 workers, and (--mpi) `mpirun -np 2` with 1 worker per rank: small pieces (--piece-mb) and many shards
  (--shard-mb); the shards must be byte-identical across the three;
- 2 workers with albert-data's defaults (8 MB pieces, dupe factor 5, 256 MB shards): the unit costs that
  docs/scale.md projects to a cluster, and the memory of a reduce at the default shard size.

Every run is traced with `strace -f` (bench/syscalls.py: files created, open/mkdir/unlink/rename/stat calls under
the input and output folders, split into phases by the time the first reduce task started). Each task's process
records its wall time and memory (VmHWM, the peak resident set, and VmRSS when it started: the difference is what
the task itself added) through this script's `probe` mode, which wraps the task functions from outside.

    python bench/bench_scale.py                      # 256 MB of text, 1 MB pieces, 8 MB shards, with --mpi
    python bench/bench_scale.py --mb 64 --no-mpi     # a quicker look
"""

from __future__ import annotations

import argparse
import json
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
PROBE_LOG = "BENCH_SCALE_PROBE_LOG"  # probe mode: where each task appends its line (JSON)


# --------------------------------------------------------------------------------------------- probe mode


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def probe(argv: list[str]) -> int:
    """`albert-data ARGS` with each map and reduce task timed and its memory recorded (to $BENCH_SCALE_PROBE_LOG)."""
    from data_prep import cli, sharding

    log_path = os.environ[PROBE_LOG]

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


def albert_data(*args: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=REPO, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise SystemExit(f"albert-data {args[0]} failed:\n{proc.stderr}")
    return proc


def base_corpus(work: Path) -> Path:
    """The Wikipedia excerpt and the Lee news corpus (one story a line, given as JSON lines) as documents."""
    from data_prep.demo_corpus import lee_background, wikipedia_excerpt

    base = work / "base"
    if not base.exists():
        lee = work / "lee.jsonl"
        lines = [line for line in lee_background().read_text().splitlines() if line.strip()]
        lee.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
        albert_data("corpus", "--input", str(wikipedia_excerpt()), str(lee), "--output", str(base), "--num-files", "4")
    return base


def scaled_corpus(base: Path, out: Path, mb: float, file_mb: float) -> int:
    """Copies of the base documents, each in another seeded order, in files of about `file_mb`, to `mb` in all."""
    docs = [d for f in sorted(base.glob("*.txt")) for d in f.read_text().split("\n\n") if d.strip()]
    out.mkdir(parents=True)
    target, file_bytes = int(mb * (1 << 20)), int(file_mb * (1 << 20))
    written, copy, f, index = 0, 0, None, 0
    while written < target:
        random.Random(copy).shuffle(docs)
        for doc in docs:
            if f is None or f.tell() >= file_bytes:
                if f is not None:
                    f.close()
                f = open(out / f"corpus-{index:05d}.txt", "w")
                index += 1
            text = doc.strip("\n") + "\n\n"
            f.write(text)
            written += len(text.encode())
            if written >= target:
                break
        copy += 1
    f.close()
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
    probe_log = out.with_suffix(".probe.jsonl")
    probe_log.unlink(missing_ok=True)
    launcher = (
        [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks)]
        if ranks > 1
        else []
    )
    cmd = [*launcher, sys.executable, str(Path(__file__).resolve()), "probe", "shard", "--input", str(corpus)]
    cmd += ["--spm-model", str(spm), "--output", str(out), "--workers", str(workers), "--no-progress", *settings]
    started, load = time.time(), os.getloadavg()[0]
    env = {**os.environ, PROBE_LOG: str(probe_log), "PYTHONPATH": str(REPO)}
    proc, strace_log = syscalls.traced_log(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.time() - started
    if proc.returncode:
        raise SystemExit(f"{name}: albert-data shard failed:\n{proc.stderr}")
    tasks = [json.loads(line) for line in probe_log.read_text().splitlines()]
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
    m = Manifest.load(out).data
    pieces = int(proc.stderr.split(" input files in ")[1].split()[0])
    shas = [s["sha256"] for s in m["shards"]]
    return Run(
        name, workers * ranks, seconds, phases, metadata, pieces, len(m["shards"]), shas, (load, os.getloadavg()[0])
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
    m, r = run.phases["map"], run.phases["reduce"]
    pieces = int(text // (8 << 20))
    shards = auto_num_shards(int(text), ShardSettings(dupe_factor=5))
    records = r.records / (text_mb * (1 << 20)) * text  # measured records per byte of text, at dupe 5
    shard_bytes = records / shards
    map_calls = run.metadata["map"].total / run.pieces
    # reduce: one open of every piece's file per shard, plus what each shard costs alone
    ref = many or run
    pairs = ref.shards * ref.pieces
    per_shard = (ref.metadata["reduce"].total - pairs) / ref.shards
    map_cpu = m.cpu_seconds / m.units * text / (1 << 20)
    red_cpu = r.cpu_seconds / (r.records / (1 << 30)) * records / (1 << 30)
    map_task = m.cpu_seconds / run.pieces
    red_task = r.cpu_seconds / run.shards * shard_bytes / max(r.records / run.shards, 1)
    rows = [
        [
            "map",
            f"{pieces:,} pieces",
            f"{pieces:,}",
            f"{pieces * map_calls:,.0f}",
            f"{mb(m.peak_rss)} MB",
            f"{map_cpu / 3600:.1f} core-h: {-(-pieces // workers) * map_task:.0f} s on {workers:,} workers "
            f"({-(-pieces // workers)} waves of {map_task:.1f} s tasks)",
        ],
        [
            "reduce",
            f"{shards:,} shards of {mb(shard_bytes)} MB",
            f"{shards:,}",
            f"{shards * (pieces + per_shard):,.0f} ({shards * pieces:,} opens of spill files)",
            f"{mb(shard_bytes + r.peak_rss - r.largest_shard)} MB",
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
                    " ".join(f"{k} {meta.calls[k]}" for k in ("open", "mkdir", "unlink", "rename", "stat")),
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
        p = big.phases["reduce"]
        lines.append(
            f"- reduce at the default 256 MB shards: largest shard {mb(p.largest_shard)} MB of records, peak RSS "
            f"{mb(p.peak_rss)} MB = {p.peak_rss / (256 << 20):.2f}x the target shard size (target <= 1.5x); "
            f"{mb(p.peak_rss - p.largest_shard)} MB more than the shard"
        )
    same = {tuple(r.shas) for r in runs if r.name != DEFAULTS}
    lines.append(f"- shards byte-identical across the runs with the same settings: {'yes' if len(same) == 1 else 'NO'}")
    lines.append(f"- input: {text_mb:.0f} MB of text")
    if big:
        lines += ["", projection(big, by_name.get("2 workers"), text_mb, Cluster())]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        return probe(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=256, help="MB of text")
    p.add_argument("--file-mb", type=float, default=16, help="size of each corpus file")
    p.add_argument("--piece-mb", type=float, default=1, help="albert-data shard --piece-mb")
    p.add_argument("--shard-mb", type=float, default=8, help="albert-data shard --shard-mb (many shards)")
    p.add_argument("--dupe-factor", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs of 1 and 2 workers each, in turns; the fastest kept")
    p.add_argument("--no-mpi", dest="mpi", action="store_false", help="skip the mpirun -np 2 run")
    p.add_argument("--no-defaults", dest="big", action="store_false", help="skip the run with the default settings")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench_scale", help="folder for corpora and outputs")
    args = p.parse_args()
    if not syscalls.available():
        raise SystemExit("strace is needed (apt-get install strace)")
    args.work.mkdir(parents=True, exist_ok=True)
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
    shutil.rmtree(args.work / "out", ignore_errors=True)
    fastest = {}
    for r in runs:
        if r.name not in fastest or r.seconds < fastest[r.name].seconds:
            fastest[r.name] = r
    print(report(list(fastest.values()), text / (1 << 20)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
