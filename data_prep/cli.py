"""`albert-data`: raw corpora -> sentence-split documents -> SentencePiece vocabulary -> HDF5 shards."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.logs import setup_logging

from . import flags
from .errors import DataPrepError
from .progress import default_seconds as default_progress_seconds

log = logging.getLogger("albert-data")

EXAMPLES = {
    "corpus": "albert-data corpus --input enwiki-latest-pages-articles.xml.bz2 --output corpus/ --num-files 64 --workers 8",
    "vocab": "albert-data vocab --input corpus/ --output-prefix vocab/spiece --vocab-size 30000",
    "shard": "albert-data shard --input corpus/ --spm-model vocab/spiece.model --output shards/ --shard-mb 256 --workers 8",
    "inspect": "albert-data inspect shards/shard-00000.h5 -n 3",
    "verify": "albert-data verify shards/",
    "prepare": "albert-data prepare --input enwiki-latest-pages-articles.xml.bz2 --output data/ --workers 8",
}


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=36)


def _add_corpus_args(parser: argparse.ArgumentParser, inputs_required: bool = True) -> None:
    from .dedup import DEDUP_MODES, DEFAULT_MIN_REPEATS, DEFAULT_OVERLAP_NGRAM
    from .mixture import DEFAULT_WEIGHT_SEED, MAX_WEIGHT, weight_argument
    from .readers import FORMATS

    parser.add_argument(
        "--input",
        nargs="+",
        required=inputs_required,
        metavar="[NAME=]PATH",
        help="input files or folders (recursed); NAME=PATH puts PATH in the source NAME (for --weights and the "
        "per-source counts), a plain PATH is a source of its own named as written",
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="input format; auto: .xml wiki, .jsonl/.json jsonl, .parquet parquet, else docs (all but parquet may "
        "be .gz, .bz2, .xz)",
    )
    parser.add_argument(
        "--text-field", default="text", metavar="NAME", help="JSON lines and Parquet: the field holding the text"
    )
    parser.add_argument(
        "--title-field",
        default=None,
        metavar="NAME",
        help="JSON lines and Parquet: a field holding the document's title or id, which names it in warnings",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=weight_argument,
        default=None,
        metavar="NAME=WEIGHT",
        help=f"how many times each source's documents go into the corpus (default 1; up to {MAX_WEIGHT:g}): whole "
        "copies, then a seeded draw for the fraction (0.5: half of its documents)",
    )
    parser.add_argument(
        "--weight-seed",
        type=flags.SEED,
        default=DEFAULT_WEIGHT_SEED,
        help="seed of the documents drawn for fractional weights",
    )
    parser.add_argument(
        "--num-files",
        type=flags.FILE_COUNT,
        default=0,
        help="number of balanced corpus files; 0: auto, one per 128 MB of text, at least 4 (never depends on workers or ranks)",
    )
    parser.add_argument(
        "--part-mb",
        type=flags.MEGABYTES,
        default=16.0,
        help="inputs are read in parts of about this size, one task each and the unit of --resume: a docs file "
        "in byte ranges, a multistream wiki dump (with its -index.txt.bz2 beside it) at stream offsets, a Parquet "
        "file in runs of row groups; the output does not depend on it",
    )
    parser.add_argument(
        "--allow-bad-bytes",
        action="store_true",
        help="read files with NUL bytes or more than 1%% undecodable bytes (refused by default: not UTF-8 text), "
        "replacing undecodable bytes by U+FFFD and counting them",
    )
    # dedup and decontamination (data_prep/dedup.py)
    parser.add_argument(
        "--dedup",
        default="off",
        choices=DEDUP_MODES,
        help="remove exact duplicate documents (NFC, whitespace collapsed, case kept) across all sources, keeping "
        "the first by source, file and document order; paragraphs: also lines repeated more than "
        "--dedup-min-repeats times (boilerplate). Before the weights apply",
    )
    parser.add_argument(
        "--dedup-min-repeats",
        type=flags.REPEATS,
        default=DEFAULT_MIN_REPEATS,
        metavar="N",
        help="--dedup paragraphs: a line occurring more than N times in the kept documents is removed everywhere",
    )
    parser.add_argument(
        "--exclude-overlap",
        nargs="+",
        type=Path,
        default=(),
        metavar="FILE",
        help="drop documents sharing an n-gram of --overlap-ngram tokens with these evaluation texts (plain text)",
    )
    parser.add_argument(
        "--overlap-ngram",
        type=flags.OVERLAP_NGRAM,
        default=DEFAULT_OVERLAP_NGRAM,
        metavar="N",
        help="tokens (whitespace-separated, case-folded, punctuation at the ends stripped) per shared n-gram",
    )


def _add_vocab_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vocab-size", type=flags.VOCAB_SIZE, default=30000, help="SentencePiece pieces (ALBERT: 30000)"
    )
    parser.add_argument(
        "--input-sentence-size",
        type=flags.SENTENCES,
        default=10_000_000,
        help="sentences sampled for training (large corpora)",
    )


def _add_shard_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("examples")
    group.add_argument("--max-seq-length", type=flags.SEQ_LENGTH, default=128)
    group.add_argument("--max-predictions-per-seq", type=flags.PREDICTIONS, default=20)
    group.add_argument("--masked-lm-prob", type=flags.OPEN_PROBABILITY, default=0.15)
    group.add_argument("--ngram", type=flags.NGRAM, default=3, help="longest n-gram of whole words to mask; P(n) ~ 1/n")
    group.add_argument(
        "--masking",
        default="static",
        choices=("static", "dynamic"),
        help="static: masked here, --dupe-factor masks of each pair; dynamic: each pair written once unmasked (with "
        "its word starts), masked afresh each epoch by albert-pretrain's loader (the flags above are its defaults)",
    )
    group.add_argument(
        "--dupe-factor",
        type=flags.DUPE_FACTOR,
        default=None,
        help="passes over the corpus with different masks and pairs (default: 5 with --masking static, 1 dynamic)",
    )
    group.add_argument("--short-seq-prob", type=flags.PROBABILITY, default=0.1)
    group.add_argument("--seed", type=flags.SEED, default=12345)
    group.add_argument(
        "--num-shards",
        type=flags.FILE_COUNT,
        default=0,
        help="output HDF5 files; 0: auto, from --shard-mb (an explicit count overrides it)",
    )
    group.add_argument(
        "--shard-mb",
        type=flags.MEGABYTES,
        default=256.0,
        help="auto shard count: MB of example records per shard (uncompressed; each shard is shuffled in the memory "
        "of one process: its peak is about this plus 100 MB); 1 MB of text x dupe factor makes about 1 MB of records",
    )
    group.add_argument(
        "--piece-mb",
        type=flags.MEGABYTES,
        default=8.0,
        help="input files are cut at document boundaries into pieces of about this size, one task each, "
        "so that a single big file keeps every worker busy (part of the settings: it changes the examples)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --output, keeping finished work (a finished one is only checked)",
    )
    group.add_argument(
        "--mpi",
        default="auto",
        choices=("auto", "on", "off"),
        help="split the work over MPI ranks (auto: when an MPI launcher started us: mpirun, srun --mpi=pmix; on: require it, also checking srun's task count)",
    )


def _add_common(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    if workers:
        parser.add_argument("--workers", type=flags.WORKERS, default=1, help="processes on this machine (per MPI rank)")
        parser.add_argument(
            "--progress-seconds",
            type=flags.SECONDS,
            default=default_progress_seconds(),
            help="without a terminal (a batch job's log), each rank logs its progress every this many seconds; "
            "0: never (the environment variable ALBERT_PROGRESS_SECONDS sets the default)",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albert-data",
        description="Offline data preparation for ALBERT pretraining: raw text -> documents -> SentencePiece -> "
        "SOP + n-gram masked HDF5 shards. Deterministic from --seed, whatever the number of workers or MPI ranks.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        # allow_abbrev=False: slurm/prep.sbatch reads --output from the arguments; an abbreviation would slip past it
        return commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=_formatter,
            allow_abbrev=False,
        )

    command = add(
        "corpus",
        "read raw inputs, write documents in the standard format (one sentence per line, blank line between documents)",
    )
    _add_corpus_args(command)
    command.add_argument("--output", required=True, type=Path, help="folder for corpus-NNNNN.txt")
    command.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --output, keeping the input parts and files already finished",
    )
    command.add_argument(
        "--mpi",
        default="auto",
        choices=("auto", "on", "off"),
        help="split the input parts over MPI ranks (auto: when an MPI launcher started us: mpirun, srun --mpi=pmix)",
    )
    _add_common(command)

    command = add(
        "vocab", "train a SentencePiece unigram vocabulary with ALBERT's settings; writes PREFIX.model and PREFIX.vocab"
    )
    command.add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="documents in the standard format (files or folders)"
    )
    command.add_argument("--output-prefix", required=True, type=Path)
    command.add_argument("--format", default="auto", help="input format (see `corpus`)")
    command.add_argument("--seed", type=flags.SEED, default=12345)
    _add_vocab_args(command)
    _add_common(command)

    command = add(
        "shard", "make SOP pairs with n-gram whole-word masking; write shuffled HDF5 shards and manifest.json"
    )
    command.add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="documents in the standard format (files or folders)"
    )
    command.add_argument("--spm-model", required=True, type=Path, help="SentencePiece model from `albert-data vocab`")
    command.add_argument(
        "--output", required=True, type=Path, help="folder for shard-NNNNN.h5, manifest.json and spiece.model"
    )
    _add_shard_args(command)
    _add_common(command)

    command = add("inspect", "print examples decoded back to text (masks and labels shown) and statistics of a shard")
    command.add_argument("shard", type=Path)
    command.add_argument("-n", "--num-examples", type=flags.EXAMPLES, default=3)
    command.add_argument("--spm-model", type=Path, default=None, help="default: spiece.model beside the shard")
    _add_common(command, workers=False)

    command = add("verify", "check every shard against manifest.json; exit 1 with one line per problem")
    command.add_argument("folder", type=Path)
    _add_common(command, workers=False)

    command = add(
        "prepare", "corpus, vocab and shard in one go: OUTPUT/corpus, OUTPUT/vocab/spiece.model, OUTPUT/shards"
    )
    _add_corpus_args(command)
    command.add_argument("--output", required=True, type=Path)
    command.add_argument("--spm-model", type=Path, default=None, help="use this vocabulary instead of training one")
    _add_vocab_args(command)
    _add_shard_args(command)
    _add_common(command)
    return parser


def _corpus_files(args: argparse.Namespace) -> int:
    """0: auto, from the size of the text (write_corpus), the same whatever the workers and ranks."""
    return args.num_files


def _sources(args: argparse.Namespace):
    """The sources of --input with the weights of --weights (data_prep.mixture)."""
    from .mixture import parse_sources

    return parse_sources(args.input, args.weights)


def _fields(args: argparse.Namespace):
    from .parquet import Fields

    return Fields(args.text_field, args.title_field)


def _dedup(args: argparse.Namespace):
    from .dedup import DedupSettings

    return DedupSettings(args.dedup, args.dedup_min_repeats, tuple(args.exclude_overlap), args.overlap_ngram)


def _part_bytes(args: argparse.Namespace) -> int:
    if args.part_mb <= 0:
        raise DataPrepError(f"--part-mb {args.part_mb:g}: must be positive")
    return max(1, int(args.part_mb * (1 << 20)))


def _shard_settings(args: argparse.Namespace):
    from .examples import ExampleSettings
    from .sharding import ShardSettings

    return ShardSettings(
        examples=ExampleSettings(
            max_seq_length=args.max_seq_length,
            max_predictions_per_seq=args.max_predictions_per_seq,
            masked_lm_prob=args.masked_lm_prob,
            ngram=args.ngram,
            short_seq_prob=args.short_seq_prob,
        ),
        dupe_factor=args.dupe_factor if args.dupe_factor is not None else (1 if args.masking == "dynamic" else 5),
        masking=args.masking,
        seed=args.seed,
        num_shards=args.num_shards,
        shard_bytes=int(args.shard_mb * (1 << 20)),
        piece_bytes=int(args.piece_mb * (1 << 20)),
    )


def _sentences(paths: list[Path], fmt: str, bar: bool, every: float | None):
    """The sentences of the inputs, with progress counted in characters against the inputs' bytes (exact for
    ASCII text in the standard format)."""
    from . import readers
    from .progress import progress

    total = sum(path.stat().st_size for path in paths)
    with progress("vocab sample", total, "B", bar, every) as shown:
        for path in paths:
            chars = 0
            for doc in readers.iter_documents(path, fmt):
                for sentence in doc:
                    chars += len(sentence) + 1
                    yield sentence
                chars += 1
                if chars >= 1 << 22:
                    shown.update(chars)
                    chars = 0
            shown.update(chars)


def train_vocab_from(
    inputs: list,
    prefix: Path,
    vocab_size: int,
    sentence_size: int,
    seed: int,
    workers: int,
    fmt: str = "auto",
    bar: bool = False,
    progress_every: float | None = None,
) -> Path:
    from . import readers
    from .vocab import VocabSettings, train_vocab

    files = readers.expand_inputs(inputs)
    settings = VocabSettings(
        vocab_size=vocab_size, input_sentence_size=sentence_size, seed=seed, threads=max(1, workers)
    )
    return train_vocab(_sentences(files, fmt, bar, progress_every), prefix, settings)


def run(args: argparse.Namespace) -> int:
    output = {"corpus": "output", "shard": "output", "prepare": "output", "vocab": "output_prefix"}.get(args.command)
    if output is None:  # inspect and verify only read
        return _run(args)
    from .mpi import get_world
    from .stage import one_writer

    with one_writer(getattr(args, output), get_world(getattr(args, "mpi", "auto"))):
        return _run(args)


def write_corpus_from(args: argparse.Namespace, output: Path, progress: bool, resume: bool) -> None:
    """The corpus step with the corpus flags of `corpus` and `prepare`."""
    from .corpus import write_corpus

    write_corpus(
        _sources(args),
        output,
        _corpus_files(args),
        args.format,
        args.workers,
        progress=progress,
        resume=resume,
        mpi=args.mpi,
        allow_bad_bytes=args.allow_bad_bytes,
        part_bytes=_part_bytes(args),
        progress_every=args.progress_seconds,
        fields=_fields(args),
        weight_seed=args.weight_seed,
        dedup=_dedup(args),
    )


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress and sys.stderr.isatty()
    if args.command == "corpus":
        write_corpus_from(args, args.output, progress, resume=args.resume)
    elif args.command == "vocab":
        train_vocab_from(
            args.input,
            args.output_prefix,
            args.vocab_size,
            args.input_sentence_size,
            args.seed,
            args.workers,
            args.format,
            progress,
            args.progress_seconds,
        )
    elif args.command == "shard":
        from .sharding import shard_corpus

        shard_corpus(
            args.input,
            args.spm_model,
            args.output,
            _shard_settings(args),
            args.workers,
            args.resume,
            progress,
            args.mpi,
            args.progress_seconds,
        )
    elif args.command == "inspect":
        from .inspection import inspect_shard
        from .vocab import Vocab

        vocab = Vocab(args.spm_model) if args.spm_model else None
        sys.stdout.write("\n".join(inspect_shard(args.shard, vocab, args.num_examples)) + "\n")
    elif args.command == "verify":
        from .inspection import verify_folder

        problems = verify_folder(args.folder, progress)
        for line in problems:
            sys.stdout.write(line + "\n")
        if problems:
            return 1
        log.info("%s: all shards verified", args.folder)
    elif args.command == "prepare":
        prepare(args, progress)
    return 0


def prepare(args: argparse.Namespace, progress: bool) -> None:
    """corpus -> vocab -> shard under one folder; with --resume, finished stages (and input parts) are kept.

    Under MPI, all ranks write the corpus, rank 0 trains the vocabulary, then all ranks make the shards."""
    from .mpi import get_world
    from .sharding import shard_corpus
    from .stage import existing_output

    out: Path = args.output
    corpus_dir, vocab_prefix, shards_dir = out / "corpus", out / "vocab" / "spiece", out / "shards"
    world = get_world(args.mpi)
    _shard_settings(args).check()  # the example settings' relations, before hours of corpus and vocabulary
    world.run_on_rank0(lambda: existing_output(out, args.resume))
    # every rank takes its share; an interrupted corpus continues where it stopped, a finished one is checked against
    # the inputs (their paths, sizes and, where their times moved, bytes)
    write_corpus_from(args, corpus_dir, progress, resume=True)

    def vocabulary() -> Path:
        if args.spm_model is not None:
            return args.spm_model
        spm_model = vocab_prefix.with_name("spiece.model")
        if not spm_model.exists():
            train_vocab_from(
                [corpus_dir],
                vocab_prefix,
                args.vocab_size,
                args.input_sentence_size,
                args.seed,
                args.workers,
                "docs",
                progress,
                args.progress_seconds,
            )
        return spm_model

    spm_model = world.run_on_rank0(vocabulary)  # trained once, by rank 0
    # (shards already complete: shard_corpus checks them and returns)
    shard_corpus(
        [corpus_dir],
        spm_model,
        shards_dir,
        _shard_settings(args),
        args.workers,
        shards_dir.exists(),
        progress,
        args.mpi,
        args.progress_seconds,
    )
    if world.rank == 0:
        log.info("prepared %s: corpus %s, vocabulary %s, shards %s", out, corpus_dir, spm_model, shards_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return run(args)
    except DataPrepError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
