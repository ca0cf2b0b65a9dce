"""Pairing and masking, checked example by example on token streams whose ids tell where they came from.

Every token of the synthetic corpus has a unique id (its position in the flat token array, plus an
offset past the special ids), so an example can be traced back to its document and sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from data_prep.examples import ExampleSettings, ExampleStats, make_examples

FIRST = 5  # ids 0..4: <pad> <unk> [CLS] [SEP] [MASK]


@dataclass
class TableVocab:
    """The tables make_examples reads from a Vocab, for a synthetic id space."""

    vocab_size: int
    word_every: int = 3  # every k-th id starts a word: words of 1..k pieces

    def __post_init__(self):
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = 2, 3, 4, 0
        ids = np.arange(self.vocab_size)
        self.is_word_start = (ids >= FIRST) & ((ids % self.word_every == 0) | (ids % 7 == 1))
        self.normal_ids = np.arange(FIRST, self.vocab_size, dtype=np.int32)


def corpus(rng: np.random.Generator, docs: int = 300, max_sent: int = 16):
    doc_sentences = rng.integers(1, max_sent, size=docs)
    sent_lengths = rng.integers(1, 30, size=int(doc_sentences.sum()))
    assert sent_lengths.sum() + FIRST < 2**16, "ids must fit the shards' uint16"
    tokens = FIRST + np.arange(int(sent_lengths.sum()), dtype=np.int32)
    return tokens, sent_lengths, doc_sentences


def build(settings=None, seed=0, docs=300, word_every=3, passes=8):
    """`passes` passes over the corpus (like --dupe-factor) with one generator."""
    settings = settings or ExampleSettings()
    tokens, sent_lengths, doc_sentences = corpus(np.random.default_rng(1234), docs)
    vocab = TableVocab(int(tokens.max()) + 1, word_every)
    stats = ExampleStats()
    rng = np.random.default_rng(seed)
    recs = np.concatenate(
        [make_examples(tokens, sent_lengths, doc_sentences, vocab, settings, rng, stats) for _ in range(passes)]
    )
    return recs, stats, vocab, (tokens, sent_lengths, doc_sentences)


@pytest.fixture(scope="module")
def made():
    return build()


def unmasked(rec) -> np.ndarray:
    ids = rec["input_ids"].astype(np.int64).copy()
    pos, lm = rec["masked_lm_positions"], rec["masked_lm_ids"]
    ids[pos[pos > 0]] = lm[pos > 0]
    return ids


def segments(rec):
    ids = unmasked(rec)
    n = int(rec["input_mask"].sum())
    seps = np.flatnonzero(ids[:n] == 3)
    return ids[1 : seps[0]], ids[seps[0] + 1 : seps[1]], seps


def test_layout_and_segment_ids(made):
    recs, _, _, _ = made
    for rec in recs:
        n = int(rec["input_mask"].sum())
        ids = rec["input_ids"]
        assert ids[0] == 2 and ids[n - 1] == 3 and (ids[n:] == 0).all()
        first, second, seps = segments(rec)
        assert len(seps) == 2 and len(first) > 0 and len(second) > 0
        seg = rec["segment_ids"]
        assert (seg[: seps[0] + 1] == 0).all() and (seg[seps[0] + 1 : n] == 1).all() and (seg[n:] == 0).all()
        assert n <= 128


def test_sop_pairs_are_consecutive_text_of_one_document(made):
    recs, _, _, (tokens, sent_lengths, doc_sentences) = made
    doc_of_token = np.repeat(np.repeat(np.arange(len(doc_sentences)), doc_sentences), sent_lengths)
    for rec in recs:
        first, second, _ = segments(rec)
        # each segment is a contiguous run of the document's tokens (truncation only trims the ends)
        assert (np.diff(first) == 1).all() and (np.diff(second) == 1).all()
        a, b = (second, first) if rec["next_sentence_labels"] == 1 else (first, second)
        assert a[-1] < b[0], "label 0 = in order, 1 = swapped"
        # no NSP-style negatives: both segments come from the same document
        assert len(set(doc_of_token[np.concatenate([first, second]) - FIRST])) == 1


def test_sop_balance_and_one_sentence_documents(made):
    recs, stats, _, (_, _, doc_sentences) = made
    assert abs(recs["next_sentence_labels"].mean() - 0.5) < 0.03
    assert stats.one_sentence_documents == 8 * int((doc_sentences == 1).sum())


def test_number_of_predictions_follows_the_budget(made):
    recs, _, _, _ = made
    lengths = recs["input_mask"].sum(1)
    budget = np.minimum(20, np.maximum(1, np.rint(lengths * 0.15)))
    got = (recs["masked_lm_positions"] > 0).sum(1)
    assert (got <= budget).all()
    assert (got == budget).mean() > 0.98


def test_predictions_never_on_specials_and_strictly_increasing(made):
    recs, _, _, _ = made
    for rec in recs:
        pos = rec["masked_lm_positions"]
        real = pos[pos > 0].astype(np.int64)
        assert (np.diff(real) > 0).all(), "a token masked twice (the reference's no-op covered check)"
        assert (pos[len(real) :] == 0).all() and (rec["masked_lm_ids"][len(real) :] == 0).all()
        ids = unmasked(rec)
        assert not np.isin(ids[real], [0, 2, 3]).any()
        assert (real < rec["input_mask"].sum()).all()


def test_80_10_10(made):
    recs, stats, _, _ = made
    pos, lm = recs["masked_lm_positions"].astype(np.int64), recs["masked_lm_ids"]
    rows, cols = np.nonzero(pos > 0)
    shown = recs["input_ids"][rows, pos[rows, cols]]
    original = lm[rows, cols]
    n = len(rows)
    assert n > 10000
    assert abs((shown == 4).mean() - 0.8) < 0.015
    assert abs((shown == original).mean() - 0.1) < 0.01
    assert abs(((shown != 4) & (shown != original)).mean() - 0.1) < 0.01
    assert stats.predictions == n and stats.replaced_mask == int((shown == 4).sum())


def test_whole_words_are_masked_together(made):
    recs, _, vocab, _ = made
    for rec in recs[:500]:
        ids = unmasked(rec)
        n = int(rec["input_mask"].sum())
        masked = np.zeros(n, bool)
        pos = rec["masked_lm_positions"]
        masked[pos[pos > 0]] = True
        starts = vocab.is_word_start[ids[:n]] | np.isin(np.arange(n), [1]) | (ids[:n] == 3)
        _, _, seps = segments(rec)
        starts[seps[0] + 1] = True
        word = np.cumsum(starts)
        for w in np.unique(word[masked]):
            members = (word == w) & ~np.isin(ids[:n], [2, 3])
            assert masked[members].all(), "part of a word masked"


def reference_ngram_hist(recs, vocab, settings: ExampleSettings, rng: np.random.Generator) -> np.ndarray:
    """The reference's n-gram selection (with its covered check made real), one example at a time."""
    g = settings.ngram
    p = 1.0 / np.arange(1, g + 1)
    hist = np.zeros(g + 1, dtype=np.int64)
    for rec in recs:
        ids = unmasked(rec)
        n_tok = int(rec["input_mask"].sum())
        _, _, seps = segments(rec)
        starts = vocab.is_word_start[ids[:n_tok]].copy()
        starts[[1, seps[0] + 1]] = True
        starts[[0, seps[0], seps[1]]] = False
        maskable = np.ones(n_tok, bool)
        maskable[[0, seps[0], seps[1]]] = False
        word_len = np.bincount(np.cumsum(starts)[maskable] - 1)
        budget = min(settings.max_predictions_per_seq, max(1, int(round(n_tok * settings.masked_lm_prob))))
        covered = np.zeros(len(word_len), bool)
        for c in rng.permutation(len(word_len)):
            if budget <= 0:
                break
            avail = min(g, len(word_len) - c)
            n = rng.choice(np.arange(1, avail + 1), p=p[:avail] / p[:avail].sum())
            while n > 0 and word_len[c : c + n].sum() > budget:
                n -= 1
            if n == 0 or covered[c : c + n].any():
                continue
            covered[c : c + n] = True
            budget -= word_len[c : c + n].sum()
            hist[n] += 1
    return hist


