"""Static masking (--dupe-factor masked copies written by `albert-data shard`) against dynamic masking (each pair
written once unmasked, masked by the loader): shard bytes and shard-step time on the same text, and the loader's
masking throughput on one core.

The text is the demo's (data_prep/demo_data.py): the Wikipedia excerpt in 4 corpus files, an 8,000-piece vocabulary,
the first 3 files sharded (`--copies N`: each file's text N times, so that the shard step's work outweighs its
fixed costs: starting the worker, loading the vocabulary, hashing the inputs). Each shard run is in this process with one worker; the fastest of --repeats is reported.
Masking throughput: pipeline.masking.Masker over windows of --window rows (the loader's window), single-threaded.

    python bench/bench_masking.py
    python bench/bench_masking.py --copies 5
    python bench/bench_masking.py --repeats 1 --mask-seconds 1
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from common.logs import setup_logging  # noqa: E402
from data_prep.cli import train_vocab_from  # noqa: E402
from data_prep.corpus import write_corpus  # noqa: E402
from data_prep.examples import ExampleSettings  # noqa: E402
from data_prep.sample_corpora import wikipedia_excerpt  # noqa: E402
from data_prep.sharding import ShardSettings, shard_corpus  # noqa: E402
from data_prep.shards import Manifest, read_shard  # noqa: E402
from pipeline.data import PretrainingData  # noqa: E402

log = logging.getLogger("bench")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker): on a shared machine, the work itself."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def shard(inputs: list[Path], spm: Path, out: Path, masking: str, dupe: int, seq: int, repeats: int) -> dict:
    """The fastest of `repeats` shard runs, and what it wrote."""
    settings = ShardSettings(
        examples=ExampleSettings(max_seq_length=seq, max_predictions_per_seq=round(seq * 0.15 + 0.5)),
        dupe_factor=dupe,
        masking=masking,
        num_shards=2,
    )
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        shard_corpus(inputs, spm, out, settings, workers=1, progress=False, mpi="off")
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, cpu_seconds() - cpu0)
    manifest = Manifest.load(out)
    return {
        "seconds": best,
        "cpu_seconds": best_cpu,
        "examples": manifest.data["num_examples"],
        "bytes": sum(s["bytes"] for s in manifest.shards),
    }


def masking_rate(folder: Path, window: int, seconds: float) -> tuple[float, float]:
    """Sequences masked per second on one thread, of wall time and of the thread's CPU time (a core's rate, whatever
    else the machine runs), over windows of `window` rows (the folder's rows repeated with distinct example ids)."""
    masker = PretrainingData(folder, 8, 1).masker
    assert masker is not None
    records = np.concatenate([read_shard(folder / s["name"]) for s in Manifest.load(folder).shards])
    take = np.arange(window) % len(records)
    rows = {k: records[k][take] for k in records.dtype.names}
    done, epoch = 0, 0
    masker(rows, np.arange(window), 0)  # warm-up
    t0, wall0 = time.thread_time(), time.perf_counter()
    while time.thread_time() - t0 < seconds:
        masker(rows, np.arange(window) + epoch * window, epoch)
        done += window
        epoch += 1
    return done / (time.perf_counter() - wall0), done / (time.thread_time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dupe-factor", type=int, default=5, help="static masking's masked copies")
    parser.add_argument("--repeats", type=int, default=3, help="shard runs per row; the fastest is reported")
    parser.add_argument("--copies", type=int, default=1, help="the demo's text this many times over")
    parser.add_argument("--window", type=int, default=8192, help="rows masked per call (the loader's window)")
    parser.add_argument("--mask-seconds", type=float, default=3.0, help="masking measured for this long per row")
    args = parser.parse_args()
    setup_logging(False)
    logging.getLogger("data_prep").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-masking-") as tmp:
        tmp = Path(tmp)
        write_corpus([wikipedia_excerpt()], tmp / "corpus", num_files=4, progress=False)
        spm = train_vocab_from([tmp / "corpus"], tmp / "vocab" / "spiece", 8000, 1_000_000, 12345, 1, "docs")
        inputs = [tmp / "corpus" / f"corpus-{i:05d}.txt" for i in range(3)]
        if args.copies > 1:
            (tmp / "copies").mkdir()
            for i, path in enumerate(inputs):
                text = path.read_text()
                inputs[i] = tmp / "copies" / path.name
                inputs[i].write_text(text * args.copies)
        text = sum(p.stat().st_size for p in inputs)
        lines = [
            f"text: {text / 1e6:.2f} MB (the demo's training files x {args.copies}); cpu: {os.cpu_count()} cores; "
            f"numpy {np.__version__}",
            "",
            "| seq | masking | dupe | examples | shard MB | bytes per example | bytes per pair | shard step: wall s | "
            "CPU s | "
            "loader masking: seq/s (wall, 1 thread) | seq per CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for seq in (128, 512):
            for masking, dupe in (("static", args.dupe_factor), ("dynamic", 1)):
                out = tmp / f"{masking}-{seq}"
                r = shard(inputs, spm, out, masking, dupe, seq, args.repeats)
                rate = "- | -"
                if masking == "dynamic":
                    wall, cpu = masking_rate(out, args.window, args.mask_seconds)
                    rate = f"{wall:,.0f} | {cpu:,.0f}"
                pairs = r["examples"] / dupe  # each pass pairs the text anew: about examples / dupe pairs of text
                lines.append(
                    f"| {seq} | {masking} | {dupe} | {r['examples']:,} | {r['bytes'] / 1e6:.2f} | "
                    f"{r['bytes'] / r['examples']:.0f} | {r['bytes'] / pairs:.0f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {rate} |"
                )
                log.info("%s", lines[-1])
        sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
