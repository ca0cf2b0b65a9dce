"""The main job on the embedded default: the Wikipedia excerpt shipped in gensim's wheel -> verified shards.

    python -m data_prep.demo --output runs/demo      (what `make demo` runs)

Re-running continues or reuses what an earlier run finished (it passes --resume to `prepare`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cli import main as albert_data
from .cli import setup_logging
from .demo_corpus import wikipedia_excerpt
from .inspection import inspect_shard, verify_folder
from .shards import Manifest

log = logging.getLogger("demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Prepare pretraining shards from the Wikipedia excerpt that ships inside gensim's wheel.",
        epilog="example:\n  python -m data_prep.demo --output runs/demo --workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=Path("runs/demo"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000, help="small corpus, small vocabulary")
    args = parser.parse_args(argv)
    setup_logging(False)

    dump = wikipedia_excerpt()
    data = args.output / "data"
    code = albert_data(
        ["prepare", "--input", str(dump), "--output", str(data), "--vocab-size", str(args.vocab_size),
         "--num-files", "4", "--num-shards", "4", "--dupe-factor", "5", "--workers", str(args.workers), "--resume"]
    )  # fmt: skip
    if code:
        return code
    shards = data / "shards"
    problems = verify_folder(shards)
    for line in problems:
        log.error("%s", line)
    if problems:
        return 1
    first = shards / Manifest.load(shards).shards[0]["name"]
    sys.stdout.write("\n".join(inspect_shard(first, num_examples=1)) + "\n")
    log.info("demo data ready and verified: %s (%d examples)", shards, Manifest.load(shards).data["num_examples"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
