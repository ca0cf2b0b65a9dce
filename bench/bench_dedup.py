"""`albert-data corpus --dedup`: what deduplication and decontamination cost in CPU per MB of text and in memory per
million documents.

    PYTHONPATH=. python bench/bench_dedup.py --documents 250000 1000000
    PYTHONPATH=. python bench/bench_dedup.py --documents 1000000 --ranks 2 --modes off documents paragraphs

The input is synthetic (the cost depends on the number of documents, lines and bytes, not on the words): documents
of 2-8 sentences of 6-20 words drawn from 5,000 made-up words (about 450 bytes a document), one in ten a copy of an
earlier one, and a boilerplate line in one document in twenty; one file in the standard format (`--format docs`),
cut into parts of 16 MB. Each size is written once under --work and reused. For every mode (off, documents,
paragraphs, and off with --exclude-overlap of a 1 MB evaluation text) the plain `write_corpus` runs in a process of
its own with --workers workers (with --ranks N: under `mpirun -np N`, --workers per rank); the table gives its
wall time, its CPU seconds (the processes and their tasks, all ranks), the CPU over the run without dedup per MB of
input, and the peak RSS of a rank's main process (where the decisions are made: fingerprints of its share, the
hashes sent and received; the largest of the ranks) and of the largest task.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

MODES = ("off", "documents", "paragraphs", "overlap")
WORDS = 5000


def make_input(path: Path, documents: int, seed: int = 0) -> None:
    """The synthetic corpus (see the module's docstring), written once."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(WORDS)]
    boilerplate = "Share this page with your friends and family today."
    made: list[str] = []
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for i in range(documents):
            if i > 10 and rng.random() < 0.1:
                text = made[int(rng.integers(0, len(made)))]
            else:
                lines = []
                for _ in range(int(rng.integers(2, 9))):
                    picks = rng.integers(0, WORDS, int(rng.integers(6, 21)))
                    lines.append(" ".join(words[k] for k in picks).capitalize() + ".")
                if rng.random() < 0.05:
                    lines.append(boilerplate)
                text = "\n".join(lines)
                if len(made) < 100_000:
                    made.append(text)
            out.write(text + "\n\n")
    tmp.rename(path)


def evaluation_text(path: Path, source: Path) -> None:
    """1 MB of evaluation text: the first documents of the input (so some documents overlap), joined as blocks."""
    if path.exists():
        return
    with open(source, encoding="utf-8") as f:
        path.write_text(f.read(1 << 20))


def child(mode: str, source: Path, evaluation: Path, out: Path, workers: int, ranks: int) -> None:
    """One run of write_corpus (on one of `ranks` MPI ranks); prints its measurements as JSON."""
    import shutil

    from data_prep.corpus import write_corpus
    from data_prep.dedup import DedupSettings
    from data_prep.mpi import get_world

    world = get_world("on" if ranks > 1 else "off")
    if world.rank == 0:
        shutil.rmtree(out, ignore_errors=True)
    world.barrier()
    settings = {
        "off": DedupSettings(),
        "documents": DedupSettings("documents"),
        "paragraphs": DedupSettings("paragraphs"),
        "overlap": DedupSettings(exclude_overlap=(evaluation,)),
    }[mode]
    start = time.perf_counter()
    stats = write_corpus(
        [source],
        out,
        num_files=4,
        fmt="docs",
        workers=workers,
        progress=False,
        dedup=settings,
        mpi="on" if ranks > 1 else "off",
    )
    wall = time.perf_counter() - start
    own, tasks = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "wall": wall,
                "cpu": own.ru_utime + own.ru_stime + tasks.ru_utime + tasks.ru_stime,
                "main_rss_mb": own.ru_maxrss / 1024,
                "task_rss_mb": tasks.ru_maxrss / 1024,
                "documents": stats.documents,
                "removed": stats.removed.documents,
                "lines": stats.removed.boilerplate_lines,
                "mb": stats.bytes / 1e6,
            }
        ),
        flush=True,
    )
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=1, help="MPI ranks (mpirun -np N)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--work", type=Path, default=Path("runs/bench/dedup"))
    parser.add_argument("--child", nargs=3, metavar=("MODE", "INPUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, source, out = args.child
        child(mode, Path(source), Path(source).with_name("eval.txt"), Path(out), args.workers, args.ranks)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print(
        "| ranks | documents | MB | mode | removed documents | boilerplate lines | wall s | CPU s | CPU s/MB over off "
        "| main process peak RSS MB | largest task RSS MB |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for documents in args.documents:
        folder = args.work / f"d{documents}"
        folder.mkdir(exist_ok=True)
        source = folder / "input.txt"
        make_input(source, documents)
        evaluation_text(folder / "eval.txt", source)
        base = None
        for mode in args.modes:
            command = [sys.executable, __file__, "--child", mode, str(source), str(folder / "out")]
            command += ["--workers", str(args.workers), "--ranks", str(args.ranks)]
            if args.ranks > 1:
                command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(args.ranks), *command]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            run = {
                **runs[0],
                "wall": max(r["wall"] for r in runs),
                "cpu": sum(r["cpu"] for r in runs),
                "main_rss_mb": max(r["main_rss_mb"] for r in runs),
                "task_rss_mb": max(r["task_rss_mb"] for r in runs),
            }
            base = run["cpu"] if mode == "off" else base
            extra = f"{(run['cpu'] - base) / run['mb']:.3f}" if base is not None and mode != "off" else ""
            print(
                f"| {args.ranks} | {documents:,} | {run['mb']:.0f} | {mode} | {run['removed']:,} | {run['lines']:,} | "
                f"{run['wall']:.1f} | {run['cpu']:.1f} | {extra} | {run['main_rss_mb']:.0f} | {run['task_rss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
