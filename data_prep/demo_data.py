"""The demo's data: the Wikipedia excerpt shipped in gensim's wheel (data_prep/sample_corpora.py) -> verified train
and eval shards.

    python -m data_prep.demo_data --output runs/demo/data

Step by step, as a user would: `corpus` (4 files), `vocab`, `shard` of files 0-2 for training and of file 3
for evaluation, `verify`, `inspect`. Re-running reuses what an earlier run finished.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from common.logs import setup_logging

from .cli import main as albert_data
from .errors import DataPrepError
from .inspection import inspect_shard, verify_folder
from .sample_corpora import wikipedia_excerpt
from .shards import Manifest

log = logging.getLogger("demo")


@dataclass(frozen=True)
class DemoData:
    train: Path
    eval: Path
    spm_model: Path


def _run(args: list[str]) -> None:
    if albert_data(args) != 0:
        raise DataPrepError(f"albert-data {args[0]} failed")


def prepare_demo_data(output: Path, workers: int = 2, vocab_size: int = 8000, dupe_factor: int = 5) -> DemoData:
    corpus, vocab, train, eval_ = output / "corpus", output / "vocab" / "spiece", output / "train", output / "eval"
    spm = vocab.with_name("spiece.model")
    if not (corpus / "corpus-00003.txt").exists():
        _run(
            [
                "corpus",
                "--input",
                str(wikipedia_excerpt()),
                "--output",
                str(corpus),
                "--num-files",
                "4",
                "--workers",
                str(workers),
            ]
        )
    if not spm.exists():
        _run(["vocab", "--input", str(corpus), "--output-prefix", str(vocab), "--vocab-size", str(vocab_size)])
    files = [str(corpus / f"corpus-{i:05d}.txt") for i in range(4)]
    for folder, inputs, dupe, shards in ((train, files[:3], dupe_factor, 4), (eval_, files[3:], 1, 1)):
        if not (folder / "manifest.json").exists():
            _run(
                [
                    "shard",
                    "--input",
                    *inputs,
                    "--spm-model",
                    str(spm),
                    "--output",
                    str(folder),
                    "--dupe-factor",
                    str(dupe),
                    "--num-shards",
                    str(shards),
                    "--workers",
                    str(workers),
                    "--resume",
                ]
            )
        problems = verify_folder(folder)
        if problems:
            raise DataPrepError("; ".join(problems))
    return DemoData(train, eval_, spm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Prepare train and eval shards from the Wikipedia excerpt that ships inside gensim's wheel.",
        epilog="example:\n  python -m data_prep.demo_data --output runs/demo/data --workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=Path("runs/demo/data"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000, help="small corpus, small vocabulary")
    args = parser.parse_args(argv)
    setup_logging(False)
    try:
        data = prepare_demo_data(args.output, args.workers, args.vocab_size)
    except DataPrepError as e:
        log.error("%s", e)
        return 2
    first = data.train / Manifest.load(data.train).shards[0]["name"]
    sys.stdout.write("\n".join(inspect_shard(first, num_examples=1)) + "\n")
    log.info(
        "demo data ready and verified: %s (%d examples), %s (%d examples)",
        data.train,
        Manifest.load(data.train).data["num_examples"],
        data.eval,
        Manifest.load(data.eval).data["num_examples"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
