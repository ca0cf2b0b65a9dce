"""The SentencePiece vocabulary: training it with ALBERT's settings, and loading it for sharding.

Text is normalised the way Hugging Face's AlbertTokenizer (and ALBERT's released 30k-clean model)
does before SentencePiece sees it: whitespace collapsed, ``/'' turned into ", accents stripped
(NFKD, combining marks removed) and lowercased. The same normalisation is applied when training and
when encoding, so an exported `spiece.model` gives the same ids in AlbertTokenizer as in our shards.

Training reads the corpus once, streaming, and keeps a uniform sample of at most `input_sentence_size`
sentences (reservoir sampling, deterministic from the seed), so the memory is bounded by the sample, not by
the corpus; only the sample is normalised and handed to SentencePiece.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.inventory import file_sha256

from .errors import DataPrepError

log = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = "<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"
CONTROL_SYMBOLS = (CLS, SEP, MASK)
# input_ids are stored as uint16 in the shards.
MAX_VOCAB_SIZE = 2**16
# Sentences normalised and encoded per call: one character beyond U+FFFF makes the joined text 4 bytes per character.
ENCODE_CHUNK = 1024


class _DropCombining(dict):
    """str.translate table deleting combining marks, filled in as characters are met (a lookup that
    hits is faster than translate's miss path, and no table over all of Unicode is built up front)."""

    def __missing__(self, cp: int) -> int | None:
        keep = None if unicodedata.combining(chr(cp)) else cp
        self[cp] = keep
        return keep


_DROP_COMBINING = _DropCombining()


def _strip_accents(text: str) -> str:
    return unicodedata.normalize("NFKD", text).translate(_DROP_COMBINING)


def normalize(text: str) -> str:
    """AlbertTokenizer's preprocessing (do_lower_case=True, keep_accents=False, remove_space=True)."""
    text = " ".join(text.split()).replace("``", '"').replace("''", '"')
    if not text.isascii():  # NFKD is the identity on ASCII: skip the work
        text = _strip_accents(text)
    return text.lower()


def normalize_many(sentences: list[str]) -> list[str]:
    """normalize() for many sentences: the same result (up to whitespace, which SentencePiece collapses
    itself), with per-sentence Python work only for the few sentences that are not ASCII."""
    # lower() per sentence: on ASCII text it is a fast copy, and most sentences are ASCII (one wide
    # character would make a joined text slow to lower as a whole)
    out = [(s if s.isascii() else _strip_accents(s)).lower() for s in sentences]
    blob = "\n".join(out)
    if "``" in blob or "''" in blob:
        out = blob.replace("``", '"').replace("''", '"').split("\n")
        if len(out) != len(sentences):  # a sentence held a newline
            out = [normalize(s) for s in sentences]
    return out


@dataclass
class VocabSettings:
    vocab_size: int = 30000
    input_sentence_size: int = 10_000_000  # sample at most this many sentences (large corpora)
    character_coverage: float = 0.99995
    max_sentence_length: int = 4192  # bytes; longer sentences are skipped by SentencePiece
    seed: int = 12345
    threads: int = 1


def sample_sentences(sentences: Iterable[str], size: int, seed: int) -> tuple[list[str], int]:
    """(at most `size` sentences drawn uniformly from `sentences` in one pass, in their original order; how many
    there were). Reservoir sampling with geometric skips (Li's "Algorithm L"): memory is `size` sentences, and
    the random draws (one generator seeded by `seed`) are O(size x log(n / size)), not one per sentence."""
    if size < 1:
        raise DataPrepError(f"--input-sentence-size {size}: must be at least 1")
    rng = np.random.default_rng([seed, 0x5A3])

    def draw() -> float:  # in (0, 1]: its log is finite
        return 1.0 - rng.random()

    it = iter(sentences)
    sample: list[str] = []
    for s in it:
        sample.append(s)
        if len(sample) == size:
            break
    positions = list(range(len(sample)))
    n = len(sample)
    if n < size:
        return sample, n
    w = math.exp(math.log(draw()) / size)
    chosen = n + math.floor(math.log(draw()) / math.log1p(-w)) if w < 1 else n  # index of the next one kept
    for i, s in enumerate(it, start=n):
        n = i + 1
        if i < chosen:
            continue
        j = int(rng.integers(size))
        sample[j], positions[j] = s, i
        w *= math.exp(math.log(draw()) / size)
        chosen = i + 1 + (math.floor(math.log(draw()) / math.log1p(-w)) if w < 1 else 0)
    order = sorted(range(size), key=positions.__getitem__)
    return [sample[k] for k in order], n


def _normalized(sample: list[str]) -> Iterator[str]:
    """The sample normalised, each original released once SentencePiece has taken its copy."""
    for i in range(0, len(sample), ENCODE_CHUNK):
        chunk = sample[i : i + ENCODE_CHUNK]
        sample[i : i + len(chunk)] = [""] * len(chunk)
        yield from (normalize(s) for s in chunk)


def train_vocab(sentences: Iterable[str], output_prefix: Path, settings: VocabSettings) -> Path:
    """Train a unigram model on already sentence-split text; writes PREFIX.model and PREFIX.vocab. At most
    `settings.input_sentence_size` sentences, sampled uniformly (see sample_sentences), are used."""
    import sentencepiece as spm

    if settings.vocab_size > MAX_VOCAB_SIZE:
        raise DataPrepError(
            f"--vocab-size {settings.vocab_size}: the shards store ids as uint16, at most {MAX_VOCAB_SIZE}"
        )
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(settings.seed)
    sample, total = sample_sentences(sentences, settings.input_sentence_size, settings.seed)
    if total == 0:
        raise DataPrepError("no sentences to train the vocabulary on")
    log.info(
        "vocabulary: training on %d of %d sentences (--input-sentence-size %d)",
        len(sample),
        total,
        settings.input_sentence_size,
    )
    counted = _Counted(_normalized(sample))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted,
            model_prefix=str(output_prefix),
            vocab_size=settings.vocab_size,
            model_type="unigram",
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_piece=PAD,
            unk_piece=UNK,
            control_symbols=list(CONTROL_SYMBOLS),
            input_sentence_size=0,  # the sample is already drawn: SentencePiece takes it whole, in order
            shuffle_input_sentence=False,
            character_coverage=settings.character_coverage,
            max_sentence_length=settings.max_sentence_length,
            num_threads=settings.threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (30000). Please set it to a value <= 6127."
        raise DataPrepError(f"SentencePiece training failed: {str(e).splitlines()[-1]}") from None
    if counted.n == 0:
        raise DataPrepError("no sentences to train the vocabulary on")
    model = output_prefix.with_name(output_prefix.name + ".model")
    log.info("vocabulary: %d pieces from %d of %d sentences -> %s", settings.vocab_size, counted.n, total, model)
    return model


class _Counted:
    def __init__(self, it: Iterator[str]):
        self.it, self.n = it, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        s = next(self.it)
        self.n += 1
        return s


class Vocab:
    """A loaded SentencePiece model with what sharding needs precomputed as numpy tables."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise DataPrepError(f"{self.path}: no such SentencePiece model")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise DataPrepError(f"{self.path}: not a SentencePiece model ({str(e).splitlines()[-1]})") from None
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise DataPrepError(
                f"{self.path}: vocabulary of {self.vocab_size} pieces does not fit the shards' uint16 ids "
                f"(at most {MAX_VOCAB_SIZE})"
            )
        ids = {}
        for piece in CONTROL_SYMBOLS:
            i = sp.piece_to_id(piece)
            if i == sp.unk_id() or not sp.is_control(i):
                raise DataPrepError(
                    f"{self.path}: the vocabulary has no control symbol {piece} (train it with `albert-data vocab`)"
                )
            ids[piece] = i
        self.cls_id, self.sep_id, self.mask_id = ids[CLS], ids[SEP], ids[MASK]
        if sp.pad_id() != 0:
            raise DataPrepError(f"{self.path}: padding must be id 0 (pad_id={sp.pad_id()}); shards are padded with 0")
        self.pad_id = 0
        pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        special = np.array([sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) for i in range(self.vocab_size)])
        # Whole-word masking: a piece that starts with "▁" begins a word; others continue the previous one.
        self.is_word_start = np.array([p.startswith("\u2581") for p in pieces]) & ~special
        # Random replacements (the 10% of 80/10/10) are drawn from real pieces only.
        self.normal_ids = np.flatnonzero(~special).astype(np.int32)
        self.pieces = pieces
        self.sha256 = file_sha256(self.path)

    def encode(self, sentences: list[str], max_chars: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalise and encode; returns (flat int32 ids, per-sentence lengths).

        Sentences are cut at `max_chars` first: a sentence longer than that cannot fit one example anyway.
        """
        if not sentences:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        encoded: list[np.ndarray] = []
        for i in range(0, len(sentences), ENCODE_CHUNK):  # bounds normalize_many's joined copies
            # int32 arrays straight from SentencePiece's buffers: Python ints would cost 36 bytes per id
            chunk = normalize_many([s[:max_chars] for s in sentences[i : i + ENCODE_CHUNK]])
            encoded += self.sp.encode(chunk, num_threads=1, return_type="numpy")
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return np.concatenate(encoded), lengths
