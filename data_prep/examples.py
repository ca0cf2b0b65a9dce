"""Pretraining examples: sentence-order pairs (SOP) and n-gram whole-word masking, vectorised.

The algorithm is ALBERT's reference (google-research/albert create_pretraining_data.py), without its bugs:
- chunks of consecutive sentences of one document are gathered up to a target length; segment A is
  the first `randint(1, k-1)` sentences, B the rest; A and B are swapped with probability 0.5
  (label 1 = swapped). A chunk holds at least two sentences, so every pair is a real SOP pair (the
  reference made one-sentence chunks and took their B from another document, an NSP negative);
  one-sentence documents are skipped and counted;
- with probability `short_seq_prob` a chunk's target length is drawn from [2, max] (redrawn per
  chunk; the reference drew once per document, so long documents were all-short or all-long);
- a pair longer than max_seq_length - 3 loses tokens from its longer segment, each from the front
  or the back with probability 0.5 (drawn here as a binomial count: the same distribution);
- masking picks whole words in a random order; each candidate starts an n-gram of n words,
  P(n) proportional to 1/n (n capped by the words left); n shrinks until the n-gram fits the
  budget of min(max_pred, max(1, round(len * prob))) tokens; an n-gram touching a covered word is
  really skipped (the reference's check was a no-op `continue`); chosen tokens are 80% [MASK],
  10% kept, 10% a random real piece;
- every random draw comes from the `numpy.random.Generator` passed in.

Work is done for a whole batch of documents at once: only the chunking loop runs per chunk in Python;
truncation, assembly and masking are numpy operations over [examples, seq_len] arrays.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from .vocab import Vocab


@dataclass(frozen=True)
class ExampleSettings:
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    ngram: int = 3
    short_seq_prob: float = 0.1

    def check(self) -> None:
        from .errors import DataPrepError

        if not 8 <= self.max_seq_length <= 65535:
            raise DataPrepError(f"--max-seq-length {self.max_seq_length}: must be in [8, 65535]")
        if not 1 <= self.max_predictions_per_seq <= self.max_seq_length - 3:
            raise DataPrepError(
                f"--max-predictions-per-seq {self.max_predictions_per_seq}: must be in [1, max_seq_length - 3]"
            )
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise DataPrepError(f"--masked-lm-prob {self.masked_lm_prob}: must be in (0, 1)")
        if not 1 <= self.ngram <= 10:
            raise DataPrepError(f"--ngram {self.ngram}: must be in [1, 10]")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise DataPrepError(f"--short-seq-prob {self.short_seq_prob}: must be in [0, 1]")


def record_dtype(max_seq_length: int, max_predictions: int) -> np.dtype:
    """One example as a fixed-size record: the HDF5 datasets' dtypes, field by field."""
    L, P = max_seq_length, max_predictions
    return np.dtype(
        [
            ("input_ids", "<u2", (L,)),
            ("input_mask", "u1", (L,)),
            ("segment_ids", "u1", (L,)),
            ("masked_lm_positions", "<u2", (P,)),
            ("masked_lm_ids", "<u2", (P,)),
            ("next_sentence_labels", "u1"),
        ]
    )


@dataclass
class ExampleStats:
    examples: int = 0
    tokens: int = 0  # non-padding tokens, [CLS]/[SEP] included
    maskable_tokens: int = 0  # tokens that could be masked (not [CLS]/[SEP]/padding)
    predictions: int = 0
    swapped: int = 0
    replaced_mask: int = 0
    replaced_random: int = 0
    kept: int = 0
    one_sentence_documents: int = 0
    truncated_pairs: int = 0
    dropped_without_predictions: int = 0  # every word longer than the example's budget
    ngram_hist: list[int] = field(default_factory=list)  # index n: n-grams of n words masked
    length_hist: list[int] = field(default_factory=list)  # 8 bins over [0, max_seq_length]

    def merge(self, other: ExampleStats) -> None:
        for name, value in vars(other).items():
            if isinstance(value, list):
                mine = getattr(self, name)
                mine.extend([0] * (len(value) - len(mine)))
                for i, v in enumerate(value):
                    mine[i] += v
            else:
                setattr(self, name, getattr(self, name) + value)


