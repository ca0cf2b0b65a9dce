"""Does the pretraining loader keep up with a GPU? The stall of a fast consumer, per read-ahead setting.

Builds shards (seq 128) from the Wikipedia excerpt with `albert-data corpus/vocab/shard`, or uses `--data`, then
consumes micro-batches from `PretrainingData` as a training loop on a GPU would: each micro-batch takes
`--step-ms` (time.sleep, which releases the GIL as a CUDA-synchronised step does; `--busy` adds a consumer that
spins in Python instead, holding the GIL: the pessimistic case). Reported per setting: micro-batches, wall time,
stall (the loader's `data_wait`: time the consumer was blocked on it), the start-up wait (the first batch, once
per run), the stall after it as % of the run, and the producer's throughput alone (a consumer that takes no time).
`--baseline FILE` adds rows for another implementation of pipeline/data.py (its default settings), e.g. an
earlier one from git, for a comparison in one run.

    python bench/bench_loader.py                           # read-ahead of 0 and 1 windows, 1 ms per micro-batch
    git show HEAD~3:pipeline/data.py > /tmp/data_old.py
    python bench/bench_loader.py --baseline /tmp/data_old.py --busy --repeats 3 --data data/shards
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import h5py  # noqa: E402
import torch  # noqa: E402

from common.logs import setup_logging  # noqa: E402
from data_prep.cli import main as albert_data  # noqa: E402
from data_prep.sample_corpora import wikipedia_excerpt  # noqa: E402
from data_prep.shards import Manifest  # noqa: E402
from pipeline.data import PretrainingData  # noqa: E402

log = logging.getLogger("bench")


def build_shards(work: Path, dupe_factor: int, seq: int) -> Path:
    """Corpus, vocabulary and shards from the excerpt under `work` (reused when already there)."""
    corpus, spm, out = work / "corpus", work / "vocab" / "spiece", work / f"shards-seq{seq}-dupe{dupe_factor}"
    steps = [
        (
            corpus / "corpus-00003.txt",
            ["corpus", "--input", str(wikipedia_excerpt()), "--output", str(corpus), "--num-files", "4"],
        ),
        (
            spm.with_suffix(".model"),
            ["vocab", "--input", str(corpus), "--output-prefix", str(spm), "--vocab-size", "8000"],
        ),
        (
            out / "manifest.json",
            [
                "shard",
                "--input",
                str(corpus),
                "--spm-model",
                str(spm.with_suffix(".model")),
                "--output",
                str(out),
                "--max-seq-length",
                str(seq),
                "--dupe-factor",
                str(dupe_factor),
                "--num-shards",
                "4",
                "--workers",
                str(min(4, os.cpu_count() or 1)),
                "--no-progress",
            ],
        ),
    ]
    for done, cmd in steps:
        if not done.exists():
            log.info("albert-data %s", cmd[0])
            if albert_data(cmd) != 0:
                raise SystemExit(f"albert-data {cmd[0]} failed")
    return out


def consume(make, batches: int, step_ms: float, busy: bool) -> dict:
    """One run: `batches` micro-batches from the loader make() builds, each taking step_ms in the consumer."""
    data = make()
    step = step_ms / 1e3
    batches_iter = iter(data)
    try:
        t0 = time.perf_counter()
        next(batches_iter)
        startup, first_wait = time.perf_counter() - t0, data.data_wait
        for _ in range(batches - 1):
            if busy:  # Python holding the GIL, as a loop that launches kernels without waiting for them
                end = time.perf_counter() + step
                while time.perf_counter() < end:
                    pass
            elif step:
                time.sleep(step)
            next(batches_iter)
        wall = time.perf_counter() - t0
    finally:
        data.close()
    stall = data.data_wait
    return {
        "wall": wall,
        "stall": stall,
        "startup": first_wait,
        "steady": (stall - first_wait) / max(wall - startup, 1e-9),
        "rate": batches / wall,
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median stall (noise on a shared machine goes both ways)."""
    return sorted(runs, key=lambda r: r["steady"])[len(runs) // 2]


def load_baseline(path: Path):
    spec = importlib.util.spec_from_file_location("baseline_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.PretrainingData


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=None, help="a shard folder to read (default: build shards from the excerpt)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the built shards, reused by later runs (default: a temporary one)",
    )
    parser.add_argument(
        "--dupe-factor", type=int, default=10, help="built shards: passes over the excerpt (10: ~44k examples)"
    )
    parser.add_argument("--max-seq-length", type=int, default=128, help="built shards: sequence length")
    parser.add_argument("--micro", type=int, default=64, help="micro-batch size")
    parser.add_argument("--window", type=int, default=8192, help="shuffle window in rows (the loader's default)")
    parser.add_argument(
        "--prefetch",
        type=int,
        nargs="+",
        default=[0, 1],
        metavar="WINDOWS",
        help="read-ahead settings to compare, in windows (0: none, each window read when first needed; 1: the default)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="FILE",
        help="also run the PretrainingData of this copy of pipeline/data.py",
    )
    parser.add_argument("--batches", type=int, default=3000, help="micro-batches per run")
    parser.add_argument("--step-ms", type=float, default=1.0, help="consumer time per micro-batch")
    parser.add_argument(
        "--busy",
        action="store_true",
        help="also run a consumer that spins in Python (holds the GIL) instead of sleeping",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per row, interleaved; the one with the median stall is shown"
    )
    args = parser.parse_args(argv)
    if args.batches < 2 or args.repeats < 1:
        parser.error("--batches must be at least 2 and --repeats at least 1")
    setup_logging(False)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        folder = args.data or build_shards(args.work or Path(tmp), args.dupe_factor, args.max_seq_length)
        attrs = Manifest.load(folder).data
        seq = attrs["attributes"]["max_seq_length"]
        if seq != 128:
            log.warning("%s: sequences of %d tokens, not 128", folder, seq)
        log.info("%s: %d examples of %d tokens", folder, attrs["num_examples"], seq)
        loaders = {
            f"prefetch={n}": functools.partial(PretrainingData, folder, args.micro, 1, window=args.window, prefetch=n)
            for n in args.prefetch
        }
        if args.baseline:
            loaders[f"{args.baseline.name} (its defaults)"] = functools.partial(
                load_baseline(args.baseline), folder, args.micro, 1, window=args.window
            )
        modes = [
            ("sleep", args.step_ms),
            *([("busy", args.step_ms)] if args.busy else []),
            ("none (producer alone)", 0.0),
        ]
        rows = [(name, mode, step) for mode, step in modes for name in loaders]
        runs: dict[tuple, list[dict]] = {row: [] for row in rows}
        for rep in range(args.repeats):  # interleaved, so that a noisy minute does not hit one row only
            for name, mode, step in rows:
                log.info(
                    "%s, consumer %s (%g ms per micro-batch), run %d of %d", name, mode, step, rep + 1, args.repeats
                )
                runs[name, mode, step].append(consume(loaders[name], args.batches, step, mode == "busy"))

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    window_mb = (
        args.window
        // args.micro
        * args.micro
        * (3 * seq + 2 * attrs["attributes"]["max_predictions_per_seq"] + 1)
        * 8
        / 2**20
    )
    print(
        f"\nloader stall: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {platform.node()}, {cpus} cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, h5py {h5py.__version__}"
    )
    print(
        f"{args.micro} x {seq} micro-batches, window {args.window} rows ({window_mb:.0f} MB prepared, int64), {args.batches} micro-batches "
        f"per run, the run with the median stall of {args.repeats}; stall = data_wait; start-up = the first batch's wait\n"
    )
    print(
        "| loader | consumer | ms per micro-batch | micro-batches | wall s | stall s | start-up s | stall after start-up, % of run | micro-batches/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mode, step in rows:
        run = median_run(runs[name, mode, step])
        share = "-" if not step else f"{100 * run['steady']:.2f}%"
        print(
            f"| {name} | {mode} | {step:g} | {args.batches} | {run['wall']:.2f} | {run['stall']:.3f} | {run['startup']:.3f} | {share} | {run['rate']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
