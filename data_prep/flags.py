"""The ranges of albert-data's numeric flags, each written once (argparse types made by common.flags).

Relations between flags (--max-predictions-per-seq at most --max-seq-length - 3) are checked by the settings
classes (ExampleSettings.check, ShardSettings.check) once all flags are known.
"""

from __future__ import annotations

from common.flags import integer, number

from .vocab import CONTROL_SYMBOLS, MAX_VOCAB_SIZE

# Sizes in MB (--part-mb, --piece-mb, --shard-mb), turned into int(MB x 2**20) bytes: at least one byte, and at
# most 1 TiB (far above any part, piece or shard) so that the byte count is finite.
MEGABYTES = number(1e-6, float(1 << 20))
# Processes per machine (or per MPI rank); each running task holds a pipe, and 1024 is a common open-file limit.
WORKERS = integer(1, 1024)
# numpy's and SentencePiece's generators take seeds as unsigned 32-bit integers.
SEED = integer(0, 2**32 - 1)
# --num-files, --num-shards: a count of output files, 0 for the automatic count.
FILE_COUNT = integer(0, 1 << 20, "0: auto")
# --progress-seconds: 0 turns the log lines off; a year at most.
SECONDS = number(0.0, 365 * 24 * 3600.0)
# Probabilities: --masked-lm-prob must mask something and not everything; --short-seq-prob may be 0 or 1.
OPEN_PROBABILITY = number(0.0, 1.0, low_open=True, high_open=True)
PROBABILITY = number(0.0, 1.0)
# Sequence lengths and positions are stored as uint16; [CLS] a [SEP] b [SEP] needs room for two sentences.
SEQ_LENGTH = integer(8, 65535)
PREDICTIONS = integer(1, 65535 - 3, "and at most --max-seq-length - 3")
NGRAM = integer(1, 10)
# Passes over the corpus: BERT and ALBERT use 5 to 10; a bound keeps a typo from planning years of work.
DUPE_FACTOR = integer(1, 1000)
# The special pieces (<pad>, <unk>, [CLS], [SEP], [MASK]) plus at least one of the text's own; ids are uint16.
VOCAB_SIZE = integer(len(CONTROL_SYMBOLS) + 3, MAX_VOCAB_SIZE, "the shards store ids as uint16")
# --input-sentence-size: the vocabulary's sample holds at least one sentence.
SENTENCES = integer(1)
# inspect -n: examples printed (0: statistics only).
EXAMPLES = integer(0)
# --dedup-min-repeats: a line occurring more than this many times is boilerplate.
REPEATS = integer(1)
# --overlap-ngram: tokens per n-gram shared with an evaluation text (13 as in GPT-3's decontamination).
OVERLAP_NGRAM = integer(1, 1000)
