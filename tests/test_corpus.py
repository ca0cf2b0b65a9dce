"""The corpus step: standard format, balanced split, atomic output, workers, bad inputs."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest
from test_wiki import EXPECTED_ARTICLE, make_dump

from data_prep import corpus
from data_prep.corpus import CorpusStats, write_corpus
from data_prep.errors import DataPrepError
from data_prep.readers import iter_documents


def read_corpus(folder: Path, prefix: str = "corpus") -> list[list[list[str]]]:
    return [list(iter_documents(p, "docs")) for p in sorted(folder.glob(f"{prefix}-*.txt"))]


def write_docs(path: Path, docs: list[list[str]]) -> Path:
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    return path


def test_standard_format_and_balanced_split(tmp_path: Path) -> None:
    # sizes in bytes with the newline: 100, 40, 30, 50, 10 (+1 for the blank line when not first)
    docs = [["a" * 99], ["b" * 39], ["c" * 29], ["d" * 49], ["e" * 4, "f" * 4]]
    src = write_docs(tmp_path / "in.txt", docs)
    stats = write_corpus([src], tmp_path / "out", num_files=3, progress=False)
    # fewest bytes first, ties to the lowest index:
    # a->0 (100); b->1 (40); c->2 (30); d->2 (30+51=81); e->1 (40+11=51)
    assert read_corpus(tmp_path / "out") == [[docs[0]], [docs[1], docs[4]], [docs[2], docs[3]]]
    files = [tmp_path / "out" / f"corpus-0000{i}.txt" for i in range(3)]
    assert files[1].read_text() == "b" * 39 + "\n\n" + "eeee\nffff\n"  # blank line between, none at the end
    assert isinstance(stats, CorpusStats)
    assert stats.output_files == files
    assert stats.bytes_written == sum(f.stat().st_size for f in files) == 100 + 51 + 81
    assert (stats.documents, stats.sentences, stats.files) == (5, 6, 1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f.name for f in files]  # no temp files left


def test_every_format_round_trips_through_the_standard_format(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.xml").write_text(make_dump(), encoding="utf-8")
    (src / "b.jsonl").write_text(json.dumps({"text": "Json doc here. Second sentence."}) + "\n{bad\n", encoding="utf-8")
    write_docs(src / "c.txt", [["Docs one."], ["Docs two.", "Docs three."]])
    stats = write_corpus([src], tmp_path / "out", num_files=1, prefix="wiki", progress=False)
    [docs] = read_corpus(tmp_path / "out", "wiki")
    assert docs == [
        EXPECTED_ARTICLE,
        ["A gear is a rotating machine part with cut teeth."],
        ["Json doc here.", "Second sentence."],
        ["Docs one."],
        ["Docs two.", "Docs three."],
    ]
    assert (stats.files, stats.documents, stats.bad_json_lines, stats.skipped_pages, stats.empty_documents) == (
        3,
        5,
        1,
        6,
        1,
    )


@pytest.mark.slow
def test_workers_give_byte_identical_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.xml.bz2").write_bytes(bz2.compress(make_dump().encode("utf-8")))
    lines = [
        json.dumps({"text": f"Document number {i}. It has {i % 5 + 1} words of text. " * (i % 3 + 1)})
        for i in range(300)
    ]
    (src / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_docs(src / "c.txt", [[f"Sentence {i}.", f"Another {i}."] for i in range(100)])
    (src / "d.xml").write_text(make_dump(), encoding="utf-8")
    one = write_corpus([src], tmp_path / "w1", num_files=5, workers=1, progress=False)
    submitted = []
    real_submit = corpus._submit
    monkeypatch.setattr(corpus, "_submit", lambda pool, batch: submitted.append(len(batch)) or real_submit(pool, batch))
    two = write_corpus([src], tmp_path / "w2", num_files=5, workers=2, progress=False)
    assert len(submitted) > 1  # the pool really ran, over several batches
    for a, b in zip(one.output_files, two.output_files, strict=True):
        assert a.read_bytes() == b.read_bytes()
    for name in ("documents", "sentences", "skipped_pages", "empty_documents", "bytes_written"):
        assert getattr(one, name) == getattr(two, name), name
    assert one.documents == 2 * 2 + 300 + 100


def test_missing_input_fails_before_any_work(tmp_path: Path) -> None:
    good = write_docs(tmp_path / "good.txt", [["x."]])
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match=r"missing\.txt: no such file or directory"):
        write_corpus([good, tmp_path / "missing.txt"], out, progress=False)
    assert not out.exists()


def test_failure_leaves_no_partial_output(tmp_path: Path) -> None:
    good = write_docs(tmp_path / "a.txt", [["Fine document."]])
    packed = bz2.compress(make_dump().encode("utf-8"))
    bad = tmp_path / "b.xml.bz2"
    bad.write_bytes(packed[: len(packed) // 2])
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match=r"b\.xml\.bz2: truncated bz2"):
        write_corpus([good, bad], out, num_files=2, progress=False)
    assert list(out.iterdir()) == []


def test_no_documents_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataPrepError, match="no documents found"):
        write_corpus([empty], tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"num_files": 0}, "output files"), ({"workers": 0}, "workers"), ({"fmt": "csv"}, "format")]
)
def test_bad_settings_are_data_prep_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    src = write_docs(tmp_path / "a.txt", [["x."]])
    with pytest.raises(DataPrepError, match=message):
        write_corpus([src], tmp_path / "out", progress=False, **kwargs)


def test_fewer_documents_than_files_leaves_empty_files(tmp_path: Path) -> None:
    src = write_docs(tmp_path / "a.txt", [["One."], ["Two."]])
    stats = write_corpus([src], tmp_path / "out", num_files=4, progress=False)
    assert [p.stat().st_size for p in stats.output_files] == [5, 5, 0, 0]


def test_lee_news_stories_as_paragraphs(tmp_path: Path) -> None:
    """Real text: the Lee corpus (one story per line) from the same wheel as the excerpt."""
    from data_prep.demo_corpus import lee_background

    try:
        lee = lee_background()
    except DataPrepError as exc:  # offline and never cached
        pytest.skip(str(exc))
    stories = [line for line in lee.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    assert len(stories) == 300
    src = tmp_path / "lee.txt"
    src.write_text("\n\n".join(stories) + "\n", encoding="utf-8")
    stats = write_corpus([src], tmp_path / "out", num_files=3, fmt="paragraphs", progress=False)
    assert stats.documents == 300
    assert stats.sentences > 2000
    sizes = [p.stat().st_size for p in stats.output_files]
    assert max(sizes) - min(sizes) < 3000  # balanced to within about one story