def _ngram_cdfs(ngram: int) -> np.ndarray:
    """cdfs[a - 1] is the CDF of n in 1..a with P(n) proportional to 1/n (padded with 1.0)."""
    cdfs = np.ones((ngram, ngram))
    for a in range(1, ngram + 1):
        p = 1.0 / np.arange(1, a + 1)
        cdfs[a - 1, :a] = np.cumsum(p / p.sum())
        cdfs[a - 1, a - 1] = 1.0
    return cdfs


def unmasked_record_dtype(max_seq_length: int) -> np.dtype:
    """One unmasked example (shards masked in the loader): the pair and where its words start."""
    L = max_seq_length
    return np.dtype(
        [
            ("input_ids", "<u2", (L,)),
            ("input_mask", "u1", (L,)),
            ("segment_ids", "u1", (L,)),
            ("word_starts", "u1", (L,)),
            ("next_sentence_labels", "u1"),
        ]
    )


def mask_budget(length: np.ndarray, max_predictions: int, masked_lm_prob: float) -> np.ndarray:
    """Tokens to mask per example: min(max_predictions, max(1, round(length * prob))), int64."""
    return np.minimum(max_predictions, np.maximum(1, np.rint(length * masked_lm_prob).astype(np.int64)))


@dataclass
class Words:
    """The whole words of a batch of examples, for masking. count[i]: words of example i; most: count.max();
    wid[i, j]: the word of position j (-1 before the first); ragged, example after example, cum_len[base[i] + w] is
    the number of maskable tokens before word w of example i, and cum_len[base[i] + count[i]] their total."""

    count: np.ndarray
    most: int
    wid: np.ndarray
    base: np.ndarray
    cum_len: np.ndarray

    @classmethod
    def of(cls, word_start: np.ndarray, cand: np.ndarray, length: np.ndarray) -> Words:
        """word_start, cand (maskable positions): bool [n, L]; length: real tokens per example."""
        n = len(word_start)
        W = word_start.sum(1)
        wid = np.cumsum(word_start, axis=1, dtype=np.int32)
        wid -= 1
        base = np.cumsum(W + 1) - (W + 1)
        cum_len = np.empty(n + int(W.sum()), dtype=np.int32)
        cum_len[base + W] = length - 3
        cand_before = np.cumsum(cand, axis=1, dtype=np.int32)
        is_word = np.ones(len(cum_len), dtype=bool)
        is_word[base + W] = False
        cum_len[is_word] = cand_before[word_start] - 1
        return cls(W, int(W.max(initial=0)), wid, base, cum_len)

    def fits(self, budget: np.ndarray) -> np.ndarray:
        """Examples with a word of at most `budget` tokens: exactly those whose masking gets a prediction."""
        n = len(self.count)
        word_rows = np.repeat(np.arange(n), self.count)
        starts = np.delete(np.arange(len(self.cum_len)), self.base + self.count)  # each word's entry
        small = self.cum_len[starts + 1] - self.cum_len[starts] <= budget[word_rows]
        return np.bincount(word_rows[small], minlength=n) > 0