@pytest.mark.parametrize("word_every", [1, 3])
def test_ngram_lengths_match_the_sequential_reference(word_every):
    settings = ExampleSettings()
    recs, stats, vocab, _ = build(settings, word_every=word_every, passes=4)
    ours = np.array(stats.ngram_hist[1:], dtype=float)
    ref = reference_ngram_hist(recs, vocab, settings, np.random.default_rng(5))[1:].astype(float)
    ours, ref = ours / ours.sum(), ref / ref.sum()
    assert np.abs(ours - ref).max() < 0.015, (ours, ref)
    assert ours[0] > ours[1] > ours[2] > 0.05


def test_unigram_masking_when_ngram_is_1():
    _, stats, _, _ = build(ExampleSettings(ngram=1))
    assert stats.ngram_hist[1] > 0 and sum(stats.ngram_hist[2:]) == 0


def test_short_seq_prob_makes_short_examples():
    long_only, _, _, _ = build(ExampleSettings(short_seq_prob=0.0), docs=400)
    all_short, _, _, _ = build(ExampleSettings(short_seq_prob=1.0), docs=400)
    short = lambda r: (r["input_mask"].sum(1) < 64).mean()  # noqa: E731
    assert short(all_short) > short(long_only) + 0.15


def test_same_seed_same_examples_other_seed_other_examples():
    a, _, _, _ = build(seed=7)
    b, _, _, _ = build(seed=7)
    c, _, _, _ = build(seed=8)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_examples_that_cannot_get_a_prediction_are_dropped():
    # 2-piece words only, and pairs short enough that the budget is 1 token: no whole word fits
    doc_sentences = np.array([2] * 50)
    sent_lengths = np.full(100, 2)
    tokens = FIRST + np.arange(200, dtype=np.int32)
    vocab = TableVocab(int(tokens.max()) + 1, word_every=2)
    vocab.is_word_start = (np.arange(vocab.vocab_size) >= FIRST) & (np.arange(vocab.vocab_size) % 2 == 1)
    stats = ExampleStats()
    recs = make_examples(tokens, sent_lengths, doc_sentences, vocab, ExampleSettings(), np.random.default_rng(0), stats)
    assert stats.dropped_without_predictions == 50 and len(recs) == 0 and stats.examples == 0
