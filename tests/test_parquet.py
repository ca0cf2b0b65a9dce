"""Parquet input: the Wikipedia excerpt's documents written with pyarrow (several row groups, extra nested columns,
null texts) give the corpus of the same documents in JSON lines, with 1 and 2 workers; a missing, nested or
non-string text column is refused in one line naming the columns; --text-field and --title-field for Parquet and
JSON lines; a run killed by SIGKILL continues with --resume to a clean run's bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from test_corpus import FAULT, read_corpus, snapshot

from data_prep.corpus import plan_parts, write_corpus
from data_prep.errors import DataPrepError
from data_prep.parquet import Fields
from data_prep.readers import FIELD_PROBE_OBJECTS, detect_format, iter_documents

ROWS_PER_GROUP = 9
NULL_ROWS = (5, 40)  # rows whose text is null (in JSON lines: null, a bad line)


def excerpt_texts(wiki_corpus: Path) -> list[str]:
    """The excerpt's documents as prose: sentences joined by spaces, a blank line after every fifth (a paragraph)."""
    docs = [doc for docs in read_corpus(wiki_corpus) for doc in docs]
    texts = []
    for doc in docs:
        paragraphs = [" ".join(doc[k : k + 5]) for k in range(0, len(doc), 5)]
        texts.append("\n\n".join(paragraphs))
    return texts


def records(texts: list[str]) -> list[dict]:
    """Rows with an id, a title, the text (None at NULL_ROWS), and a nested and a list column beside them."""
    rows = []
    for i, text in enumerate(texts):
        rows.append(
            {
                "id": i,
                "title": f"Article {i}",
                "text": None if i in NULL_ROWS else text,
                "meta": {"words": len(text.split()), "source": "excerpt"},
                "tags": ["wiki", f"t{i % 3}"],
            }
        )
    return rows


