"""The SWORD corpus reader of data_prep/sample_corpora.py on made-up modules: OSIS markup and licence notices cleaned
away, books found across and within zlib blocks, a download whose SHA-256 is not the pinned one refused."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest

from data_prep.errors import DataPrepError
from data_prep.sample_corpora import check_sha256, clean_osis, sword_books, sword_english


def write_module(folder: Path, testament: str, blocks: list[str]) -> None:
    """A zText/zCom module's block index and zlib blocks, as SWORD writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    index, data = b"", b""
    for text in blocks:
        raw = text.encode("utf-8")
        packed = zlib.compress(raw)
        index += struct.pack("<III", len(data), len(packed), len(raw))
        data += packed
    (folder / f"{testament}.bzs").write_bytes(index)
    (folder / f"{testament}.bzz").write_bytes(data)


def test_clean_osis_keeps_running_text_only():
    osis = (
        '<div canonical="true" osisID="Ruth" sID="g1" type="book"/> <milestone n="Ruth" type="x-usfm-toc1"/> '
        '<title level="1" type="main">THE BOOK OF RUTH</title> <div sID="g2" type="x-p"/>'
        '<chapter n="1" osisID="Ruth.1" sID="Ruth.1"/><w lemma="strong:H1961">Now</w> it came to pass '
        '<note type="study">Heb. <hi type="italic">judged</hi>.</note>in the days &amp; the nights '
        '<reference osisRef="Judg.2.16">Jdg 2:16</reference>.<div eID="g2" type="x-p"/> <div sID="g3" type="x-p"/>'
        "And she said, &#8220;Whither thou goest.&#8221;<lb/>I will go."
        '<div eID="g3" type="x-p"/> <div sID="g4" type="x-p"/>This text is in the Public Domain. Copy it freely.'
        '<div eID="g4" type="x-p"/><div sID="g5" type="glossary"/><item>Abba: father.</item>'
    )
    assert clean_osis(osis) == [
        "Now it came to pass in the days & the nights Jdg 2:16.",
        "And she said, \u201cWhither thou goest.\u201d",
        "I will go.",
    ]


@pytest.mark.parametrize(
    "notice",
    [
        "*** START OF THE PROJECT GUTENBERG EBOOK RUTH ***",
        "Copyright (C) 1917 by the publisher.",
        "All rights reserved.",
    ],
)
def test_clean_osis_drops_licence_paragraphs(notice):
    assert clean_osis(f"<p>{notice}</p><p>In the beginning.</p><p>End of the Project Gutenberg text.</p>") == [
        "In the beginning."
    ]


def test_sword_books_across_and_within_blocks(tmp_path):
    module = tmp_path / "mod"
    write_module(
        module,
        "ot",
        [
            "<div type='x-testament'/>A module introduction, not a book.",
            '<div osisID="Gen" sID="a" type="book"/>In the beginning',
            ' God created.<div eID="a" osisID="Gen" type="book"/> '
            '<div osisID="Exod" sID="b" type="book"/>Now these are the names.',
        ],
    )
    write_module(module, "nt", ['<div osisID="Matt" sID="c" type="book"/>The book of the generation.'])
    books = list(sword_books(module))
    assert [book for book, _ in books] == ["Gen", "Exod", "Matt"]
    assert clean_osis(books[0][1]) == ["In the beginning God created."]
    assert clean_osis(books[1][1]) == ["Now these are the names."]


def test_sword_books_refuses_a_damaged_block(tmp_path):
    module = tmp_path / "mod"
    write_module(module, "ot", ['<div osisID="Gen" sID="a" type="book"/>In the beginning.'])
    (module / "ot.bzz").write_bytes(b"not zlib at all")
    with pytest.raises(DataPrepError, match=r"ot\.bzz: block 0 does not decompress"):
        list(sword_books(module))
    (module / "ot.bzs").write_bytes(b"\0" * 13)
    with pytest.raises(DataPrepError, match=r"ot\.bzs: 13 bytes, not a whole number of 12-byte entries"):
        list(sword_books(module))


def test_check_sha256_refuses_other_bytes(tmp_path):
    deb = tmp_path / "sword-text-kjv_14.3-1_all.deb"
    deb.write_bytes(b"the pinned bytes")
    pinned = hashlib.sha256(b"the pinned bytes").hexdigest()
    check_sha256(deb, pinned)
    deb.write_bytes(b"other bytes")
    with pytest.raises(DataPrepError, match=rf"{deb.name}: unexpected SHA-256 [0-9a-f]{{64}} \(pinned: {pinned}\)"):
        check_sha256(deb, pinned)


def test_sword_english_uses_its_cache(tmp_path):
    (tmp_path / "sword-english-train.txt").write_text("Train.\n\n")
    (tmp_path / "sword-english-heldout.txt").write_text("Held out.\n\n")
    corpus = sword_english(tmp_path)
    assert corpus.train.read_text() == "Train.\n\n" and corpus.heldout.read_text() == "Held out.\n\n"
