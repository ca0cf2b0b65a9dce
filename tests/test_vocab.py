"""`albert-data vocab`: ALBERT's special ids, its normalisation, and clear refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import sentencepiece as spm
from conftest import REPO

from data_prep.vocab import Vocab, normalize


def test_special_ids_and_files(spm_model):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    assert all(sp.is_control(i) for i in (2, 3, 4)) and sp.get_piece_size() == 4000
    assert spm_model.with_suffix(".vocab").is_file()
    v = Vocab(spm_model)
    assert (v.cls_id, v.sep_id, v.mask_id, v.pad_id) == (2, 3, 4, 0)
    assert not set(v.normal_ids.tolist()) & {0, 1, 2, 3, 4}


def test_normalisation_matches_albert_tokenizer_preprocessing():
    assert normalize("  Ça  va\tBIEN ``quoted'' ") == 'ca va bien "quoted"'
    assert normalize("Émile Zola") == "emile zola"


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
    v = Vocab(spm_model)
    lines = [line for f in sorted(wiki_corpus.iterdir()) for line in f.read_text().splitlines() if line]
    lines += ["", "Ça va ``bien'' ?", "emoji 😀 and 漢字 and ĞÜŞ", "x" * 50, "tab\there", "ﬁ ligature ²"]
    assert sum(not s.isascii() for s in lines) > 100 and len(lines) > 5000  # several chunks, many wide sentences
    ids, lengths = v.encode(lines, 100_000)
    assert ids.dtype == np.int32 and lengths.sum() == len(ids) and len(lengths) == len(lines)
    expected = [v.sp.encode(normalize(s)) for s in lines]
    assert [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])] == expected
