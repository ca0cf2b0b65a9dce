"""Weighted mixtures of sources: `--input NAME=PATH ... --weights NAME=W`: whole copies plus a seeded draw, exact
counts per source in .corpus.json, the same bytes for 1 and 2 workers, any part size and a real `mpirun -np 2`;
the sources and weights as the command line gives them; `prepare` passes the options through."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from test_corpus import FAULT, edit_in_place, read_corpus, snapshot, write_docs

from data_prep import cli
from data_prep.corpus import write_corpus
from data_prep.errors import DataPrepError
from data_prep.mixture import InputSource, drawn_count, drawn_documents, parse_sources

N_WIKI, N_BOOKS, N_NEWS = 40, 50, 30
SEED = 7


def wiki_docs() -> list[list[str]]:
    return [[f"Wiki doc {i} says hello.", f"Its second line {i}."] for i in range(N_WIKI)]


def book_docs() -> list[list[str]]:
    return [[f"Book {i} begins here.", f"Then it ends {i}."] for i in range(N_BOOKS)]


def news_docs() -> list[list[str]]:
    return [[f"News story {i} says hello.", f"More news {i}."] for i in range(N_NEWS)]


def make_sources(folder: Path) -> dict[str, Path]:
    """Three sources in three formats: a docs file, a JSON lines file (text in "body"), a Parquet file (row groups
    of 4 rows, text in "body", stored uncompressed so that its text can be edited in place)."""
    folder.mkdir()
    wiki = write_docs(folder / "wiki.txt", wiki_docs())
    books = folder / "books.jsonl"
    books.write_text("".join(json.dumps({"id": i, "body": " ".join(d)}) + "\n" for i, d in enumerate(book_docs())))
    news = folder / "news.parquet"
    table = pa.table({"id": list(range(N_NEWS)), "body": [" ".join(d) for d in news_docs()]})
    pq.write_table(table, news, row_group_size=4, compression="none")
    return {"wiki": wiki, "books": books, "news": news}


def weighted(paths: dict[str, Path]) -> list[InputSource]:
    return [
        InputSource("wiki", (paths["wiki"],), 1.0),
        InputSource("books", (paths["books"],), 2.5),
        InputSource("news", (paths["news"],), 0.4),
    ]


def corpus_docs(folder: Path) -> list[list[str]]:
    return [doc for docs in read_corpus(folder) for doc in docs]


def test_sources_and_weights_from_the_command_line(tmp_path: Path) -> None:
    odd = tmp_path / "a=b.txt"  # a plain path with "=" in its name: it exists, so it is a path
    odd.write_text("x\n")
    sources = parse_sources(
        ["wiki=enwiki/", "books=books/", str(odd), "plain.txt", "wiki=more/"], [("books", 2.0), (str(odd), 0.5)]
    )
    assert sources == [
        InputSource("wiki", (Path("enwiki/"), Path("more/")), 1.0),
        InputSource("books", (Path("books/"),), 2.0),
        InputSource(str(odd), (odd,), 0.5),
        InputSource("plain.txt", (Path("plain.txt"),), 1.0),
    ]
    assert [s.copies for s in sources] == [1, 2, 0, 1] and sources[2].fraction * 2 == 1
    assert (
        InputSource("x", (), 2.3).fraction == pytest.approx(0.3)
        and InputSource("x", (), 2.3).fraction.denominator == 10
    )
    with pytest.raises(DataPrepError, match=r"--weights: no source 'news' in --input \(sources: wiki, books\)"):
        parse_sources(["wiki=a", "books=b"], [("news", 2.0)])
    with pytest.raises(DataPrepError, match="--weights: books is given twice"):
        parse_sources(["wiki=a", "books=b"], [("books", 2.0), ("books", 3.0)])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("books=0", "argument --weights: books: weight must be a number in (0, 1000], got '0'"),
        ("books=nan", "argument --weights: books: weight must be a number in (0, 1000], got 'nan'"),
        ("books=1001", "argument --weights: books: weight must be a number in (0, 1000], got '1001'"),
        ("books", "argument --weights: must be NAME=WEIGHT (a source of --input and its weight), got 'books'"),
    ],
)
def test_a_bad_weight_is_a_one_line_usage_error(value: str, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["corpus", "--input", "books=in", "--output", "out", "--weights", value])
    assert exit_info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.endswith(message), line


def test_drawn_count_rounds_half_up_and_the_draw_is_seeded() -> None:
    from fractions import Fraction

    assert [drawn_count(n, Fraction(1, 2)) for n in (0, 1, 2, 3)] == [0, 1, 1, 2]
    assert drawn_count(30, Fraction(2, 5)) == 12 and drawn_count(50, Fraction(1, 2)) == 25
    one = drawn_documents(1000, 300, 1, "books")
    assert len(one) == len(set(one.tolist())) == 300 and list(one) == sorted(one) and one[-1] < 1000
    assert list(one) == list(drawn_documents(1000, 300, 1, "books"))
    assert list(one) != list(drawn_documents(1000, 300, 2, "books"))
    assert list(one) != list(drawn_documents(1000, 300, 1, "wiki"))
    assert len(drawn_documents(5, 0, 1, "x")) == 0 and list(drawn_documents(5, 5, 1, "x")) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_weights_give_exact_counts_the_same_for_1_and_2_workers_and_any_parts(tmp_path: Path) -> None:
    """wiki 1 (40 documents), books 2.5 (50: two copies and 25 drawn), news 0.4 (30: 12 drawn): 177 documents, in
    the order wiki, books, books, the drawn books, the drawn news; the drawn ones in their sources' order."""
    paths = make_sources(tmp_path / "in")
    from data_prep.parquet import Fields

    kw = {"num_files": 4, "progress": False, "fields": Fields("body"), "weight_seed": SEED}
    runs = {
        (workers, part): write_corpus(
            weighted(paths), tmp_path / f"w{workers}-{part}", workers=workers, part_bytes=part, **kw
        )
        for workers, part in ((1, 1 << 20), (2, 300), (1, 300))
    }
    one = runs[1, 1 << 20]
    for (workers, part), stats in runs.items():
        assert snapshot(tmp_path / f"w{workers}-{part}") == snapshot(tmp_path / f"w1-{1 << 20}"), (workers, part)
        assert [s.to_json() for s in stats.sources] == [s.to_json() for s in one.sources]
    docs = corpus_docs(tmp_path / f"w1-{1 << 20}")
    books, news = book_docs(), news_docs()
    drawn_books = [books[i] for i in drawn_documents(N_BOOKS, 25, SEED, "books")]
    drawn_news = [news[i] for i in drawn_documents(N_NEWS, 12, SEED, "news")]
    assert docs == wiki_docs() + books + books + drawn_books + drawn_news
    assert len(docs) == 40 + 100 + 25 + 12 == 177
    # the drawn documents: distinct, in their source's order
    assert len({tuple(d) for d in drawn_books}) == 25 and sorted(drawn_books, key=books.index) == drawn_books
    summary = json.loads((tmp_path / "w2-300" / ".corpus.json").read_text())
    counts = {
        s["name"]: (s["weight"], s["files"], s["read"]["documents"], s["read"]["sentences"]) for s in summary["sources"]
    }
    assert counts == {"wiki": (1.0, 1, 40, 80), "books": (2.5, 1, 50, 100), "news": (0.4, 1, 30, 60)}
    written = {s["name"]: s["written"] for s in summary["sources"]}

    def size(part: list[list[str]]) -> int:
        return sum(len("\n".join(d).encode()) + 2 for d in part)

    assert written == {
        "wiki": {"documents": 40, "sentences": 80, "bytes": size(wiki_docs())},
        "books": {"documents": 125, "sentences": 250, "bytes": 2 * size(books) + size(drawn_books)},
        "news": {"documents": 12, "sentences": 24, "bytes": size(drawn_news)},
    }
    assert {s["name"]: s["read"]["bytes"] for s in summary["sources"]} == {
        name: path.stat().st_size for name, path in paths.items()
    }
    # each output file ends without the blank line after its last document
    assert sum(w["bytes"] for w in written.values()) == one.bytes_written + len(one.output_files)
    assert summary["read"]["documents"] == one.documents == 120  # read: each document once
    assert summary["settings"]["weights"] == [["wiki", 1.0, 1], ["books", 2.5, 1], ["news", 0.4, 1]]
    assert summary["settings"]["weight_seed"] == SEED
    # another seed draws other documents, as many
    other = write_corpus(weighted(paths), tmp_path / "seed8", **{**kw, "weight_seed": 8})
    assert [s.documents_written for s in other.sources] == [40, 125, 12]
    assert corpus_docs(tmp_path / "seed8")[:140] == docs[:140] and corpus_docs(tmp_path / "seed8") != docs


