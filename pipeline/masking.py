"""Masking in the loader, for shards written unmasked (`albert-data shard --masking dynamic`).

The algorithm is the static generator's (data_prep/examples.py: the same functions choose the n-grams of whole words
and replace the chosen tokens), so the masks have the same distribution; only the random numbers come from
elsewhere. They come from a counter-based generator: every draw is a hash (splitmix64's finaliser) of (seed, epoch,
the example's global id, the draw's index within the example), so the mask of example i in epoch e is a function of
(seed, e, i) alone. Which rank reads the example, with which micro-batch size, in which window, before or after a
resume: none of it changes the mask. A whole window of rows is masked in one vectorised call.

Draws of one example: for each word slot j (j < the window's most words) one 64-bit value whose bits 32-63 order
the words (a stable sort; non-words last) and whose bits 8-31 are the uniform that draws the n-gram size of the j-th
candidate; for each chosen position one 64-bit value whose bits 40-63 are the uniform of the 80/10/10 choice and
whose bits 0-31 pick the random piece. Each word slot and position has its own draw, so a row's draws do not depend
on how many words the other rows of its window have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.examples import Words, mask_budget, pick_ngrams, replace_masked

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_STREAM_WORDS = np.uint64(1 << 40)  # offsets of the two streams of draws within an example's counter space
_STREAM_POSITIONS = np.uint64(2 << 40)


@dataclass(frozen=True)
class MaskSettings:
    """How the loader masks: what `albert-data shard` calls --masked-lm-prob, --ngram, --max-predictions-per-seq."""

    masked_lm_prob: float
    ngram: int
    max_predictions: int

    def problem(self, seq_len: int) -> str | None:
        """Why these settings cannot mask sequences of seq_len tokens, or None."""
        if not 0.0 < self.masked_lm_prob < 1.0:
            return f"--masked-lm-prob {self.masked_lm_prob}: must be in (0, 1)"
        if not 1 <= self.ngram <= 10:
            return f"--ngram {self.ngram}: must be in [1, 10]"
        if not 1 <= self.max_predictions <= seq_len - 3:
            return (
                f"--max-predictions-per-seq {self.max_predictions}: must be in [1, {seq_len - 3}] (sequence length - 3)"
            )
        return None


@dataclass(frozen=True)
class MaskOverrides:
    """albert-pretrain's masking flags: each None keeps the shard folder's recorded setting."""

    masked_lm_prob: float | None = None
    ngram: int | None = None
    max_predictions: int | None = None

    def given(self) -> list[str]:
        """The flags set, as written on the command line."""
        names = {
            "masked_lm_prob": "--masked-lm-prob",
            "ngram": "--ngram",
            "max_predictions": "--max-predictions-per-seq",
        }
        return [flag for key, flag in names.items() if getattr(self, key) is not None]

    def over(self, recorded: MaskSettings) -> MaskSettings:
        return MaskSettings(
            recorded.masked_lm_prob if self.masked_lm_prob is None else self.masked_lm_prob,
            recorded.ngram if self.ngram is None else self.ngram,
            recorded.max_predictions if self.max_predictions is None else self.max_predictions,
        )


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def example_keys(seed: int, epoch: int, example_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per example: a hash of (seed, epoch, global example id)."""
    with np.errstate(over="ignore"):
        run = _mix(np.array([seed], dtype=np.uint64) * GOLDEN + np.uint64(1))
        run = _mix(run ^ (np.array([epoch], dtype=np.uint64) * _M2 + GOLDEN))
        return _mix(run + example_ids.astype(np.uint64) * GOLDEN)


def _draws(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """The draw number `counters` of each key (broadcast): hash(key + counter * golden)."""
    with np.errstate(over="ignore"):
        return _mix(keys + counters.astype(np.uint64) * GOLDEN)


def _uniform24(bits: np.ndarray) -> np.ndarray:
    """24 bits (the low ones of `bits`) as float32 in [0, 1), exactly representable."""
    return (bits & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)


class Masker:
    """Masks windows of unmasked rows (input_ids, input_mask, segment_ids, word_starts, next_sentence_labels) into
    the fields of statically masked shards (data_prep.shards.FIELDS)."""

    def __init__(self, settings: MaskSettings, seed: int, mask_id: int, normal_ids: np.ndarray):
        self.settings, self.seed, self.mask_id = settings, seed, mask_id
        self.normal_ids = np.asarray(normal_ids, dtype=np.int64)

    def __call__(self, rows: dict[str, np.ndarray], example_ids: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        """The rows masked as in epoch `epoch`; example_ids: their global ids (shard order in the manifest, then
        row)."""
        return self.mask(rows, example_ids, epoch)[0]

    def mask(
        self, rows: dict[str, np.ndarray], example_ids: np.ndarray, epoch: int
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(the masked rows, the histogram of the n-gram sizes taken: index n counts n-grams of n words)."""
        ids = rows["input_ids"].astype(np.int32)
        input_mask = rows["input_mask"].astype(bool)
        segment = rows["segment_ids"].astype(bool)
        word_start = rows["word_starts"].astype(bool)
        n, L = ids.shape
        P = self.settings.max_predictions
        length = input_mask.sum(1)
        first_sep = (input_mask & ~segment).sum(1) - 1  # [CLS] first [SEP]: segment 0
        J = np.arange(L)[None, :]
        cand = (J >= 1) & (J < length[:, None] - 1) & (J != first_sep[:, None])
        words = Words.of(word_start, cand, length)
        budget = mask_budget(length, P, self.settings.masked_lm_prob)
        keys = example_keys(self.seed, epoch, example_ids)

        word_draws = _draws(keys[:, None], _STREAM_WORDS + np.arange(words.most, dtype=np.uint64)[None, :])
        order_keys = (word_draws >> np.uint64(32)).astype(np.uint32)
        order_keys[np.arange(words.most)[None, :] >= words.count[:, None]] = np.uint32(0xFFFFFFFF)  # non-words last
        order = np.argsort(order_keys, axis=1, kind="stable").astype(np.int32)
        u_ngram = _uniform24(word_draws >> np.uint64(8))
        del word_draws, order_keys
        masked, hist = pick_ngrams(words, cand, budget, order, u_ngram, self.settings.ngram)

        mr, mc = np.nonzero(masked)  # row-major: positions sorted within each example
        position_draws = _draws(keys[mr], _STREAM_POSITIONS + mc.astype(np.uint64))
        u = _uniform24(position_draws >> np.uint64(40))
        pick = ((position_draws & np.uint64(0xFFFFFFFF)) * np.uint64(len(self.normal_ids))) >> np.uint64(32)
        random_ids = self.normal_ids[pick.astype(np.int64)]
        original, slot, _, _, _ = replace_masked(ids, mr, mc, u, random_ids, self.mask_id)

        positions = np.zeros((n, P), dtype=np.uint16)
        targets = np.zeros((n, P), dtype=np.uint16)
        positions[mr, slot] = mc
        targets[mr, slot] = original
        fields = {
            "input_ids": ids.astype(np.uint16),
            "input_mask": rows["input_mask"],
            "segment_ids": rows["segment_ids"],
            "masked_lm_positions": positions,
            "masked_lm_ids": targets,
            "next_sentence_labels": rows["next_sentence_labels"],
        }
        return fields, hist