def write_parquet(path: Path, rows: list[dict], rows_per_group: int = ROWS_PER_GROUP, **columns) -> Path:
    table = pa.Table.from_pylist(rows)
    for name, values in columns.items():
        table = table.append_column(name, values)
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def excerpt_files(wiki_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """The excerpt's documents as Parquet (row groups of ROWS_PER_GROUP rows) and as JSON lines; the number of
    documents with a text."""
    folder = tmp_path_factory.mktemp("excerpt-files")
    rows = records(excerpt_texts(wiki_corpus))
    parquet = write_parquet(folder / "excerpt.parquet", rows)
    jsonl = write_jsonl(folder / "excerpt.jsonl", rows)
    return parquet, jsonl, len(rows) - len(NULL_ROWS)


def test_parquet_parts_are_runs_of_row_groups_covering_the_file(excerpt_files) -> None:
    parquet, _, _ = excerpt_files
    metadata = pq.ParquetFile(parquet).metadata
    assert detect_format(parquet) == "parquet" and metadata.num_row_groups > 8
    parts = plan_parts([parquet], "auto", 1)  # every row group a part of its own
    assert [p.row_groups for p in parts] == [(i, i + 1) for i in range(metadata.num_row_groups)]
    assert [p.start for p in parts][0] == 0 and parts[-1].stop == parquet.stat().st_size
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))  # the spans tile the file
    assert [p.last_of_file for p in parts] == [False] * (len(parts) - 1) + [True]
    size = parquet.stat().st_size
    grouped = plan_parts([parquet], "auto", size // 3)
    assert 2 <= len(grouped) <= 4 and grouped[-1].row_groups[1] == metadata.num_row_groups
    assert len(plan_parts([parquet], "auto", 10 * size)) == 1


def test_parquet_reads_the_documents_of_json_lines(excerpt_files) -> None:
    """Reader level: the same documents, counts and skipped rows, whole and by row groups."""
    parquet, jsonl, documents = excerpt_files
    from data_prep.readers import ReadStats

    json_stats, parquet_stats, pieces_stats = ReadStats(), ReadStats(), ReadStats()
    from_json = list(iter_documents(jsonl, "auto", json_stats))
    from_parquet = list(iter_documents(parquet, "auto", parquet_stats))
    parts = plan_parts([parquet], "auto", 1)
    pieces = [doc for p in parts for doc in iter_documents(parquet, "parquet", pieces_stats, row_groups=p.row_groups)]
    assert from_parquet == from_json == pieces and len(from_json) == documents
    assert json_stats.bad_json_lines == parquet_stats.null_texts == pieces_stats.null_texts == len(NULL_ROWS)
    assert parquet_stats.files == pieces_stats.files == 1
    assert parquet_stats.sentences == json_stats.sentences == pieces_stats.sentences


@pytest.mark.slow
def test_parquet_corpus_is_the_json_lines_corpus_with_1_and_2_workers(excerpt_files, tmp_path: Path) -> None:
    parquet, jsonl, documents = excerpt_files
    kw = {"num_files": 3, "progress": False, "part_bytes": 60_000}
    ref = write_corpus([jsonl], tmp_path / "jsonl", **kw)
    assert ref.documents == documents
    for workers in (1, 2):
        stats = write_corpus([parquet], tmp_path / f"parquet-{workers}", workers=workers, **kw)
        assert snapshot(tmp_path / f"parquet-{workers}") == snapshot(tmp_path / "jsonl")
        assert (stats.documents, stats.sentences, stats.null_texts) == (ref.documents, ref.sentences, len(NULL_ROWS))
    summary = json.loads((tmp_path / "parquet-2" / ".corpus.json").read_text())
    assert summary["summary_version"] == 3 and summary["settings"]["text_field"] == "text"
    assert summary["read"]["null_texts"] == len(NULL_ROWS)
    assert len(summary["settings"]["inputs"][0]["cuts"]) > 1  # read in several parts


def test_text_and_title_fields_of_parquet_and_json_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"doc_id": 7 + i, "name": f"Page {i}", "body": f"Body {i} here. Second {i}."} for i in range(4)]
    rows[2]["body"] = None
    fields = Fields("body", "name")
    parquet = write_parquet(tmp_path / "a.parquet", rows, rows_per_group=2)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    expected = [[f"Body {i} here.", f"Second {i}."] for i in (0, 1, 3)]
    for path in (parquet, jsonl):
        caplog.clear()
        assert list(iter_documents(path, "auto", fields=fields)) == expected
        [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "Page" in r.getMessage()]
        assert "(name 'Page 2')" in warning and "body" in warning and "skipped" in warning, warning
    by_id = Fields("body", "doc_id")  # an integer id names the row too
    caplog.clear()
    assert list(iter_documents(parquet, "auto", fields=by_id)) == expected
    assert any("row 2 (doc_id 9)" in r.getMessage() for r in caplog.records)
    stats = write_corpus([parquet, jsonl], tmp_path / "out", num_files=1, progress=False, fields=fields)
    assert (stats.documents, stats.null_texts, stats.bad_json_lines) == (6, 1, 1)


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (None, r"a\.parquet: no column 'text' \(--text-field\); columns: id \(int64\), body \(string\)$"),
        (pa.array([1, 2, 3]), r"column 'text' \(--text-field\) is a column of int64, not of strings; columns: id"),
        (
            pa.array([["a"], ["b"], ["c"]]),
            r"column 'text' \(--text-field\) is a nested column of list<element: string>, not of strings",
        ),
        (
            pa.array([{"t": "a"}, {"t": "b"}, {"t": "c"}]),
            r"column 'text' \(--text-field\) is a nested column of struct<t: string>, not of strings",
        ),
    ],
    ids=["missing", "int64", "list", "struct"],
)
def test_a_missing_or_unfit_text_column_is_refused_before_any_work(
    tmp_path: Path, column: pa.Array | None, message: str
) -> None:
    rows = [{"id": i, "body": f"Text {i}."} for i in range(3)]
    path = write_parquet(tmp_path / "a.parquet", rows, **({"text": column} if column is not None else {}))
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match=message):
        write_corpus([path], out, progress=False)
    assert not out.exists()


def test_a_title_column_of_another_type_and_a_missing_one_are_refused(tmp_path: Path) -> None:
    rows = [{"text": "A text.", "tags": ["x"]}]
    path = write_parquet(tmp_path / "a.parquet", rows)
    with pytest.raises(DataPrepError, match=r"no column 'name' \(--title-field\); columns: text \(string\), tags"):
        list(iter_documents(path, "auto", fields=Fields("text", "name")))
    with pytest.raises(DataPrepError, match=r"'tags' \(--title-field\) is a nested column of list<element: string>"):
        list(iter_documents(path, "auto", fields=Fields("text", "tags")))