def test_whole_weights_repeat_the_source_and_plain_paths_are_unchanged(tmp_path: Path) -> None:
    paths = make_sources(tmp_path / "in")
    plain = write_corpus([paths["wiki"]], tmp_path / "plain", num_files=2, progress=False)
    named = write_corpus([InputSource("wiki", (paths["wiki"],))], tmp_path / "named", num_files=2, progress=False)
    assert snapshot(tmp_path / "plain") == snapshot(tmp_path / "named")
    summary = json.loads((tmp_path / "plain" / ".corpus.json").read_text())
    assert summary["settings"]["weights"] is None and summary["settings"]["weight_seed"] is None
    assert [s.name for s in plain.sources] == [str(paths["wiki"])] and named.sources[0].name == "wiki"
    three = write_corpus([InputSource("wiki", (paths["wiki"],), 3)], tmp_path / "three", num_files=2, progress=False)
    assert corpus_docs(tmp_path / "three") == wiki_docs() * 3 and three.sources[0].documents_written == 120
    assert three.documents == N_WIKI


def test_a_file_in_two_sources_one_weighted_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = make_sources(tmp_path / "in")
    folder = paths["wiki"].parent
    with pytest.raises(DataPrepError, match=r"wiki\.txt: in sources 'all' and 'wiki', one of them weighted"):
        write_corpus(
            [InputSource("all", (folder,)), InputSource("wiki", (paths["wiki"],), 2)], tmp_path / "out", progress=False
        )
    assert not (tmp_path / "out").exists()
    # unweighted: the file stays in the first source, as a plain path given twice always did
    stats = write_corpus(
        [InputSource("wiki", (paths["wiki"],)), InputSource("again", (paths["wiki"],))],
        tmp_path / "ok",
        num_files=1,
        progress=False,
    )
    assert [(s.name, s.files, s.documents_written) for s in stats.sources] == [("wiki", 1, 40), ("again", 0, 0)]
    assert "source again: all its files are in an earlier source already" in caplog.text


