"""`albert-data vocab`: ALBERT's special ids, its normalisation, and clear refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from conftest import REPO

from data_prep.vocab import Vocab, normalize, sample_sentences


def test_special_ids_and_files(spm_model):
    processor = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert [processor.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    assert all(processor.is_control(i) for i in (2, 3, 4)) and processor.get_piece_size() == 4000
    assert spm_model.with_suffix(".vocab").is_file()
    vocab = Vocab(spm_model)
    assert (vocab.cls_id, vocab.sep_id, vocab.mask_id, vocab.pad_id) == (2, 3, 4, 0)
    assert not set(vocab.normal_ids.tolist()) & {0, 1, 2, 3, 4}


def test_normalisation_matches_albert_tokenizer_preprocessing():
    assert normalize("  Ça  va\tBIEN ``quoted'' ") == 'ca va bien "quoted"'
    assert normalize("Émile Zola") == "emile zola"


@pytest.mark.slow
def test_vocab_command_and_too_large_vocabulary(wiki_corpus, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "vocab",
        "--input",
        str(wiki_corpus),
        "--output-prefix",
        str(tmp_path / "v"),
    ]
    proc = subprocess.run(cmd + ["--vocab-size", "1000"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "v.model").is_file() and (tmp_path / "v.vocab").is_file()
    proc = subprocess.run(cmd + ["--vocab-size", "60000"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "Vocabulary size too high" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(cmd + ["--vocab-size", "70000"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "uint16" in proc.stderr


def test_batched_encoding_equals_one_sentence_at_a_time(spm_model, wiki_corpus):
    """Vocab.encode (chunked, ASCII fast paths, ids straight from SentencePiece's buffers) gives, for
    every sentence of the real corpus and a few awkward ones, the ids of normalize() + encode()."""
    vocab = Vocab(spm_model)
    lines = [line for f in sorted(wiki_corpus.iterdir()) for line in f.read_text().splitlines() if line]
    lines += ["", "Ça va ``bien'' ?", "emoji 😀 and 漢字 and ĞÜŞ", "x" * 50, "tab\there", "ﬁ ligature ²"]
    assert sum(not s.isascii() for s in lines) > 100 and len(lines) > 5000  # several chunks, many wide sentences
    ids, lengths = vocab.encode(lines, 100_000)
    assert ids.dtype == np.int32 and lengths.sum() == len(ids) and len(lengths) == len(lines)
    expected = [vocab.sp.encode(normalize(s)) for s in lines]
    assert [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])] == expected


def test_sample_is_uniform_bounded_in_order_and_deterministic():
    sentences = [f"sentence {i}" for i in range(100_000)]
    sample, total = sample_sentences(iter(sentences), 1000, seed=7)
    assert total == 100_000 and len(sample) == 1000 and len(set(sample)) == 1000
    positions = [int(s.split()[1]) for s in sample]
    assert positions == sorted(positions)  # corpus order
    assert sample_sentences(iter(sentences), 1000, seed=7)[0] == sample
    assert sample_sentences(iter(sentences), 1000, seed=8)[0] != sample
    # uniform: each tenth of the corpus holds about a tenth of the sample
    counts = np.bincount(np.array(positions) // 10_000, minlength=10)
    assert counts.min() > 60 and counts.max() < 140, counts
    assert sample_sentences(iter(sentences[:10]), 1000, seed=7) == (sentences[:10], 10)  # fewer: all of them


def test_sample_memory_is_bounded_by_its_size_not_the_corpus():
    import tracemalloc

    def corpus(n):  # 30 MB of text, generated as it is read
        for i in range(n):
            yield f"{i:08d} " + "x" * 92

    tracemalloc.start()
    try:
        sample, total = sample_sentences(corpus(300_000), 2000, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 300_000 and len(sample) == 2000
    assert peak < 2_000_000  # ~2,000 sentences of ~150 bytes, not 30 MB


def test_same_seed_same_vocabulary_bytes(wiki_corpus, tmp_path):
    from data_prep.cli import train_vocab_from

    def train(seed):  # the same prefix each time: the model records it
        model = train_vocab_from([wiki_corpus], tmp_path / "spiece", 1000, 3000, seed, 1, "docs")
        return model.read_bytes(), model.with_suffix(".vocab").read_bytes()

    first = train(3)
    assert train(3) == first
    assert train(4)[1] != first[1]  # another sample of 3,000 of the corpus's ~19,500 sentences
