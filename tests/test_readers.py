"""Readers: each format, format detection, input expansion, and every kind of bad input."""

from __future__ import annotations

import bz2
import json
import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from data_prep import readers
from data_prep.errors import DataPrepError
from data_prep.readers import ReadStats, detect_format, expand_inputs, iter_documents
from data_prep.sentences import MAX_SENTENCE_CHARS, cut_long, split_sentences


def docs_of(path: Path, fmt: str = "auto", stats: ReadStats | None = None, **kwargs) -> list[list[str]]:
    return list(iter_documents(path, fmt, stats, **kwargs))


# --- docs -----------------------------------------------------------------------------------


def test_docs_format(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(
        b"\xef\xbb\xbf\n\n  First sentence.  \nSecond one.\n\n\n \t \nThird.\r\nFourth.\r\n\r\nFifth, no newline"
    )
    stats = ReadStats()
    assert docs_of(path, "docs", stats) == [
        ["First sentence.", "Second one."],
        ["Third.", "Fourth."],
        ["Fifth, no newline"],
    ]
    assert (stats.files, stats.documents, stats.sentences, stats.bytes) == (1, 3, 5, path.stat().st_size)


def test_docs_reader_is_independent_of_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # multi-byte characters and "\r\n" pairs cut in half by the chunk size must not change a thing
    text = "".join(f"Zeile {i} größer als ☃ — ok.\r\n" + ("\r\n" if i % 3 == 0 else "") for i in range(200))
    path = tmp_path / "c.txt"
    path.write_bytes(text.encode("utf-8"))
    expected = docs_of(path, "docs")
    assert len(expected) == 68 and expected[0] == ["Zeile 0 größer als ☃ — ok."]
    for chunk in (1, 2, 3, 5, 7, 64):
        monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
        stats = ReadStats()
        assert docs_of(path, "docs", stats) == expected, chunk
        assert stats.replaced_chars == 0


def test_docs_pieces_cut_between_documents_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharding reads a big docs file as byte ranges in parallel: the pieces together must give exactly
    the documents and counts of the whole file, whatever the piece size."""
    docs = []
    for i in range(120):
        sents = [f"Satz {i}.{j} größer ☃ — ok." for j in range(1 + i % 4)]
        if i % 17 == 0:
            sents.append("x" * (MAX_SENTENCE_CHARS + 50))  # a long line, cut into sentences
        sep = ["\n", "\r\n", " \t \n", "\n\n\n"][i % 4]
        docs.append("\n".join(sents) + "\n" + sep)
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(docs).encode() + b"\n \n\n")  # BOM, trailing blank lines
    whole_stats = ReadStats()
    whole = docs_of(path, "docs", whole_stats)
    assert len(whole) == 120
    size = path.stat().st_size
    monkeypatch.setattr(readers, "_SCAN_BYTES", 64)  # matches across scan blocks too
    for target in (1, 100, 999, 5000, size, 10 * size):
        pieces = readers.docs_pieces(path, target)
        assert pieces[0][0] == 0 and pieces[-1][1] == size
        assert all(a < b and b == c for (a, b), (c, _) in zip(pieces, pieces[1:]))  # contiguous, in order
        assert (len(pieces) > 10) == (target < 1000)
        stats, got = ReadStats(), []
        for piece in pieces:
            part = list(iter_documents(path, "docs", stats, piece))
            assert part, (target, piece)  # every piece holds a document
            got += part
        assert got == whole and stats == whole_stats, target


def test_undecodable_bytes_are_refused_or_with_the_flag_replaced_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Café au lait.\nNaïve text.\n".encode("latin-1") + b"\xff\xfe ok.\n")
    with pytest.raises(
        DataPrepError, match=rf"^{path}: 4 undecodable bytes in the first 33 bytes .*byte offset 3: not UTF-8"
    ):
        docs_of(path, "docs")
    stats = ReadStats()
    assert docs_of(path, "docs", stats, allow_bad_bytes=True) == [
        ["Caf\ufffd au lait.", "Na\ufffdve text.", "\ufffd\ufffd ok."]
    ]
    assert stats.replaced_chars == 4


def test_truncated_utf8_at_end_of_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "cut.txt"
    path.write_bytes("Snow ☃".encode()[:-1])
    stats = ReadStats()
    assert docs_of(path, "docs", stats, allow_bad_bytes=True) == [["Snow \ufffd"]]
    assert stats.replaced_chars == 1


@pytest.mark.parametrize("fmt", ["docs", "paragraphs", "files", "jsonl", "auto"])
def test_random_bytes_are_refused_with_the_offset_of_the_first_bad_byte(tmp_path: Path, fmt: str) -> None:
    data = np.random.default_rng(0).integers(1, 256, 200_000, dtype=np.uint8).tobytes()  # no NUL: the fraction decides
    path = tmp_path / "random.bin"
    path.write_bytes(b"Plain text first.\n" * 10 + data)
    first = 180 + data.decode("utf-8", errors="replace").index("\ufffd")
    with pytest.raises(DataPrepError) as info:
        docs_of(path, fmt)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and f"the first at byte offset {first}: not UTF-8 text" in message
    assert "--allow-bad-bytes" in message and "\n" not in message
    allowed = docs_of(path, fmt, allow_bad_bytes=True)  # replaced and counted, on request
    assert allowed if fmt != "jsonl" else allowed == []  # (random lines are not JSON)


def test_nul_bytes_are_refused_at_their_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "CHUNK_BYTES", 7)  # offsets counted across chunks
    path = tmp_path / "nul.txt"
    path.write_bytes(b"A fine line of text.\n\nAnother\x00one.\n")
    for fmt in ("docs", "paragraphs", "jsonl"):
        with pytest.raises(DataPrepError, match=rf"^{path}: NUL byte at byte offset 29: binary data, not text"):
            docs_of(path, fmt)
    assert docs_of(path, "docs", allow_bad_bytes=True) == [["A fine line of text."], ["Another\x00one."]]


def test_a_few_stray_bytes_in_a_big_file_are_replaced_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "mostly.txt"
    path.write_bytes(b"Good text here.\n\n" * 10_000 + b"Caf\xe9.\n")  # 1 bad byte in 170 kB
    stats = ReadStats()
    assert docs_of(path, "docs", stats)[-1] == ["Caf\ufffd."]
    assert stats.replaced_chars == 1


def test_offsets_in_a_piece_are_file_offsets(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"One.\n\nTwo.\n\nThr\x00e.\n")
    with pytest.raises(DataPrepError, match="NUL byte at byte offset 15"):
        list(iter_documents(path, "docs", None, (12, path.stat().st_size)))


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_inputs_in_every_format(tmp_path: Path, suffix: str) -> None:
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    from test_wiki import make_dump

    texts = {
        "a.txt": ("docs", "One sentence.\nTwo.\n\nThird doc.\n"),
        "b.txt": ("paragraphs", "Para one. Still one.\n\nPara two.\n"),
        "c.txt": ("files", "Whole file. Is one document.\n"),
        "d.jsonl": ("auto", json.dumps({"text": "Json text. Two sentences."}) + "\n"),
        "e.xml": ("auto", make_dump()),
    }
    for name, (fmt, text) in texts.items():
        plain = tmp_path / name
        plain.write_text(text, encoding="utf-8")
        packed = tmp_path / (name + suffix)
        packed.write_bytes(compress(text.encode()))
        expected = docs_of(plain, fmt)
        assert expected and docs_of(packed, fmt) == expected, name
        assert detect_format(packed) == detect_format(plain)
    cut = tmp_path / ("cut.txt" + suffix)
    cut.write_bytes(compress(b"Some text. " * 5000)[:-30])
    with pytest.raises(DataPrepError, match=rf"^{cut}: (truncated|corrupt) {suffix[1:]}"):
        docs_of(cut, "docs")
    assert readers.docs_pieces(tmp_path / ("a.txt" + suffix), 1) == [
        (0, (tmp_path / ("a.txt" + suffix)).stat().st_size)
    ]


def test_long_lines_are_cut_into_sentences(tmp_path: Path) -> None:
    words = " ".join(f"w{i}" for i in range(1000))  # ~5 kB on one line
    path = tmp_path / "long.txt"
    path.write_text(f"Short.\n{words}\nAfter.\n", encoding="utf-8")
    stats = ReadStats()
    [doc] = docs_of(path, "docs", stats)
    assert doc[0] == "Short." and doc[-1] == "After."
    assert all(len(s) <= MAX_SENTENCE_CHARS for s in doc)
    assert " ".join(doc[1:-1]) == words  # cut at spaces: no word is broken
    assert stats.long_lines_split == 1


@pytest.mark.slow
def test_50mb_line_without_newline_is_never_held_whole(tmp_path: Path) -> None:
    size = 50 << 20
    word = b"abcdefghi "
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.write(b"Intro.\n\n")
        f.write(word * (size // len(word)))
    stats = ReadStats()
    tracemalloc.start()
    try:
        docs = iter_documents(path, "docs", stats)
        assert next(docs) == ["Intro."]
        sentences = 0
        longest = 0
        for doc in docs:
            sentences += len(doc)
            longest = max(longest, max(map(len, doc)))
            del doc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert longest <= MAX_SENTENCE_CHARS
    assert sentences >= size // MAX_SENTENCE_CHARS
    assert stats.long_lines_split == 1
    # The document's pieces are ~size bytes; reading the line whole (and copying it to strip
    # and cut it) would at least double that.
    assert peak < 1.5 * size


def test_empty_and_blank_files_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\n \n\t\n")
    for fmt in ("docs", "paragraphs", "files", "jsonl"):
        stats = ReadStats()
        for name in ("empty.txt", "blank.txt"):
            assert docs_of(tmp_path / name, fmt, stats) == []
        assert (stats.files, stats.empty_files, stats.documents) == (2, 2, 0), fmt
    stats = ReadStats()
    (tmp_path / "empty.xml.bz2").write_bytes(b"")
    assert docs_of(tmp_path / "empty.xml.bz2", "auto", stats) == [] and stats.empty_files == 1


# --- paragraphs, files --------------------------------------------------------------------------


def test_paragraphs_format(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text(
        "The first paragraph is hard\nwrapped over lines. It has two sentences.\n\n\n"
        "Second paragraph, one sentence.\n  \nThird! Really? Yes.\n",
        encoding="utf-8",
    )
    stats = ReadStats()
    assert docs_of(path, "paragraphs", stats) == [
        ["The first paragraph is hard wrapped over lines.", "It has two sentences."],
        ["Second paragraph, one sentence."],
        ["Third!", "Really?", "Yes."],
    ]
    assert (stats.documents, stats.sentences) == (3, 6)


def test_files_format_one_document_per_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Title line\n\nBody text is here. Another sentence\nwrapped.\n", encoding="utf-8")
    b.write_text("Only one sentence.", encoding="utf-8")
    assert docs_of(a, "files") == [["Title line", "Body text is here.", "Another sentence wrapped."]]
    assert docs_of(b, "files") == [["Only one sentence."]]


# --- jsonl ----------------------------------------------------------------------------------


def test_jsonl_format_and_bad_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"text": "First doc. Two sentences.", "id": 1}),
        "{not json",
        "",
        json.dumps({"title": "no text field"}),
        json.dumps({"text": "   "}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "Third doc\nwith a newline.\n\nAnd a paragraph."}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="data_prep.readers"):
        docs = docs_of(path, "auto", stats)
    assert docs == [["First doc.", "Two sentences."], ["Third doc with a newline.", "And a paragraph."]]
    assert stats.bad_json_lines == 3
    assert stats.empty_documents == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{path}:2: invalid JSON" in m for m in messages)
    assert any(f"{path}:4: " in m and '"text"' in m for m in messages)
    assert any(f"{path}:6: " in m for m in messages)


# --- sentences ------------------------------------------------------------------------------


def test_split_sentences() -> None:
    assert split_sentences("Dr. Smith went to Washington. He arrived at 5 p.m. on Monday!  Then?") == [
        "Dr. Smith went to Washington.",
        "He arrived at 5 p.m. on Monday!",
        "Then?",
    ]
    assert split_sentences(" \n\t ") == []
    assert split_sentences("line\u2028break\x0bhere.") == ["line break here."]


def test_absurd_sentences_are_cut_at_whitespace() -> None:
    text = " ".join(["word"] * 1000) + "."
    pieces = split_sentences(text, max_chars=100)
    assert all(len(p) <= 100 for p in pieces) and " ".join(pieces) == text
    assert cut_long("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]  # no whitespace: hard cut


def test_long_sentences_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text(" ".join(["word"] * 1000) + ".\n", encoding="utf-8")
    stats = ReadStats()
    [doc] = docs_of(path, "paragraphs", stats)
    assert len(doc) == 3 and stats.long_sentences_split == 1


# --- inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.xml", "wiki"),
        ("a.XML.bz2", "wiki"),
        ("a.jsonl", "jsonl"),
        ("a.json", "jsonl"),
        ("a.txt", "docs"),
        ("a", "docs"),
        ("a.bz2", "docs"),
        ("a.jsonl.gz", "jsonl"),
        ("a.xml.xz", "wiki"),
        ("a.txt.gz", "docs"),
        ("train-00000-of-00041.parquet", "parquet"),  # a Hugging Face dataset's file
        ("A.PARQUET", "parquet"),
        ("a.parquet.gz", "parquet"),  # (refused when read: decompress it)
        ("enwiki-latest-pages-articles1.xml-p1p41242.bz2", "wiki"),  # Wikipedia's part files
        ("enwiki-20240601-pages-articles-multistream27.xml-p76000000p77000000", "wiki"),
    ],
)
def test_detect_format(name: str, fmt: str) -> None:
    assert detect_format(Path(name)) == fmt


def test_expand_inputs_recurses_sorted_skips_hidden_and_dedups(tmp_path: Path) -> None:
    for rel in ("b/2.txt", "b/1.txt", "a.txt", "b/sub/0.txt", "b/.hidden.txt", ".git/x.txt", "b/.cache/y.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    got = expand_inputs([tmp_path / "b" / "1.txt", tmp_path, str(tmp_path / "a.txt")])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["b/1.txt", "a.txt", "b/2.txt", "b/sub/0.txt"]


def test_missing_input_is_a_data_prep_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataPrepError, match=rf"^{missing}: no such file or directory$"):
        expand_inputs([tmp_path, missing])
    with pytest.raises(DataPrepError, match="no such file or directory"):
        docs_of(missing)


def test_directory_without_files_is_a_data_prep_error(tmp_path: Path) -> None:
    (tmp_path / "d" / ".hidden").mkdir(parents=True)
    with pytest.raises(DataPrepError, match="holds no input files"):
        expand_inputs([tmp_path / "d"])


def test_unknown_format_is_a_data_prep_error(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x\n")
    with pytest.raises(DataPrepError, match=rf"{path}: unknown format 'csv'"):
        docs_of(path, "csv")


def test_read_stats_add_up() -> None:
    a = ReadStats(files=1, documents=2, sentences=3, bad_json_lines=1)
    b = ReadStats(files=2, documents=5, sentences=7, skipped_pages=4)
    a += b
    assert a == ReadStats(files=3, documents=7, sentences=10, bad_json_lines=1, skipped_pages=4)
    assert a.merge(ReadStats(bytes=9)).bytes == 9


def test_corrupt_compressed_wiki_reports_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.xml.bz2"
    data = bz2.compress(
        b"<mediawiki><page><title>A</title><ns>0</ns><revision><text>x</text></revision></page></mediawiki>" * 50
    )
    path.write_bytes(data[:-20])
    with pytest.raises(DataPrepError, match=rf"^{path}: "):
        docs_of(path)


def test_overlong_lines_in_jsonl_and_paragraphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(readers, "MAX_LINE_CHARS", 100)
    monkeypatch.setattr(readers, "CHUNK_BYTES", 16)
    long_text = "A long sentence that goes on and on. " * 20  # ~740 characters on one line
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Short one.", long_text, "Last.")))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="data_prep.readers"):
        assert docs_of(jl, "jsonl", stats) == [["Short one."], ["Last."]]
    assert stats.bad_json_lines == 1
    assert any(f"{jl}:2: line longer than 100" in r.getMessage() for r in caplog.records)
    para = tmp_path / "p.txt"
    para.write_text("First.\n\n" + long_text + "\n\nLast one.\n")
    stats = ReadStats()
    docs = docs_of(para, "paragraphs", stats)
    assert docs[0] == ["First."] and docs[2] == ["Last one."]
    assert " ".join(docs[1]) == long_text.strip()  # pieces joined back without losing a character
    assert stats.long_lines_split == 1