def pick_ngrams(
    words: Words, cand: np.ndarray, budget: np.ndarray, order: np.ndarray, u_ngram: np.ndarray, ngram: int
) -> tuple[np.ndarray, np.ndarray]:
    """ALBERT's n-gram whole-word choice, for a batch: the candidates are each example's words in `order` (int32
    [n, >= most], its words first); the r-th candidate starts an n-gram of n words drawn from u_ngram[:, r]
    (uniform [0, 1)) with P(n) ~ 1/n, capped by the words left; n shrinks until the n-gram fits the budget; an n-gram
    touching a covered word is skipped. Returns (masked positions, bool [n, L]; histogram of n-gram sizes taken)."""
    n = len(cand)
    W, base, cum_len, Wmax = words.count, words.base, words.cum_len, words.most
    budget = budget.copy()
    g = ngram
    cdfs = _ngram_cdfs(g)
    ks = np.arange(1, g + 1)[None, :]
    covered = np.zeros((n, Wmax + g), dtype=bool)
    hist = np.zeros(g + 1, dtype=np.int64)
    act = np.arange(n)
    for r in range(Wmax):
        act = act[(budget[act] > 0) & (W[act] > r)]
        if act.size == 0:
            break
        c = order[act, r]
        avail = np.minimum(g, W[act] - c)
        ngram_n = 1 + (u_ngram[act, r][:, None] > cdfs[avail - 1]).sum(1)
        ends = np.minimum(c[:, None] + ks, W[act][:, None])
        b = base[act]
        count = cum_len[b[:, None] + ends] - cum_len[b + c][:, None]
        n_eff = ((count <= budget[act][:, None]) & (ks <= ngram_n[:, None])).sum(1)  # shrink n until it fits
        span = ks <= n_eff[:, None]
        hit = (covered[act[:, None], c[:, None] + ks - 1] & span).any(1)
        take = (n_eff > 0) & ~hit
        if not take.any():
            continue
        t_rows, t_c, t_n, t_span = act[take], c[take], n_eff[take], span[take]
        rr, kk = np.nonzero(t_span)
        covered[t_rows[rr], t_c[rr] + kk] = True
        budget[t_rows] -= count[take, t_n - 1]
        hist += np.bincount(t_n, minlength=g + 1)
    masked = cand & covered[np.arange(n, dtype=np.int32)[:, None], np.maximum(words.wid, 0)]
    return masked, hist


