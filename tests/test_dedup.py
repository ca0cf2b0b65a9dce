"""Exact deduplication and decontamination in the corpus step (`--dedup`, `--exclude-overlap`): duplicates planted
across sources, files, parts and workers removed once, the first kept; boilerplate lines removed above N only;
documents sharing a 13-gram with an evaluation text dropped; the same bytes for 1 and 2 workers, any part size and
a real `mpirun -np 2`; the counts per source in .corpus.json; a run killed by SIGKILL and resumed gives a clean
run's bytes; `prepare` and slurm/prep.sbatch pass the options through."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_corpus import FAULT, read_corpus, snapshot, write_docs

from data_prep import cli
from data_prep.corpus import write_corpus
from data_prep.dedup import DedupSettings, ngram_hashes, normalised, overlap_tokens
from data_prep.errors import DataPrepError
from data_prep.mixture import InputSource
from data_prep.mpi import World
from data_prep.parquet import Fields

NFD_CAFE = unicodedata.normalize("NFD", "café")


def docs_of(folder: Path) -> list[list[str]]:
    return [doc for docs in read_corpus(folder) for doc in docs]


def size(docs: list[list[str]]) -> int:
    """Bytes of documents as they stand in the corpus text, each with its blank line."""
    return sum(len("\n".join(d).encode()) + 2 for d in docs)


def planted(folder: Path) -> tuple[dict[str, Path], list[list[list[str]]]]:
    """Two sources: wiki (a big docs file cut into parts, and a second file) and books (JSON lines), with
    duplicates planted in the same part, across parts of one file, across files and across sources, one differing
    only in whitespace and Unicode normalisation; the documents of each source in input order."""
    folder.mkdir()
    big = [[f"Wiki article {i} is here.", f"It has a second sentence {i}."] for i in range(300)]
    big[1] = list(big[0])  # same part
    big[250] = list(big[3])  # another part of the same file
    big[260] = ["Wiki   article 7 is  here.", "It has a second sentence 7."]  # whitespace differs only
    big[100] = [f"The {NFD_CAFE} opened in 1900.", "It closed later."]
    for i in (50, 150, 280):  # a line in 4 documents (one in books)
        big[i].append("Share this page.")
    small = [["The café opened in 1900.", "It closed later."], list(big[10]), ["Only in the small file.", "Yes."]]
    books = [[f"Book {i} begins.", f"Then it ends {i}."] for i in range(40)]
    books[5] = list(big[20])  # across sources: removed, and not up-sampled by the weight of books
    books[30] = list(books[2])
    books[12].append("Share this page.")
    files = {"big": write_docs(folder / "big.txt", big), "small": write_docs(folder / "small.txt", small)}
    files["books"] = folder / "books.jsonl"
    files["books"].write_text("".join(json.dumps({"text": " ".join(d)}) + "\n" for d in books))
    return files, [big + small, books]


def first_of_each(sources: list[list[list[str]]]) -> tuple[list[list[list[str]]], list[list[list[str]]]]:
    """The reference: per source, the documents kept (the first of each normalised text, in source, file and
    document order) and those removed."""
    seen: set[str] = set()
    kept: list[list[list[str]]] = []
    removed: list[list[list[str]]] = []
    for docs in sources:
        kept.append([])
        removed.append([])
        for doc in docs:
            key = unicodedata.normalize("NFC", " ".join(" ".join(doc).split()))
            (removed if key in seen else kept)[-1].append(doc)
            seen.add(key)
    return kept, removed


def test_normalisation_is_nfc_with_whitespace_collapsed_and_case_kept() -> None:
    assert normalised(f"  The {NFD_CAFE}\t opened\n") == "The café opened"
    assert normalised("The Café") != normalised("the café")
    assert overlap_tokens(f'The {NFD_CAFE}, "opened" -- in 1900!') == ["the", "café", "opened", "in", "1900"]


def test_duplicates_across_sources_files_and_parts_are_removed_once_the_first_kept(tmp_path: Path) -> None:
    files, sources = planted(tmp_path / "in")
    inputs = [InputSource("wiki", (files["big"], files["small"])), InputSource("books", (files["books"],), 2.0)]
    kept, removed = first_of_each(sources)
    assert [len(r) for r in removed] == [5, 2]  # 1, 250, 260 and 2 of the small file; books 5 and 30
    kw = {"num_files": 3, "progress": False, "dedup": DedupSettings("documents")}
    one = write_corpus(inputs, tmp_path / "one", workers=1, part_bytes=1 << 20, **kw)
    two = write_corpus(inputs, tmp_path / "two", workers=2, part_bytes=3000, **kw)
    assert len(two.output_files) == 3
    assert docs_of(tmp_path / "one") == kept[0] + kept[1] + kept[1]
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")
    assert [s.to_json() for s in two.sources] == [s.to_json() for s in one.sources]
    summary = json.loads((tmp_path / "two" / ".corpus.json").read_text())
    assert summary["summary_version"] == 3 and summary["settings"]["dedup"]["mode"] == "documents"
    by_name = {s["name"]: s for s in summary["sources"]}
    for name, k, r, copies in (("wiki", kept[0], removed[0], 1), ("books", kept[1], removed[1], 2)):
        assert by_name[name]["removed"]["duplicate_documents"] == len(r)
        assert by_name[name]["removed"]["duplicate_bytes"] == size(r)
        assert by_name[name]["written"] == {
            "documents": copies * len(k),
            "sentences": copies * sum(len(d) for d in k),
            "bytes": copies * size(k),
        }
    assert summary["removed"]["duplicate_documents"] == 7 and two.removed.duplicate_documents == 7
    # the café of the big file (NFD) is kept, its NFC twin in the small file removed
    assert [f"The {NFD_CAFE} opened in 1900.", "It closed later."] in kept[0]
    assert ["The café opened in 1900.", "It closed later."] not in kept[0]
    # off (the default): nothing removed, and the settings as they always were
    write_corpus(inputs, tmp_path / "off", **{**kw, "dedup": DedupSettings()})
    off = json.loads((tmp_path / "off" / ".corpus.json").read_text())
    assert "dedup" not in off["settings"] and len(docs_of(tmp_path / "off")) == 303 + 80


def test_a_fractional_weight_draws_from_the_deduplicated_documents(tmp_path: Path) -> None:
    files, sources = planted(tmp_path / "in")
    from data_prep.mixture import drawn_documents

    kept, _ = first_of_each(sources)
    inputs = [InputSource("wiki", (files["big"], files["small"])), InputSource("books", (files["books"],), 0.5)]
    stats = write_corpus(
        inputs, tmp_path / "out", num_files=2, progress=False, weight_seed=3, dedup=DedupSettings("documents")
    )
    drawn = [kept[1][i] for i in drawn_documents(len(kept[1]), 19, 3, "books")]  # 38 books left: half drawn
    assert docs_of(tmp_path / "out") == kept[0] + drawn
    assert stats.sources[1].documents_written == 19 and stats.sources[1].removed.duplicate_documents == 2


def boilerplate_inputs(folder: Path) -> tuple[list[Path], list[list[str]]]:
    folder.mkdir()
    subscribe, read_more = "Subscribe to our newsletter.", "Read more below."
    docs = [[f"Story {i} starts.", f"Story {i} goes on."] for i in range(12)]
    for i in (0, 3, 6, 9):  # with document 2: 5 occurrences, more than 3: removed everywhere
        docs[i].append(subscribe)
    for i in (1, 4, 7):  # 3 occurrences: kept
        docs[i].insert(1, read_more)
    docs[2] = ["Story 2 starts.", subscribe]  # left with one line: removed, counted as emptied
    # a document repeated 5 times: its lines are counted once, in the copy kept
    repeated = ["Repeated document line one.", "Repeated document line two."]
    first = write_docs(folder / "a.txt", docs[:6] + [repeated, repeated])
    second = write_docs(folder / "b.txt", [repeated] + docs[6:] + [repeated, repeated])
    expected = [
        [line for line in doc if line != subscribe] for doc in docs[:6] + [repeated] + docs[6:] if doc != docs[2]
    ]
    return [first, second], expected


def test_paragraphs_removes_lines_repeated_more_than_n_times_only(tmp_path: Path) -> None:
    inputs, expected = boilerplate_inputs(tmp_path / "in")
    runs = {
        workers: write_corpus(
            inputs,
            tmp_path / f"w{workers}",
            num_files=2,
            workers=workers,
            progress=False,
            part_bytes=200 if workers == 2 else 1 << 20,
            dedup=DedupSettings("paragraphs", min_repeats=3),
        )
        for workers in (1, 2)
    }
    assert docs_of(tmp_path / "w1") == expected
    assert snapshot(tmp_path / "w2") == snapshot(tmp_path / "w1")
    removed = runs[2].removed
    assert (removed.duplicate_documents, removed.boilerplate_lines, removed.emptied_documents) == (4, 5, 1)
    line = len(b"Subscribe to our newsletter.\n")
    assert removed.boilerplate_bytes == 4 * line + len(b"Story 2 starts.\nSubscribe to our newsletter.\n\n")
    # with N = 5 nothing is boilerplate
    write_corpus(inputs, tmp_path / "n5", num_files=2, progress=False, dedup=DedupSettings("paragraphs", 5))
    assert sum("Subscribe to our newsletter." in doc for doc in docs_of(tmp_path / "n5")) == 5


def overlap_inputs(folder: Path) -> tuple[Path, Path, Path, list[list[str]], list[int]]:
    """An evaluation text and two sources; the indices of the documents that share a 13-gram with it."""
    folder.mkdir()
    passage = "the quick brown fox jumps over the lazy dog while seven wise owls watch it silently from afar"
    evaluation = folder / "eval.txt"
    evaluation.write_text(f"Question one.\n\n{passage.capitalize()}.\nAnother line of it.\n")
    words = passage.split()
    docs = [[f"Plain document number {i} here.", "Nothing to see."] for i in range(10)]
    docs[2] = ["Intro sentence.", "The QUICK brown fox, jumps over the lazy dog while seven wise owls watch!"]  # 13
    docs[5] = ["Almost: " + " ".join(words[:12]) + ".", "Then something else entirely."]  # 12 only: kept
    docs[7] = [" ".join(words[3:9]) + ".", " ".join(words[9:17]).capitalize() + "."]  # 14 across two lines
    # "question one" + 11 words would be a 13-gram if the evaluation text's blocks were joined: they are not
    docs[8] = ["Question one.", " ".join(words[:11]).capitalize() + ".", "Nothing more."]
    first = write_docs(folder / "a.txt", docs[:6])
    second = write_docs(folder / "b.txt", docs[6:])
    return evaluation, first, second, docs, [2, 7]


def test_exclude_overlap_drops_exactly_the_documents_sharing_a_13_gram(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    evaluation, first, second, docs, dropped = overlap_inputs(tmp_path / "in")
    caplog.set_level("INFO")
    stats = write_corpus(
        [InputSource("a", (first,)), InputSource("b", (second,))],
        tmp_path / "out",
        num_files=1,
        progress=False,
        dedup=DedupSettings(exclude_overlap=(evaluation,)),
    )
    assert docs_of(tmp_path / "out") == [d for i, d in enumerate(docs) if i not in dropped]
    assert [s.removed.overlap_documents for s in stats.sources] == [1, 1]
    assert [s.removed.overlap_bytes for s in stats.sources] == [size([docs[2]]), size([docs[7]])]
    assert stats.removed.duplicate_documents == 0
    assert "13-grams in 1 evaluation file(s)" in caplog.text
    assert "source a: 1 documents (0.0 MB) dropped for a 13-gram shared with the evaluation texts" in caplog.text
    summary = json.loads((tmp_path / "out" / ".corpus.json").read_text())
    assert summary["settings"]["dedup"]["exclude_overlap"][0]["path"] == str(evaluation.resolve())
    # n = 12 also catches document 5
    write_corpus(
        [first, second],
        tmp_path / "n12",
        num_files=1,
        progress=False,
        dedup=DedupSettings(exclude_overlap=(evaluation,), overlap_ngram=12),
    )
    assert len(docs_of(tmp_path / "n12")) == 7


def test_ngram_hashes_match_a_plain_window() -> None:
    tokens = [f"w{i}" for i in range(20)]
    hashes = ngram_hashes(tokens, 13)
    assert len(hashes) == 8 and len(set(hashes.tolist())) == 8
    assert ngram_hashes(tokens[3:16], 13)[0] == hashes[3] and len(ngram_hashes(tokens[:12], 13)) == 0


def test_bad_dedup_settings_are_one_line_errors(tmp_path: Path) -> None:
    src = write_docs(tmp_path / "in.txt", [["a b.", "c d."]])
    with pytest.raises(DataPrepError, match=r"missing\.txt: no such file \(--exclude-overlap\)"):
        write_corpus([src], tmp_path / "out", dedup=DedupSettings(exclude_overlap=(tmp_path / "missing.txt",)))
    with pytest.raises(DataPrepError, match="unknown dedup mode 'lines'"):
        write_corpus([src], tmp_path / "out", dedup=DedupSettings("lines"))
    assert not (tmp_path / "out").exists()


def test_resume_refuses_other_dedup_settings(tmp_path: Path) -> None:
    src = write_docs(tmp_path / "in.txt", [["a b.", "c d."], ["a b.", "c d."]])
    write_corpus([src], tmp_path / "out", num_files=1, progress=False, dedup=DedupSettings("documents"))
    with pytest.raises(DataPrepError, match="already complete, but made with other settings"):
        write_corpus([src], tmp_path / "out", num_files=1, progress=False, resume=True)
    again = write_corpus(
        [src], tmp_path / "out", num_files=1, progress=False, resume=True, dedup=DedupSettings("documents")
    )
    assert again.removed.duplicate_documents == 1


def test_the_command_line_flags_reach_the_corpus_step(tmp_path: Path) -> None:
    evaluation, first, second, docs, dropped = overlap_inputs(tmp_path / "in")
    args = ["corpus", "--input", str(first), str(second), "--output", str(tmp_path / "out"), "--num-files", "1"]
    args += ["--dedup", "paragraphs", "--dedup-min-repeats", "1", "--exclude-overlap", str(evaluation)]
    assert cli.main([*args, "--overlap-ngram", "13", "--no-progress", "--mpi", "off"]) == 0
    summary = json.loads((tmp_path / "out" / ".corpus.json").read_text())
    assert summary["settings"]["dedup"]["mode"] == "paragraphs" and summary["settings"]["dedup"]["min_repeats"] == 1
    assert summary["removed"]["overlap_documents"] == 2
    # "Nothing to see." is in 6 of the kept documents: boilerplate above 1, and those documents are left with one line
    assert summary["removed"]["emptied_documents"] == 6


def test_decisions_of_one_rank_keep_the_first_in_order() -> None:
    from data_prep.dedup import _first_of_each

    hashes = np.array([[5, 1], [5, 1], [7, 2], [5, 1], [7, 3]], dtype=np.uint64)
    orders = np.array([9, 4, 1, 6, 0], dtype=np.int64)
    assert _first_of_each(hashes[:, 0], hashes[:, 1], orders).tolist() == [True, False, False, True, False]
    rows, got = World().alltoallv(orders, [5])
    assert rows is orders and got == [5]


# --- real processes ---------------------------------------------------------------------------------------------


def _corpus_command(files: dict[str, Path], out: Path, evaluation: Path, *extra: str) -> list[str]:
    return [
        "corpus",
        "--input",
        f"wiki={files['big']}",
        f"wiki={files['small']}",
        f"books={files['books']}",
        "--weights",
        "books=1.5",
        "--output",
        str(out),
        "--num-files",
        "3",
        "--part-mb",
        "0.003",
        "--dedup",
        "paragraphs",
        "--dedup-min-repeats",
        "2",
        "--exclude-overlap",
        str(evaluation),
        "--overlap-ngram",
        "5",
        "--no-progress",
        *extra,
    ]


def _real_inputs(tmp_path: Path) -> tuple[dict[str, Path], Path]:
    files, _ = planted(tmp_path / "in")
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text("Wiki article 42 is here. It has\n")
    return files, evaluation


def _albert_data(*args: str, fault: str | None = None, mpirun: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "data_prep"] if fault is None else [sys.executable, str(FAULT), "--fault", fault]
    return subprocess.run([*(mpirun or []), *command, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.mpi
def test_two_mpi_ranks_write_the_same_deduplicated_corpus(tmp_path: Path) -> None:
    """Parts dealt to two ranks: the hashes of each go to the rank that owns them, the answers come back; the same
    bytes and counts as one process with 2 workers."""
    files, evaluation = _real_inputs(tmp_path)
    ref = _albert_data(*_corpus_command(files, tmp_path / "ref", evaluation, "--mpi", "off", "--workers", "2"))
    assert ref.returncode == 0, ref.stderr
    mpirun = shutil.which("mpirun")
    assert mpirun, "OpenMPI is installed by `make test` (.ci/system-deps.sh)"
    launcher = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2"]
    proc = _albert_data(*_corpus_command(files, tmp_path / "mpi", evaluation, "--mpi", "on"), mpirun=launcher)
    assert proc.returncode == 0, proc.stderr
    assert "MPI rank 1 of 2" in proc.stdout
    assert snapshot(tmp_path / "mpi") == snapshot(tmp_path / "ref")
    ref_summary = json.loads((tmp_path / "ref" / ".corpus.json").read_text())
    mpi_summary = json.loads((tmp_path / "mpi" / ".corpus.json").read_text())
    assert mpi_summary["sources"] == ref_summary["sources"]
    removed = mpi_summary["removed"]
    # the 7 planted duplicates; article 42 overlaps; "Share this page." in 4 documents (more than 2)
    assert (removed["duplicate_documents"], removed["overlap_documents"], removed["boilerplate_lines"]) == (7, 1, 4)
    assert "source wiki: 5 duplicate documents" in proc.stderr, proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["kill-corpus:p000002-d", "kill-corpus:out-00001"])
def test_resume_after_sigkill_gives_a_clean_runs_bytes(fault: str, tmp_path: Path) -> None:
    """Killed (SIGKILL) while writing a deduplicated part, or an output file: --resume decides again (the same
    decisions), keeps what was finished and writes what a clean run writes."""
    files, evaluation = _real_inputs(tmp_path)
    out = tmp_path / "out"
    killed = _albert_data(*_corpus_command(files, out, evaluation, "--mpi", "off"), fault=fault)
    assert killed.returncode == 2 and "killed by SIGKILL" in killed.stderr, killed.stderr
    done = sorted(m.name for m in (out / ".work" / "done").glob("p*-d.json"))
    if fault.endswith("out-00001"):
        assert done, sorted(m.name for m in (out / ".work" / "done").iterdir())
    resumed = _albert_data(*_corpus_command(files, out, evaluation, "--mpi", "off", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    clean = _albert_data(*_corpus_command(files, tmp_path / "clean", evaluation, "--mpi", "off"))
    assert clean.returncode == 0, clean.stderr
    assert snapshot(out) == snapshot(tmp_path / "clean")
    summary, reference = (json.loads((folder / ".corpus.json").read_text()) for folder in (out, tmp_path / "clean"))
    assert summary["sources"] == reference["sources"] and summary["removed"]["duplicate_documents"] == 7


@pytest.mark.slow
def test_prepare_passes_the_dedup_options_to_the_corpus_step(spm_model: Path, tmp_path: Path) -> None:
    files, evaluation = _real_inputs(tmp_path)
    out = tmp_path / "data"
    args = ["prepare", "--input", f"wiki={files['big']}", f"books={files['books']}", "--output", str(out)]
    args += ["--dedup", "documents", "--exclude-overlap", str(evaluation), "--overlap-ngram", "5"]
    args += ["--spm-model", str(spm_model), "--num-files", "2", "--dupe-factor", "1", "--num-shards", "1"]
    assert cli.main([*args, "--no-progress", "--mpi", "off"]) == 0
    summary = json.loads((out / "corpus" / ".corpus.json").read_text())
    assert summary["settings"]["dedup"]["overlap_ngram"] == 5
    assert (summary["removed"]["duplicate_documents"], summary["removed"]["overlap_documents"]) == (5, 1)
    assert json.loads((out / "shards" / "manifest.json").read_text())["num_examples"] > 0


def test_fields_and_dedup_together_read_parquet_text(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"body": ["One doc. Two lines.", "Other doc. More text.", "One  doc. Two lines."]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=1)
    stats = write_corpus(
        [tmp_path / "in.parquet"],
        tmp_path / "out",
        num_files=1,
        progress=False,
        fields=Fields("body"),
        part_bytes=1,
        dedup=DedupSettings("documents"),
    )
    assert stats.removed.duplicate_documents == 1 and docs_of(tmp_path / "out") == [
        ["One doc.", "Two lines."],
        ["Other doc.", "More text."],
    ]