def test_a_file_that_is_not_parquet_and_a_compressed_one_are_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet at all\n")
    with pytest.raises(DataPrepError, match=r"fake\.parquet: not a readable Parquet file \("):
        write_corpus([fake], tmp_path / "out", progress=False)
    packed = tmp_path / "a.parquet.gz"
    packed.write_bytes(b"\x1f\x8b")
    assert detect_format(packed) == "parquet"
    with pytest.raises(DataPrepError, match=r"a\.parquet\.gz: a compressed Parquet file cannot be read by row group"):
        write_corpus([packed], tmp_path / "out2", progress=False)


def test_an_empty_parquet_file_and_a_table_without_rows_are_counted(tmp_path: Path) -> None:
    (tmp_path / "empty.parquet").write_bytes(b"")
    write_parquet(tmp_path / "none.parquet", [], text=pa.array([], pa.string()))
    good = write_parquet(tmp_path / "good.parquet", [{"text": "One doc. Two sentences."}])
    stats = write_corpus([tmp_path], tmp_path / "out", num_files=1, progress=False)
    assert (stats.files, stats.empty_files, stats.documents) == (3, 1, 1)
    assert read_corpus(tmp_path / "out") == [[["One doc.", "Two sentences."]]] and good.exists()


def test_json_lines_whose_objects_lack_the_text_field_are_refused_naming_their_keys(tmp_path: Path) -> None:
    few = write_jsonl(tmp_path / "few.jsonl", [{"id": 1, "body": "x"}, {"id": 2, "body": "y", "extra": 0}])
    with pytest.raises(DataPrepError, match=r'few\.jsonl: no "text" field \(--text-field\) in its first 2 JSON'):
        list(iter_documents(few, "auto"))
    with pytest.raises(DataPrepError, match=r"keys found: id, body, extra$"):
        list(iter_documents(few, "auto"))
    assert list(iter_documents(few, "auto", fields=Fields("body"))) == [["x"], ["y"]]
    # many lines: refused after the first FIELD_PROBE_OBJECTS, not at the end
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"body": f"Doc {i}."}) + "\n" for i in range(FIELD_PROBE_OBJECTS + 50)))
    with pytest.raises(DataPrepError, match=rf"in its first {FIELD_PROBE_OBJECTS} JSON object\(s\); keys found: body"):
        list(iter_documents(many, "auto"))
    # the field in an early object: later objects without it are only bad lines
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "Has it."}] + [{"body": "not"}] * (FIELD_PROBE_OBJECTS + 1))
    from data_prep.readers import ReadStats

    stats = ReadStats()
    assert list(iter_documents(mixed, "auto", stats)) == [["Has it."]]
    assert stats.bad_json_lines == FIELD_PROBE_OBJECTS + 1