def replace_masked(
    ids: np.ndarray, mr: np.ndarray, mc: np.ndarray, u: np.ndarray, random_ids: np.ndarray, mask_id: int
) -> tuple[np.ndarray, ...]:
    """Replace the chosen tokens (rows mr, positions mc, row-major) in place: u < 0.8 [MASK], u >= 0.9 the random
    piece, else kept. Returns (original ids, prediction slot of each, predictions per row, to_mask, to_random)."""
    original = ids[mr, mc]
    to_mask, to_random = u < 0.8, u >= 0.9
    ids[mr, mc] = np.where(to_mask, mask_id, np.where(to_random, random_ids, original))
    per_row = np.bincount(mr, minlength=len(ids))
    slot = np.arange(len(mr)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    return original, slot, per_row, to_mask, to_random


def _unmasked_records(
    ids: np.ndarray,
    input_mask: np.ndarray,
    segment: np.ndarray,
    word_start: np.ndarray,
    swap: np.ndarray,
    keep: np.ndarray,
    length: np.ndarray,
    cand: np.ndarray,
    stats: ExampleStats,
) -> np.ndarray:
    n, L = ids.shape
    records = np.zeros(n, dtype=unmasked_record_dtype(L))
    records["input_ids"] = ids
    records["input_mask"] = input_mask
    records["segment_ids"] = segment
    records["word_starts"] = word_start
    records["next_sentence_labels"] = swap
    stats.dropped_without_predictions += int((~keep).sum())
    stats.examples += int(keep.sum())
    stats.tokens += int(length[keep].sum())
    stats.maskable_tokens += int(cand[keep].sum())
    stats.swapped += int(swap[keep].sum())
    lengths = length[keep]
    stats.merge(ExampleStats(length_hist=np.bincount(np.minimum(lengths * 8 // (L + 1), 7), minlength=8).tolist()))
    return records if keep.all() else records[keep]


def pair_documents(
    sent_lengths: np.ndarray,
    doc_sentences: np.ndarray,
    max_num_tokens: int,
    short_seq_prob: float,
    rng: np.random.Generator,
    stats: ExampleStats,
) -> np.ndarray:
    """Chunk each document into SOP pairs. Returns int64 [n, 4]: A start, A end = B start, B end
    (token offsets into the batch's flat token array), swapped flag."""
    offs = np.zeros(len(sent_lengths) + 1, dtype=np.int64)
    np.cumsum(sent_lengths, out=offs[1:])
    offs_l = offs.tolist()
    r_short, r_target, r_split, r_swap = rng.random((4, len(sent_lengths))).tolist()
    out: list[tuple[int, int, int, int]] = []
    s0 = 0
    for n_sent in doc_sentences.tolist():
        s1 = s0 + n_sent
        if n_sent < 2:
            stats.one_sentence_documents += n_sent == 1
            s0 = s1
            continue
        i = s0
        while i < s1:
            target = max_num_tokens
            if r_short[i] < short_seq_prob:
                target = 2 + int(r_target[i] * (max_num_tokens - 1))  # randint(2, max_num_tokens)
            # The chunk ends with the first sentence that brings it to the target, but holds at least
            # two sentences (an SOP pair needs two), and takes a lone last sentence of the document
            # along rather than leaving it behind.
            j = min(max(bisect.bisect_left(offs_l, offs_l[i] + target, i + 1, s1 + 1), i + 2), s1)
            if j == s1 - 1:
                j = s1
            k = j - i
            a_end = i + 1 + int(r_split[i] * (k - 1))  # randint(1, k - 1) sentences in A
            if offs_l[a_end] > offs_l[i] and offs_l[j] > offs_l[a_end]:
                out.append((offs_l[i], offs_l[a_end], offs_l[j], int(r_swap[i] < 0.5)))
            i = j
        s0 = s1
    return np.array(out, dtype=np.int64).reshape(-1, 4)


def make_examples(
    tokens: np.ndarray,
    sent_lengths: np.ndarray,
    doc_sentences: np.ndarray,
    vocab: Vocab,
    settings: ExampleSettings,
    rng: np.random.Generator,
    stats: ExampleStats,
    unmasked: bool = False,
) -> np.ndarray:
    """One pass (one dupe) over a batch of tokenized documents -> structured records (record_dtype; with `unmasked`,
    unmasked_record_dtype: the pairs with their word starts, for masking in the loader)."""
    L, P = settings.max_seq_length, settings.max_predictions_per_seq
    M = L - 3
    pairs = pair_documents(sent_lengths, doc_sentences, M, settings.short_seq_prob, rng, stats)
    n = len(pairs)
    records = np.zeros(n, dtype=unmasked_record_dtype(L) if unmasked else record_dtype(L, P))
    if n == 0:
        return records
    a0, a1, b1, swap = pairs.T
    la, lb = a1 - a0, b1 - a1

    # --- truncation: remove from the longer segment (ties: B) until the pair fits M tokens
    excess = np.maximum(la + lb - M, 0)
    only_a = la - lb >= excess
    only_b = ~only_a & (lb - la + 1 >= excess)
    both = ~only_a & ~only_b
    new_la = np.where(only_a, la - excess, np.where(only_b, la, (M + 1) // 2))
    new_lb = np.where(only_a, lb, np.where(only_b, lb - excess, M // 2))
    cut_a, cut_b = la - new_la, lb - new_lb
    front_a = rng.binomial(cut_a, 0.5)
    front_b = rng.binomial(cut_b, 0.5)
    a_start, b_start = a0 + front_a, a1 + front_b
    stats.truncated_pairs += int((excess > 0).sum())
    del both

    # --- assembly: [CLS] first [SEP] second [SEP] padding; first = B when swapped (int32: half the memory traffic)
    f_start = np.where(swap == 1, b_start, a_start).astype(np.int32)[:, None]
    f_len = np.where(swap == 1, new_lb, new_la).astype(np.int32)[:, None]
    s_start = np.where(swap == 1, a_start, b_start).astype(np.int32)[:, None]
    s_len = np.where(swap == 1, new_la, new_lb).astype(np.int32)[:, None]
    J = np.arange(L, dtype=np.int32)[None, :]
    in_first = (J >= 1) & (J <= f_len)
    in_second = (J >= f_len + 2) & (J <= f_len + s_len + 1)
    cand = in_first | in_second  # maskable positions
    src = np.where(in_first, f_start - 1, s_start - f_len - 2) + J
    del in_first, in_second
    np.clip(src, 0, len(tokens) - 1, out=src)
    ids = tokens[src].astype(np.int32, copy=False)
    ids[~cand] = 0
    del src
    ids[:, 0] = vocab.cls_id
    ids[J == f_len + 1] = vocab.sep_id
    ids[J == f_len + s_len + 2] = vocab.sep_id
    length = (f_len + s_len + 3)[:, 0].astype(np.int64)
    input_mask = J < length[:, None]
    segment = (J >= f_len + 2) & input_mask

    # --- masking: whole words, n-grams of words, in a random order, within a token budget
    word_start = cand & vocab.is_word_start[ids]
    word_start[:, 1] = True  # a segment always begins a word
    word_start[np.arange(n), f_len[:, 0] + 2] = True
    words = Words.of(word_start, cand, length)
    budget = mask_budget(length, P, settings.masked_lm_prob)
    if unmasked:
        # Unmasked: the loader masks each epoch afresh. A pair whose every word is longer than its budget could
        # never get a prediction: dropped, as the static masking drops it.
        return _unmasked_records(ids, input_mask, segment, word_start, swap, words.fits(budget), length, cand, stats)
    del word_start
    keys = rng.random((n, words.most), dtype=np.float32)
    keys[np.arange(words.most)[None, :] >= words.count[:, None]] = 2.0  # non-words last
    order = np.argsort(keys, axis=1).astype(np.int32)
    del keys
    u_ngram = rng.random((n, words.most), dtype=np.float32)
    masked, hist = pick_ngrams(words, cand, budget, order, u_ngram, settings.ngram)
    mr, mc = np.nonzero(masked)  # row-major: positions come out sorted within each example
    u = rng.random(len(mr))
    random_ids = vocab.normal_ids[rng.integers(0, len(vocab.normal_ids), size=len(mr))]
    original, slot, per_row, to_mask, to_random = replace_masked(ids, mr, mc, u, random_ids, vocab.mask_id)
    assert per_row.max(initial=0) <= P

    records["input_ids"] = ids
    records["input_mask"] = input_mask
    records["segment_ids"] = segment
    records["masked_lm_positions"][mr, slot] = mc
    records["masked_lm_ids"][mr, slot] = original
    records["next_sentence_labels"] = swap

    # A short example whose every word is longer than its budget gets no prediction: it would teach
    # nothing about MLM, so it is dropped (and counted) rather than written.
    keep = per_row > 0
    stats.dropped_without_predictions += int((~keep).sum())
    stats.examples += int(keep.sum())
    stats.tokens += int(length[keep].sum())
    stats.maskable_tokens += int(cand[keep].sum())
    stats.predictions += len(mr)
    stats.swapped += int(swap[keep].sum())
    stats.replaced_mask += int(to_mask.sum())
    stats.replaced_random += int(to_random.sum())
    stats.kept += int((~to_mask & ~to_random).sum())
    lengths = length[keep]
    stats.merge(
        ExampleStats(
            ngram_hist=hist.tolist(),
            length_hist=np.bincount(np.minimum(lengths * 8 // (L + 1), 7), minlength=8).tolist(),
        )
    )
    if not keep.all():
        records = records[keep]
    return records
