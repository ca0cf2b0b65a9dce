"""Throughput and peak memory of `albert-data shard`, side by side in one run.

Builds standard-format corpora of the requested sizes from the Wikipedia excerpt (its documents
repeated), trains one vocabulary, then runs `albert-data shard` as a subprocess for each
(corpus size, workers) pair, sampling the memory of the whole process tree (proportional set size, so
pages shared by forked workers count once).

    python bench/bench_data.py                       # 10 MB and 100 MB, 1 and 2 workers
    python bench/bench_data.py --sizes 10 --workers 1 2 --dupe-factor 2 --repeats 1
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.logs import setup_logging  # noqa: E402
from data_prep.cli import train_vocab_from  # noqa: E402
from data_prep.corpus import write_corpus  # noqa: E402
from data_prep.sample_corpora import wikipedia_excerpt  # noqa: E402
from data_prep.shards import Manifest  # noqa: E402

log = logging.getLogger("bench")


def at_least_one(value: str) -> int:
    if int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return int(value)


def pss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_full_info().pss  # from /proc/PID/smaps_rollup
    except psutil.Error:  # the process ended meanwhile
        return 0


def peak_rss(proc: subprocess.Popen, stop: threading.Event, out: list[int]) -> None:
    root = psutil.Process(proc.pid)
    peak = 0
    while not stop.is_set():
        try:
            pids = [root.pid] + [p.pid for p in root.children(recursive=True)]
        except psutil.Error:
            pids = []
        peak = max(peak, sum(pss(p) for p in pids))  # shared pages of forked workers count once
        time.sleep(0.02)
    out.append(peak)


def build_corpus(docs_dir: Path, target_mb: int, out: Path, files: int = 8) -> int:
    """Repeat the excerpt's documents round-robin into `files` files until target_mb is reached."""
    text = "".join(p.read_text() for p in sorted(docs_dir.glob("*.txt")))
    docs = [d.strip() + "\n\n" for d in text.split("\n\n") if d.strip()]
    out.mkdir(parents=True)
    handles = [open(out / f"part-{i:03d}.txt", "w") for i in range(files)]
    written, i = 0, 0
    while written < target_mb * 1_000_000:
        doc = docs[i % len(docs)]
        handles[i % files].write(doc)
        written += len(doc.encode())
        i += 1
    for h in handles:
        h.close()
    return written


def run_shard(corpus: Path, spm: Path, out: Path, workers: int, dupe: int, seq: int, sample: bool) -> dict:
    """One `albert-data shard` run: its time, or (sample=True) the peak memory of its process tree. The two are
    measured in separate runs: the sampler reads /proc every 20 ms and would slow the run it times."""
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "shard",
        "--input",
        str(corpus),
        "--spm-model",
        str(spm),
        "--output",
        str(out),
        "--max-seq-length",
        str(seq),
        "--dupe-factor",
        str(dupe),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    stop, peak = threading.Event(), []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=peak_rss, args=(proc, stop, peak))
    if sample:
        sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    if sample:
        sampler.join()
    if proc.returncode:
        raise SystemExit(f"shard failed:\n{err}")
    return {
        "seconds": seconds,
        "examples": Manifest.load(out).data["num_examples"],
        "peak_mb": peak[0] / 1e6 if peak else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="corpus sizes in MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dupe-factor", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=25000, help="the excerpt supports at most ~25.5k pieces")
    parser.add_argument(
        "--repeats",
        type=at_least_one,
        default=3,
        help="timed runs of each row, interleaved; the fastest is reported (noise only adds time); memory: one more run",
    )
    args = parser.parse_args()
    setup_logging(False)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        write_corpus([wikipedia_excerpt()], tmp / "excerpt", num_files=1, progress=False)
        spm = train_vocab_from([tmp / "excerpt"], tmp / "vocab" / "spiece", args.vocab_size, 10_000_000, 1, 2, "docs")
        nbytes = {size: build_corpus(tmp / "excerpt", size, tmp / f"c{size}") for size in args.sizes}
        runs: dict[tuple[int, int], list[dict]] = {(size, w): [] for size in args.sizes for w in args.workers}
        for rep in range(args.repeats + 1):  # interleaved, so that a noisy minute does not hit one row only
            for size, w in runs:
                sample = rep == args.repeats
                log.info(
                    "shard: %d MB, %d worker(s), %s",
                    size,
                    w,
                    "memory" if sample else f"timed run {rep + 1} of {args.repeats}",
                )
                result = run_shard(
                    tmp / f"c{size}", spm, tmp / f"s{size}-{w}", w, args.dupe_factor, args.max_seq_length, sample
                )
                shutil.rmtree(tmp / f"s{size}-{w}")
                runs[size, w].append(result)
        rows = [
            (
                size,
                w,
                nbytes[size],
                {
                    "seconds": min(r["seconds"] for r in rs[:-1]),
                    "examples": rs[0]["examples"],
                    "peak_mb": rs[-1]["peak_mb"],
                    "all": [r["seconds"] for r in rs[:-1]],
                },
            )
            for (size, w), rs in runs.items()
        ]
    base = {size: r for size, w, _, r in rows if w == min(args.workers)}
    print(
        f"\nalbert-data shard: seq {args.max_seq_length}, dupe factor {args.dupe_factor}, vocab {args.vocab_size}, "
        f"tokenization, HDF5 writing and the process start included; fastest of {args.repeats} runs; "
        "peak memory from one more run, sampled\n"
    )
    print(
        "| corpus | workers | seconds (all runs) | MB/s of text | examples/s | examples/s per worker | speed-up | peak memory, PSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size, w, nbytes, r in rows:
        eps = r["examples"] / r["seconds"]
        print(
            f"| {size} MB | {w} | {r['seconds']:.1f} ({', '.join(f'{x:.1f}' for x in r['all'])}) | {nbytes / 1e6 / r['seconds']:.2f} | {eps:,.0f} | {eps / w:,.0f} | "
            f"{base[size]['seconds'] / r['seconds']:.2f}x | {r['peak_mb']:.0f} |"
        )
    sizes = sorted(args.sizes)
    if len(sizes) > 1:
        for w in args.workers:
            peaks = {s: r["peak_mb"] for s, ww, _, r in rows if ww == w}
            print(
                f"\npeak memory {sizes[-1]} MB / {sizes[0]} MB corpus, {w} worker(s): {peaks[sizes[-1]] / peaks[sizes[0]]:.2f}x"
            )


if __name__ == "__main__":
    main()
