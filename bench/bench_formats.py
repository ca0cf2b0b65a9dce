"""`albert-data corpus` on the same text as JSON lines and as Parquet: MB/s of text, per worker.

The Wikipedia excerpt's documents (cleaned by `corpus` once, sentences joined back into prose) are repeated to
`--mb` MB of text and written as one JSON lines file and one Parquet file (pyarrow, snappy, row groups of
`--row-group-rows` rows); `albert-data corpus` then runs as a subprocess on each, with 1 and 2 workers, the
process start included. A JSON lines file is read by the main process and cleaned by the workers in chunks of
`--part-mb`; a Parquet file is read and cleaned by the workers in parts of row groups of about `--part-mb`. The
corpora of the two formats are checked to be the same bytes. A second table times the reading alone (the raw
documents of each file, before cleaning and sentence splitting, in this process), the part that depends on the
format.

    python bench/bench_formats.py                     # 20 MB, 1 and 2 workers, fastest of 2 runs
    python bench/bench_formats.py --mb 5 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from common.logs import setup_logging  # noqa: E402
from data_prep.corpus import write_corpus  # noqa: E402
from data_prep.readers import iter_documents, iter_raw_documents  # noqa: E402
from data_prep.sample_corpora import wikipedia_excerpt  # noqa: E402

log = logging.getLogger("bench")


def excerpt_texts(folder: Path) -> list[str]:
    """The excerpt's documents as prose: sentences joined by spaces, paragraphs of 5 sentences."""
    write_corpus([wikipedia_excerpt()], folder, num_files=1, progress=False)
    texts = []
    for doc in iter_documents(folder / "corpus-00000.txt", "docs"):
        texts.append("\n\n".join(" ".join(doc[k : k + 5]) for k in range(0, len(doc), 5)))
    return texts


def write_inputs(texts: list[str], mb: float, folder: Path, row_group_rows: int) -> tuple[Path, Path, int]:
    """The texts repeated to `mb` MB, as a JSON lines and a Parquet file; the bytes of text."""
    rows, size = [], 0
    while size < mb * 1e6:
        text = texts[len(rows) % len(texts)]
        rows.append(text)
        size += len(text.encode())
    jsonl = folder / "in.jsonl"
    with open(jsonl, "w", encoding="utf-8") as out:
        for i, text in enumerate(rows):
            out.write(json.dumps({"id": i, "text": text}) + "\n")
    parquet = folder / "in.parquet"
    table = pa.table({"id": pa.array(range(len(rows)), pa.int64()), "text": pa.array(rows, pa.string())})
    pq.write_table(table, parquet, row_group_size=row_group_rows, compression="snappy")
    return jsonl, parquet, size


def run_corpus(path: Path, out: Path, workers: int, part_mb: float) -> float:
    cmd = [sys.executable, "-m", "data_prep", "corpus", "--input", str(path), "--output", str(out)]
    cmd += ["--num-files", "4", "--workers", str(workers), "--part-mb", str(part_mb), "--mpi", "off", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"corpus failed:\n{proc.stderr}")
    return seconds


def read_seconds(path: Path) -> float:
    """Seconds to read the raw documents of a file (no cleaning, no sentence splitting)."""
    start = time.perf_counter()
    for _ in iter_raw_documents(path):
        pass
    return time.perf_counter() - start


def corpus_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("corpus-*.txt")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="MB of text")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--part-mb", type=float, default=4.0)
    parser.add_argument("--row-group-rows", type=int, default=100, help="rows per Parquet row group")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each row, interleaved; the fastest")
    args = parser.parse_args()
    setup_logging(False)
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        tmp = Path(tmp)
        texts = excerpt_texts(tmp / "excerpt")
        jsonl, parquet, text_bytes = write_inputs(texts, args.mb, tmp, args.row_group_rows)
        groups = pq.ParquetFile(parquet).metadata.num_row_groups
        inputs = {"JSON lines": jsonl, "Parquet": parquet}
        times: dict[tuple[str, int], list[float]] = {(fmt, w): [] for fmt in inputs for w in args.workers}
        reading: dict[str, list[float]] = {fmt: [] for fmt in inputs}
        for rep in range(args.repeats):
            for fmt, path in inputs.items():
                reading[fmt].append(read_seconds(path))
            for fmt, w in times:
                log.info("%s, %d worker(s), run %d of %d", fmt, w, rep + 1, args.repeats)
                out = tmp / f"out-{fmt.split()[0]}-{w}"
                times[fmt, w].append(run_corpus(inputs[fmt], out, w, args.part_mb))
                if rep + 1 < args.repeats or w != args.workers[-1]:
                    shutil.rmtree(out)
        last = args.workers[-1]
        same = corpus_bytes(tmp / f"out-JSON-{last}") == corpus_bytes(tmp / f"out-Parquet-{last}")
        sizes = {fmt: path.stat().st_size / 1e6 for fmt, path in inputs.items()}
    print(
        f"\nalbert-data corpus: {text_bytes / 1e6:.1f} MB of text (the excerpt's {len(texts)} documents repeated); "
        f"JSON lines {sizes['JSON lines']:.1f} MB; Parquet {sizes['Parquet']:.1f} MB (snappy, {groups} row groups of "
        f"{args.row_group_rows} rows); --part-mb {args.part_mb:g}; process start included; fastest of "
        f"{args.repeats} runs; the two corpora are the same bytes: {same}\n"
    )
    print("| input | workers | seconds (all runs) | MB/s of text | MB/s per worker |")
    print("|---|---|---|---|---|")
    for (fmt, w), runs in times.items():
        best = min(runs)
        rate = text_bytes / 1e6 / best
        print(f"| {fmt} | {w} | {best:.1f} ({', '.join(f'{s:.1f}' for s in runs)}) | {rate:.2f} | {rate / w:.2f} |")
    print("\nreading alone (raw documents, one process, no cleaning or sentence splitting):\n")
    print("| input | seconds (all runs) | MB/s of text |")
    print("|---|---|---|")
    for fmt, runs in reading.items():
        best = min(runs)
        print(f"| {fmt} | {best:.2f} ({', '.join(f'{s:.2f}' for s in runs)}) | {text_bytes / 1e6 / best:.0f} |")


if __name__ == "__main__":
    main()