@pytest.mark.slow
def test_prepare_passes_the_fields_and_weights_to_the_corpus_step(spm_model: Path, tmp_path: Path) -> None:
    paths = make_sources(tmp_path / "in")
    out = tmp_path / "data"
    args = ["prepare", "--input", f"books={paths['books']}", f"news={paths['news']}", "--output", str(out)]
    args += ["--text-field", "body", "--weights", "news=2", "--weight-seed", "3", "--spm-model", str(spm_model)]
    args += ["--num-files", "2", "--dupe-factor", "1", "--num-shards", "1", "--no-progress", "--mpi", "off"]
    assert cli.main(args) == 0
    summary = json.loads((out / "corpus" / ".corpus.json").read_text())
    assert summary["settings"]["text_field"] == "body"
    assert [(s["name"], s["written"]["documents"]) for s in summary["sources"]] == [("books", 50), ("news", 60)]
    assert corpus_docs(out / "corpus") == book_docs() + news_docs() * 2
    assert json.loads((out / "shards" / "manifest.json").read_text())["num_examples"] > 0


def _corpus_command(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    inputs = [f"{name}={path}" for name, path in paths.items()]
    return [
        "corpus",
        "--input",
        *inputs,
        "--output",
        str(out),
        "--weights",
        "books=2.5",
        "news=0.4",
        "--text-field",
        "body",
        "--weight-seed",
        str(SEED),
        "--num-files",
        "4",
        "--part-mb",
        "0.0003",
        *extra,
    ]


@pytest.mark.mpi
def test_two_mpi_ranks_write_the_same_weighted_corpus(tmp_path: Path) -> None:
    paths = make_sources(tmp_path / "in")
    ref = subprocess.run(
        [sys.executable, "-m", "data_prep", *_corpus_command(paths, tmp_path / "ref", "--mpi", "off")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr
    mpirun = shutil.which("mpirun")
    assert mpirun, "OpenMPI is installed by `make test` (.ci/system-deps.sh)"
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m", "data_prep"]
    proc = subprocess.run(
        cmd + _corpus_command(paths, tmp_path / "mpi", "--mpi", "on"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MPI rank 1 of 2" in proc.stdout
    assert snapshot(tmp_path / "mpi") == snapshot(tmp_path / "ref")
    assert len(corpus_docs(tmp_path / "mpi")) == 177
    summary = json.loads((tmp_path / "mpi" / ".corpus.json").read_text())
    assert [s["written"]["documents"] for s in summary["sources"]] == [40, 125, 12]
    assert "source books (weight 2.5, 1 file(s)): 50 documents, 100 sentences read" in proc.stderr, proc.stderr


@pytest.mark.integration
def test_resume_of_a_weighted_run_after_an_edit_in_place_gives_a_clean_runs_bytes(tmp_path: Path) -> None:
    """A weighted run killed (SIGKILL) while writing its output files, its drawn documents made; the Parquet source
    then edited in place in one row group (size and mtime kept): --resume makes that part again, and the drawn
    documents and output files, and writes what a clean run on the edited inputs writes."""
    paths = make_sources(tmp_path / "in")
    out = tmp_path / "out"

    def albert_data(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
        command = (
            [sys.executable, "-m", "data_prep"] if fault is None else [sys.executable, str(FAULT), "--fault", fault]
        )
        return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, timeout=300)

    killed = albert_data(*_corpus_command(paths, out, "--mpi", "off"), fault="kill-corpus:out-00001")
    assert killed.returncode == 2 and "output file" in killed.stderr, killed.stderr
    drawn = sorted(m.name for m in (out / ".work" / "done").glob("p*-w.json"))
    assert drawn, sorted(m.name for m in (out / ".work" / "done").iterdir())
    news = paths["news"]
    story = int(drawn_documents(N_NEWS, 12, SEED, "news")[0])  # a drawn one: the edit reaches the output
    at = news.read_bytes().index(f"News story {story} says".encode())
    edit_in_place(news, at, at + 30, b"says hello", b"SAYS HELLO", keep_mtime=True)
    resumed = albert_data(*_corpus_command(paths, out, "--mpi", "off", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    [warning] = [line for line in resumed.stderr.splitlines() if " WARNING " in line]
    assert f"{news.resolve()}: modified since the interrupted run (mtime as it was" in warning, warning
    assert "1 finished part(s) made again" in warning, warning
    clean = albert_data(*_corpus_command(paths, tmp_path / "clean", "--mpi", "off"))
    assert clean.returncode == 0, clean.stderr
    assert snapshot(out) == snapshot(tmp_path / "clean")
    assert f"News story {story} SAYS HELLO".encode() in b"".join(snapshot(out).values())
