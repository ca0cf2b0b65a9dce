"""Peak memory and time of `albert-data vocab` for a few `--input-sentence-size` values.

Builds one standard-format corpus of `--corpus-sentences` distinct sentences from the Wikipedia excerpt (its
sentences repeated, the words of each repeat shuffled by a seeded generator, so that the sentences are
distinct and the character and word statistics stay those of real text), then runs `albert-data vocab` on it
as a subprocess once per sample size and prints its peak resident memory (ru_maxrss of the child) and wall time.

    python bench/bench_vocab.py                                # 2M-sentence corpus; samples of 100k, 300k, 1M
    python bench/bench_vocab.py --samples 10000 100000 --corpus-sentences 500000 --vocab-size 8000
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.corpus import write_corpus  # noqa: E402
from data_prep.readers import iter_documents  # noqa: E402
from data_prep.sample_corpora import wikipedia_excerpt  # noqa: E402


def build_corpus(folder: Path, sentences: int) -> int:
    """`sentences` distinct sentences in documents of the excerpt's shape; returns the bytes written."""
    base = folder / "excerpt"
    write_corpus([wikipedia_excerpt()], base, num_files=1, progress=False)
    docs = list(iter_documents(base / "corpus-00000.txt", "docs"))
    rng = random.Random(0)
    written = n = 0
    with open(folder / "corpus.txt", "w", encoding="utf-8") as out:
        while n < sentences:
            for doc in docs:
                lines = []
                for s in doc:
                    words = s.split()
                    rng.shuffle(words)
                    lines.append(" ".join(words))
                lines = lines[: sentences - n]
                text = "\n".join(lines) + "\n\n"
                out.write(text)
                written += len(text.encode())
                n += len(lines)
                if n >= sentences:
                    break
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--corpus-sentences", type=int, default=2_000_000)
    parser.add_argument("--vocab-size", type=int, default=30_000)
    parser.add_argument("--workers", type=int, default=2, help="SentencePiece threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = build_corpus(folder, args.corpus_sentences)
        print(f"corpus: {args.corpus_sentences} sentences, {size / 1e6:.0f} MB; vocabulary {args.vocab_size}")
        print(f"{'sample':>10} {'peak RSS MB':>12} {'seconds':>8}")
        for sample in args.samples:
            cmd = [sys.executable, "-m", "data_prep", "vocab", "--input", str(folder / "corpus.txt")]
            cmd += ["--output-prefix", str(folder / f"v{sample}"), "--vocab-size", str(args.vocab_size)]
            cmd += ["--input-sentence-size", str(sample), "--workers", str(args.workers)]
            # a fresh child per size: ru_maxrss of the children is the largest of them, so run each alone
            start = time.perf_counter()
            code = (
                "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=REPO, env=os.environ
            )
            seconds = time.perf_counter() - start
            kib, rc = proc.stdout.split()[-2:]
            if rc != "0":
                sys.exit(f"vocab failed for --input-sentence-size {sample}:\n{proc.stderr}")
            print(f"{sample:>10} {int(kib) / 1024:>12.0f} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