def test_the_command_takes_the_fields_and_refuses_in_one_line(tmp_path: Path) -> None:
    rows = [{"id": i, "body": f"Text number {i}. More text {i}."} for i in range(30)]
    path = write_parquet(tmp_path / "in.parquet", rows, rows_per_group=4)
    base = [sys.executable, "-m", "data_prep", "corpus", "--input", str(path), "--num-files", "2", "--mpi", "off"]
    refused = subprocess.run(base + ["--output", str(tmp_path / "no")], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    [line] = [line for line in refused.stderr.splitlines() if " ERROR " in line]
    assert line.endswith(f"{path}: no column 'text' (--text-field); columns: id (int64), body (string)"), line
    assert not (tmp_path / "no").exists()
    done = subprocess.run(
        base
        + ["--output", str(tmp_path / "yes"), "--text-field", "body", "--title-field", "id", "--part-mb", "0.0001"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    docs = [doc for docs in read_corpus(tmp_path / "yes") for doc in docs]
    assert docs == [[f"Text number {i}.", f"More text {i}."] for i in range(30)]
    settings = json.loads((tmp_path / "yes" / ".corpus.json").read_text())["settings"]
    assert (settings["text_field"], settings["title_field"]) == ("body", "id")


@pytest.mark.integration
def test_resume_after_a_killed_parquet_part_gives_a_clean_runs_bytes(excerpt_files, tmp_path: Path) -> None:
    """The worker reading row groups of part p000003 is killed (SIGKILL); the run ends naming the part and its row
    groups; --resume keeps the parts finished before and writes the uninterrupted run's files."""
    parquet, _, _ = excerpt_files
    args = ["corpus", "--input", str(parquet), "--num-files", "3", "--workers", "1", "--mpi", "off"]
    args += ["--part-mb", "0.02"]  # about 20 kB: a part of one or two row groups
    clean = subprocess.run(
        [sys.executable, "-m", "data_prep", *args, "--output", str(tmp_path / "clean")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, str(FAULT), "--fault", "kill-corpus:p000003", *args, "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert killed.returncode == 2, killed.stderr
    [error] = [line for line in killed.stderr.splitlines() if " ERROR " in line]
    assert f"part p000003 ({parquet} (row groups " in error and "killed by SIGKILL" in error, error
    assert "--resume" in error
    planned = len(plan_parts([parquet], "auto", int(0.02 * (1 << 20))))
    done = {m.stem for m in (out / ".work" / "done").glob("p*.json")}  # (the biggest parts go first)
    assert "p000003" not in done and 0 < len(done) < planned - 1, (sorted(done), planned)
    resumed = subprocess.run(
        [sys.executable, "-m", "data_prep", *args, "--output", str(out), "--resume"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(out) == snapshot(tmp_path / "clean") and len(snapshot(out)) == 3
    assert not (out / ".work").exists()


@pytest.mark.integration
def test_an_edited_footer_makes_every_part_of_the_file_again(tmp_path: Path) -> None:
    """Every part of a Parquet file is read by its footer (schema, row-group index), which lies in the file's last
    part: a run killed while writing its output files, then the footer edited in place (size and mtime kept):
    --resume makes all the file's parts again, and gives a clean run's bytes."""
    from test_corpus import edit_in_place

    rows = [{"id": i, "text": f"Row {i} says something. Its second sentence {i}."} for i in range(40)]
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"note": "footer-note-one"})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=5)
    args = ["corpus", "--input", str(path), "--num-files", "3", "--workers", "1", "--mpi", "off"]
    args += ["--part-mb", "0.0001"]  # a part per row group
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, str(FAULT), "--fault", "kill-corpus:out-00001", *args, "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert killed.returncode == 2 and "output file" in killed.stderr, killed.stderr
    assert len(list((out / ".work" / "done").glob("p*.json"))) == 8
    footer = path.read_bytes().rindex(b"footer-note-one")
    edit_in_place(path, footer, footer + 15, b"one", b"two", keep_mtime=True)
    resumed = subprocess.run(
        [sys.executable, "-m", "data_prep", *args, "--output", str(out), "--resume"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "the bytes of part p000007 (bytes " in resumed.stderr, resumed.stderr
    assert f"{path}: its footer changed: all 8 parts of the file are made again" in resumed.stderr, resumed.stderr
    clean = subprocess.run(
        [sys.executable, "-m", "data_prep", *args, "--output", str(tmp_path / "clean")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert clean.returncode == 0, clean.stderr
    assert snapshot(out) == snapshot(tmp_path / "clean")


@pytest.mark.slow
def test_memory_of_reading_does_not_grow_with_a_row_group(tmp_path: Path) -> None:
    """One row group of 20 MB and one of 100 MB (uncompressed, so the stored column chunk is as big): reading every
    document of either peaks at about the same memory, far below the bigger chunk."""
    # (VmHWM, the peak of this program's own memory: ru_maxrss would keep that of the forked test process)
    code = (
        "import re, sys; from pathlib import Path; from data_prep.readers import iter_documents; "
        "n = sum(1 for _ in iter_documents(Path(sys.argv[1]), 'auto')); "
        "print(n, int(re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024)"
    )
    peaks = {}
    for mb in (20, 100):
        rows = mb * 1000 // 8  # documents of about 8 kB
        texts = [f"Sentence number {i} of a long story. " * 220 for i in range(rows)]
        path = tmp_path / f"{mb}.parquet"
        pq.write_table(pa.table({"text": texts}), path, row_group_size=rows, compression="none")
        del texts
        assert pq.ParquetFile(path).metadata.num_row_groups == 1 and path.stat().st_size > mb * 1e6
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        documents, peaks[mb] = map(int, proc.stdout.split())
        assert documents == rows
        path.unlink()
    assert peaks[100] - peaks[20] < 20e6, peaks
