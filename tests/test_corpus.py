"""The corpus step: standard format, balanced split, atomic output, workers and ranks, resume, a killed
worker, bounded open files, bad inputs."""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_wiki import EXPECTED_ARTICLE, make_dump

from data_prep.corpus import SUMMARY_VERSION, WORK_FORMAT, CorpusStats, plan_parts, write_corpus
from data_prep.errors import DataPrepError
from data_prep.readers import expand_inputs, iter_documents


def read_corpus(folder: Path, prefix: str = "corpus") -> list[list[list[str]]]:
    return [list(iter_documents(p, "docs")) for p in sorted(folder.glob(f"{prefix}-*.txt"))]


def write_docs(path: Path, docs: list[list[str]]) -> Path:
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("corpus-*.txt"))}


def test_standard_format_and_balanced_split(tmp_path: Path) -> None:
    # bytes of each document with its blank line: 101, 41, 31, 51, 11 (235 in all)
    docs = [["a" * 99], ["b" * 39], ["c" * 29], ["d" * 49], ["e" * 4, "f" * 4]]
    src = write_docs(tmp_path / "in.txt", docs)
    stats = write_corpus([src], tmp_path / "out", num_files=3, progress=False)
    # in input order, cut at the first document end at or after 235 * i // 3 = 78, 156: after a (101), after c (173)
    assert read_corpus(tmp_path / "out") == [[docs[0]], [docs[1], docs[2]], [docs[3], docs[4]]]
    files = [tmp_path / "out" / f"corpus-0000{i}.txt" for i in range(3)]
    assert files[1].read_text() == "b" * 39 + "\n\n" + "c" * 29 + "\n"  # blank line between, none at the end
    assert isinstance(stats, CorpusStats)
    assert stats.output_files == files
    assert stats.bytes_written == sum(f.stat().st_size for f in files) == 100 + 71 + 61
    assert (stats.documents, stats.sentences, stats.files) == (5, 6, 1)
    # no temporary files left; the hidden summary lets --resume recognise a finished run
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".corpus.json"] + [f.name for f in files]


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


def mixed_inputs(src: Path) -> Path:
    src.mkdir()
    (src / "a.xml.bz2").write_bytes(bz2.compress(make_dump().encode("utf-8")))
    lines = [
        json.dumps({"text": f"Document number {i}. It has {i % 5 + 1} words of text. " * (i % 3 + 1)})
        for i in range(300)
    ]
    (src / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_docs(src / "c.txt", [[f"Sentence {i}.", f"Another {i}."] for i in range(100)])
    (src / "d.xml").write_text(make_dump(), encoding="utf-8")
    return src


@pytest.mark.slow
def test_workers_give_byte_identical_output(tmp_path: Path) -> None:
    src = mixed_inputs(tmp_path / "in")
    # small parts: the docs file is cut in byte ranges, the JSON lines file is read by the main process and
    # cleaned by the workers in batches, the others are whole tasks
    parts = plan_parts(expand_inputs([src]), "auto", 2000)
    assert [p.fmt for p in parts if p.start is not None] == ["docs"] * 2
    assert [p.fmt for p in parts if p.streamed] == ["jsonl", "wiki"]
    runs = {
        (w, pb): write_corpus([src], tmp_path / f"w{w}-{pb}", num_files=5, workers=w, progress=False, part_bytes=pb)
        for w, pb in ((1, 2000), (2, 2000), (2, 1 << 20))
    }
    one = runs[1, 2000]
    for run in runs.values():
        assert snapshot(run.output_files[0].parent) == snapshot(one.output_files[0].parent)
        for name in ("documents", "sentences", "skipped_pages", "empty_documents", "bytes_written", "files"):
            assert getattr(run, name) == getattr(one, name), name
    assert one.documents == 2 * 2 + 300 + 100 and one.files == 4


def test_default_number_of_files_does_not_depend_on_workers(tmp_path: Path) -> None:
    src = write_docs(tmp_path / "a.txt", [[f"Doc {i}."] for i in range(20)])
    one = write_corpus([src], tmp_path / "w1", workers=1, progress=False)
    two = write_corpus([src], tmp_path / "w2", workers=2, progress=False)
    assert len(one.output_files) == len(two.output_files) == 4  # small corpus: the minimum
    assert snapshot(tmp_path / "w1") == snapshot(tmp_path / "w2")


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
    assert [p.name for p in out.iterdir()] == [".work"]  # only what --resume continues from
    with pytest.raises(DataPrepError, match="folder is not empty; pass --resume"):
        write_corpus([good], out, num_files=2, progress=False)


def test_no_documents_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataPrepError, match="no documents found"):
        write_corpus([empty], tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_files": -1}, "output files"), ({"workers": 0}, "workers"), ({"fmt": "csv"}, "format")],
)
def test_bad_settings_are_data_prep_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    src = write_docs(tmp_path / "a.txt", [["x."]])
    with pytest.raises(DataPrepError, match=message):
        write_corpus([src], tmp_path / "out", progress=False, **kwargs)


def test_fewer_documents_than_files_leaves_empty_files(tmp_path: Path) -> None:
    src = write_docs(tmp_path / "a.txt", [["One."], ["Two."]])
    stats = write_corpus([src], tmp_path / "out", num_files=4, progress=False)
    assert [p.stat().st_size for p in stats.output_files] == [5, 0, 5, 0]


def test_lee_news_stories_as_paragraphs(tmp_path: Path) -> None:
    """Real text: the Lee corpus (one story per line) from the same wheel as the excerpt."""
    from data_prep.sample_corpora import lee_background

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


def test_resume_skips_finished_parts_and_gives_the_same_files(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    good = {}
    for k in range(3):
        good[k] = write_docs(src / f"{k}.txt", [[f"File {k} doc {i}.", "Second."] for i in range(30)]).read_bytes()
    ref_dir = tmp_path / "ref"
    ref = write_corpus([src], ref_dir, num_files=3, progress=False)
    out = tmp_path / "out"
    (src / "2.txt").write_bytes(b"\0" + good[2][1:])  # same size: the same inputs for --resume
    with pytest.raises(DataPrepError, match=r"2\.txt: NUL byte at byte offset 0: binary data"):
        write_corpus([src], out, num_files=3, progress=False)
    assert sorted(p.name for p in (out / ".work" / "done").iterdir()) == ["p000000.json", "p000001.json"]
    assert not list(out.glob("corpus-*"))
    with pytest.raises(DataPrepError, match="folder is not empty; pass --resume"):
        write_corpus([src], out, num_files=3, progress=False)
    with pytest.raises(DataPrepError, match="--resume with other settings than the interrupted run"):
        write_corpus([src], out, num_files=4, progress=False, resume=True)
    (src / "2.txt").write_bytes(good[2])
    # a finished part is kept, not made again: altered on purpose, the alteration reaches the output
    kept = out / ".work" / "parts" / "p000000.txt"
    kept.write_bytes(kept.read_bytes().replace(b"File 0 doc 0.", b"FILE 0 DOC 0."))
    resumed = write_corpus([src], out, num_files=3, progress=False, resume=True)
    expected = {name: data.replace(b"File 0 doc 0.", b"FILE 0 DOC 0.") for name, data in snapshot(ref_dir).items()}
    assert snapshot(out) == expected != snapshot(ref_dir)
    assert (resumed.documents, resumed.bytes_written) == (ref.documents, ref.bytes_written)
    again = write_corpus([src], out, num_files=3, progress=False, resume=True)  # finished: only checked
    assert again.documents == ref.documents and snapshot(out) == expected


@pytest.mark.slow
def test_thousands_of_output_files_with_few_descriptors(tmp_path: Path) -> None:
    """At most one part file and one output file are open at a time: 3,000 files under a limit of 64."""
    src = write_docs(tmp_path / "a.txt", [[f"Doc {i}.", "Two."] for i in range(4000)])
    code = (
        "import resource, sys; from pathlib import Path; from data_prep.corpus import write_corpus; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
        "s = write_corpus([Path(sys.argv[1])], Path(sys.argv[2]), num_files=3000, progress=False); "
        "print(len(s.output_files), s.documents)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3000", "4000"]
    assert sum(len(d) for d in read_corpus(tmp_path / "out")) == 4000


def test_resume_of_a_streamed_file_keeps_its_finished_chunks(tmp_path: Path) -> None:
    """A JSON lines file above --part-mb is read by the main process and cleaned by the workers in chunks: a NUL
    byte near its end stops the run there; --resume, the file repaired, keeps the chunks finished before (one of
    them, altered on purpose, shows that it is not cleaned again) and gives the uninterrupted run's counts."""
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": f"Line {i} says something. It has a second sentence {i}."}) for i in range(12000)]
    data = ("\n".join(lines) + "\n").encode()
    src.write_bytes(data)
    kw = {"num_files": 2, "workers": 2, "progress": False, "part_bytes": 20_000}
    ref = write_corpus([src], tmp_path / "ref", **kw)
    src.write_bytes(data[:-10] + b"\0" + data[-9:])  # same size: the same inputs for --resume
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match=r"in\.jsonl: NUL byte at byte offset"):
        write_corpus([src], out, **kw)
    done = out / ".work" / "done"
    assert len(list(done.glob("p000000-c*.json"))) > 20 and not (done / "p000000.json").exists()
    first = out / ".work" / "parts" / "p000000-c00000.txt"
    first.write_bytes(first.read_bytes().replace(b"Line 0 says", b"LINE 0 SAYS"))
    src.write_bytes(data)
    resumed = write_corpus([src], out, resume=True, **kw)
    expected = b"".join(snapshot(tmp_path / "ref").values()).replace(b"Line 0 says", b"LINE 0 SAYS")
    assert b"".join(snapshot(out).values()) == expected
    for name in ("documents", "sentences", "files", "bytes", "bytes_written"):
        assert getattr(resumed, name) == getattr(ref, name), name
    assert not (out / ".work").exists()


def test_resume_refuses_other_work_formats_and_newer_folders(tmp_path: Path) -> None:
    """An interrupted run of another layout of `.work` cannot be continued; a finished folder made by a newer
    albert-data is refused, in one line each; one made by an older one, which recorded only the inputs' paths and
    sizes, is still complete (also with its input touched since)."""
    src = write_docs(tmp_path / "a.txt", [["One."], ["Two."]])
    out = tmp_path / "out"
    write_corpus([src], out, num_files=2, progress=False)
    summary = json.loads((out / ".corpus.json").read_text())
    assert summary["summary_version"] == SUMMARY_VERSION
    old = {k: v for k, v in summary.items() if k != "summary_version"}  # version 1
    old["settings"] = {**summary["settings"], "inputs": [{"path": str(src.resolve()), "bytes": src.stat().st_size}]}
    (out / ".corpus.json").write_text(json.dumps(old))
    os.utime(src, ns=(time.time_ns(), time.time_ns()))
    assert write_corpus([src], out, num_files=2, progress=False, resume=True).documents == 2
    (out / ".corpus.json").write_text(json.dumps({**summary, "summary_version": SUMMARY_VERSION + 1}))
    with pytest.raises(
        DataPrepError, match=rf"\.corpus\.json: made by a newer albert-data \(summary version {SUMMARY_VERSION + 1}"
    ):
        write_corpus([src], out, num_files=2, progress=False, resume=True)
    (out / ".work").mkdir()
    (out / ".work" / "settings.json").write_text(json.dumps({"settings": {}, "inputs": []}))
    with pytest.raises(DataPrepError, match=rf"work files of format 1, this version writes {WORK_FORMAT}\) cannot"):
        write_corpus([src], out, num_files=2, progress=False, resume=True)


def test_a_finished_folder_of_summary_version_2_is_still_complete(tmp_path: Path) -> None:
    """A corpus made before the text field and the weights were recorded (.corpus.json version 2, without per-source
    counts) is the same run as a plain one now: --resume finds it complete; other fields are refused."""
    src = write_docs(tmp_path / "a.txt", [["One."], ["Two."]])
    out = tmp_path / "out"
    write_corpus([src], out, num_files=2, progress=False)
    summary = json.loads((out / ".corpus.json").read_text())
    settings = {
        k: v for k, v in summary["settings"].items() if k not in ("text_field", "title_field", "weights", "weight_seed")
    }
    old = {**{k: v for k, v in summary.items() if k != "sources"}, "summary_version": 2, "settings": settings}
    (out / ".corpus.json").write_text(json.dumps(old))
    again = write_corpus([src], out, num_files=2, progress=False, resume=True)
    assert again.documents == 2 and again.sources == []
    from data_prep.parquet import Fields

    with pytest.raises(DataPrepError, match="already complete, but made with other settings"):
        write_corpus([src], out, num_files=2, progress=False, resume=True, fields=Fields("body"))


FAULT = REPO / "tests" / "helpers" / "shard_fault.py"  # injects a fault into albert-data from outside


def corpus_cli(inputs: Path, out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """`albert-data corpus` in a process of its own (with `fault`: the corpus task it names is killed, SIGKILL)."""
    command = [sys.executable, "-m", "data_prep"] if fault is None else [sys.executable, str(FAULT), "--fault", fault]
    args = ["corpus", "--input", str(inputs), "--output", str(out), "--num-files", "3", "--workers", "1"]
    return subprocess.run(
        [*command, *args, "--mpi", "off", *extra], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def edit_in_place(path: Path, start: int, stop: int, old: bytes, new: bytes, keep_mtime: bool) -> None:
    """Replace `old` by `new` (as long) within bytes [start, stop) of the file, writing into it (same inode, same
    size); with `keep_mtime` its modification time is then set back to what it was (as cp -p or rsync -t would)."""
    assert len(old) == len(new)
    before = path.stat()
    data = path.read_bytes()
    at = data.index(old, start, stop)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(new)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_size == before.st_size


def _interrupted_corpus(tmp_path: Path, fault: str, *extra: str) -> tuple[Path, Path, dict]:
    """Inputs (a docs file cut into 6 parts of about 10 kB, and a small file), a clean run of them, and a run of
    them killed at the corpus task `fault`: (inputs, the killed run's output, the finished parts' markers)."""
    src = tmp_path / "in"
    src.mkdir()
    write_docs(src / "big.txt", [[f"Big doc {i} says hello.", f"Its second line {i}."] for i in range(1200)])
    write_docs(src / "small.txt", [[f"Small doc {i}.", "Two."] for i in range(40)])
    assert corpus_cli(src, tmp_path / "ref", *extra).returncode == 0
    out = tmp_path / "out"
    killed = corpus_cli(src, out, *extra, fault=fault)
    assert killed.returncode == 2 and "killed by SIGKILL" in killed.stderr, killed.stderr
    done = {m.stem: json.loads(m.read_text()) for m in (out / ".work" / "done").glob("p*.json")}
    return src, out, done


@pytest.mark.integration
@pytest.mark.parametrize("keep_mtime", [True, False])
def test_resume_makes_again_the_parts_of_an_input_edited_in_place(keep_mtime: bool, tmp_path: Path) -> None:
    """A run killed after some parts finished; one finished part's bytes edited in place, the size kept (and the
    modification time set back: the hash of the bytes read is what tells): --resume makes that part again, names the
    file and the part in a warning, keeps the others, and writes what a clean run on the edited input writes."""
    src, out, done = _interrupted_corpus(tmp_path, "kill-corpus:p000003", "--part-mb", "0.01")
    big = str((src / "big.txt").resolve())
    finished = sorted(name for name, marker in done.items() if marker["source"]["path"] == big)
    assert len(finished) >= 2 and "p000003" not in done, sorted(done)
    edited = done[finished[0]]["source"]
    edit_in_place(src / "big.txt", edited["start"], edited["stop"], b"says hello", b"SAYS HELLO", keep_mtime)
    resumed = corpus_cli(src, out, "--part-mb", "0.01", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    [warning] = [line for line in resumed.stderr.splitlines() if " WARNING " in line]
    moved = "mtime as it was, but ctime" if keep_mtime else "mtime "
    assert f"{big}: modified since the interrupted run ({moved}" in warning, warning
    assert f"the bytes of part {finished[0]} (bytes {edited['start']}-{edited['stop']}) differ" in warning, warning
    assert f"differ; 1 finished part(s) made again, {len(finished) - 1} kept" in warning, warning
    assert corpus_cli(src, tmp_path / "clean", "--part-mb", "0.01").returncode == 0
    assert snapshot(out) == snapshot(tmp_path / "clean") != snapshot(tmp_path / "ref")
    assert b"SAYS HELLO" in b"".join(snapshot(out).values())


@pytest.mark.integration
def test_resume_after_a_touch_keeps_the_finished_parts(tmp_path: Path) -> None:
    """An input only touched after the interruption (its times moved, its bytes the same): --resume hashes the bytes
    its finished parts read, finds them the same, keeps them, and gives the uninterrupted run's files (one of
    another size is refused). The finished folder met again: a touched input is the same input; one edited in place
    (size and mtime kept) is refused, naming it."""
    src, out, done = _interrupted_corpus(tmp_path, "kill-corpus:p000003", "--part-mb", "0.01")
    big = src / "big.txt"
    finished = [name for name, marker in done.items() if marker["source"]["path"] == str(big.resolve())]
    size = big.stat().st_size
    with open(big, "ab") as f:  # another size: refused, as before
        f.write(b"\n")
    grown = corpus_cli(src, out, "--part-mb", "0.01", "--resume")
    moved = f"--resume with other inputs ({big.resolve()}: {size} bytes then; {big.resolve()}: {size + 1} bytes now)"
    assert grown.returncode == 2 and moved in grown.stderr, grown.stderr
    os.truncate(big, size)
    later = big.stat().st_mtime_ns + 60 * 10**9
    os.utime(big, ns=(later, later))
    resumed = corpus_cli(src, out, "--part-mb", "0.01", "--resume")
    assert resumed.returncode == 0 and " WARNING " not in resumed.stderr, resumed.stderr
    touched = f"{big.resolve()}: touched since the interrupted run (mtime "
    assert touched in resumed.stderr and f"the bytes its {len(finished)} finished part(s) read are the same" in (
        resumed.stderr
    ), resumed.stderr
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in snapshot(out).items()}
    assert sha == {name: hashlib.sha256(data).hexdigest() for name, data in snapshot(tmp_path / "ref").items()}
    # the finished folder met again: the input touched once more, the same bytes: complete, nothing made
    os.utime(big, ns=(later + 10**9, later + 10**9))
    again = corpus_cli(src, out, "--part-mb", "0.01", "--resume")
    assert again.returncode == 0 and "corpus already complete" in again.stderr, again.stderr
    assert f"{big.resolve()}: touched since .corpus.json was made" in again.stderr
    # ... edited in place, size and mtime kept: refused, naming the file
    edit_in_place(big, 0, big.stat().st_size, b"says hello", b"SAYS HELLO", keep_mtime=True)
    refused = corpus_cli(src, out, "--part-mb", "0.01", "--resume")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"already complete, but made from other bytes of {big.resolve()} (modified since: mtime " in refused.stderr
    assert "its sha256 differs from .corpus.json's" in refused.stderr, refused.stderr
    assert snapshot(out) == snapshot(tmp_path / "ref")


@pytest.mark.integration
def test_resume_of_an_edited_streamed_file_cleans_again_only_its_changed_chunk(tmp_path: Path) -> None:
    """A JSON lines file read in chunks (streamed), finished, and the run killed while writing the output files;
    the file edited in place near its end, size and mtime kept: --resume drops the output files and the part, reads
    the file again, cleans again only the chunk whose documents differ, and writes what a clean run writes."""
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({"text": f"Line {i} says something. It has a second sentence {i}."}) for i in range(3000)]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    write_docs(src / "b.txt", [[f"Small doc {i}.", "Two."] for i in range(40)])
    out = tmp_path / "out"
    killed = corpus_cli(src, out, "--part-mb", "0.02", fault="kill-corpus:out-00001")
    assert killed.returncode == 2 and "output file" in killed.stderr, killed.stderr
    chunks = len(list((out / ".work" / "done").glob("p000000-c*.json")))
    assert chunks > 5 and (out / ".work" / "done" / "p000000.json").exists()
    path = src / "a.jsonl"
    edit_in_place(path, path.stat().st_size - 200, path.stat().st_size, b"says", b"SAYS", keep_mtime=True)
    resumed = corpus_cli(src, out, "--part-mb", "0.02", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, resumed.stderr
    assert f"{path.resolve()}: modified since the interrupted run (mtime as it was" in warnings[0]
    assert "part p000000 (bytes 0-" in warnings[0] and "p000000-source" in warnings[0], warnings[0]
    assert f"the documents of part p000000 chunk {chunks - 1:05d} differ; cleaned again" in warnings[1], warnings
    assert corpus_cli(src, tmp_path / "clean", "--part-mb", "0.02").returncode == 0
    assert snapshot(out) == snapshot(tmp_path / "clean")
    assert b"SAYS something" in b"".join(snapshot(out).values())


def _child_reading(parent: int, path: Path) -> int | None:
    """The pid of a child process of `parent` that has `path` open, if any."""
    target = os.path.realpath(path)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if any(os.path.realpath(fd) == target for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.mark.slow
def test_killed_worker_ends_the_run_and_resume_finishes_it(wiki_dump: Path, tmp_path: Path) -> None:
    """SIGKILL of the worker cleaning the Wikipedia excerpt: the run ends within seconds with one line naming
    the input and --resume; --resume keeps the parts finished meanwhile and gives the uninterrupted result."""
    small = tmp_path / "small"
    small.mkdir()
    for k in range(3):
        write_docs(small / f"{k}.txt", [[f"Small {k} doc {i}.", "Second."] for i in range(50)])
    inputs = [str(wiki_dump), str(small)]
    ref = write_corpus(inputs, tmp_path / "ref", num_files=4, progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", "corpus", "--input", *inputs, "--output", str(out)]
    cmd += ["--num-files", "4", "--workers", "2", "--mpi", "off"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        victim = _child_reading(proc.pid, wiki_dump)
        time.sleep(0.05)
    assert victim is not None, "the excerpt's worker never started"
    time.sleep(0.5)  # well inside its cleaning (about 4 s)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 15
    assert proc.returncode == 2
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert (
        f"corpus parts: part p000000 ({wiki_dump}): its worker process (pid {victim}) was killed by SIGKILL"
        in errors[0]
    )
    assert "--resume" in errors[0]
    assert len(list((out / ".work" / "done").iterdir())) == 3  # the small files, finished meanwhile
    proc = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(out) == snapshot(tmp_path / "ref")
    assert f"{ref.documents} documents" in proc.stderr


@pytest.mark.mpi
def test_two_mpi_ranks_write_the_same_corpus(tmp_path: Path) -> None:
    src = mixed_inputs(tmp_path / "in")
    ref = write_corpus([src], tmp_path / "ref", num_files=5, progress=False)
    mpirun = shutil.which("mpirun")
    assert mpirun, "OpenMPI is installed by `make test` (.ci/system-deps.sh)"
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m", "data_prep"]
    cmd += ["corpus", "--input", str(src), "--output", str(tmp_path / "mpi"), "--num-files", "5", "--mpi", "on"]
    proc = subprocess.run(cmd + ["--part-mb", "0.002"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "MPI rank 1 of 2" in proc.stdout
    assert snapshot(tmp_path / "mpi") == snapshot(tmp_path / "ref")
    assert ref.documents == 404


@pytest.mark.mpi
def test_a_rank_slow_to_read_the_last_markers_still_finds_them(tmp_path: Path) -> None:
    """Rank 0 removes the work files only once every rank has read the output files' markers."""
    src = mixed_inputs(tmp_path / "in")
    mpirun = shutil.which("mpirun")
    assert mpirun, "OpenMPI is installed by `make test` (.ci/system-deps.sh)"
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, str(FAULT)]
    cmd += ["--fault", "slow-markers-on-rank:1", "corpus", "--input", str(src), "--output", str(tmp_path / "mpi")]
    proc = subprocess.run(
        cmd + ["--num-files", "3", "--mpi", "on"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "mpi" / ".work").exists()
    assert len(list((tmp_path / "mpi").glob("*.txt"))) == 3


def test_random_bytes_are_refused_by_the_command(tmp_path: Path) -> None:
    src = tmp_path / "random.txt"
    src.write_bytes(np.random.default_rng(1).integers(1, 256, 200_000, dtype=np.uint8).tobytes())
    cmd = [sys.executable, "-m", "data_prep", "corpus", "--input", str(src), "--output", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    [line] = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert f"{src}: " in line and "undecodable bytes" in line and "byte offset 0" in line
    assert "--allow-bad-bytes" in line and "Traceback" not in proc.stderr
    proc = subprocess.run(
        cmd[:-1] + [str(tmp_path / "allowed"), "--allow-bad-bytes"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "undecodable byte sequence(s) replaced" in proc.stderr


@pytest.mark.integration
def test_corpus_and_vocab_log_progress_lines_without_a_terminal(wiki_dump, wiki_corpus, tmp_path):
    """In a batch job (stderr no terminal) each phase logs done/total, rate and ETA every --progress-seconds."""
    from test_sharding import cli

    every = ["--progress-seconds", "0.001"]
    out = tmp_path / "corpus"
    proc = cli("corpus", "--input", str(wiki_dump), "--output", str(out), "--num-files", "4", "--workers", "2", *every)
    assert proc.returncode == 0, proc.stderr
    for phase in ("corpus parts", "corpus files"):
        assert f"{phase}: " in proc.stderr and "MB/s, ETA" in proc.stderr, proc.stderr
        assert any(f"{phase}: " in line and "(100.0%)" in line for line in proc.stderr.splitlines()), proc.stderr
    assert sorted(p.read_bytes() for p in out.glob("corpus-*.txt")) == sorted(
        p.read_bytes() for p in wiki_corpus.glob("corpus-*.txt")
    )
    prefix = tmp_path / "vocab" / "spiece"
    proc = cli("vocab", "--input", str(out), "--output-prefix", str(prefix), "--vocab-size", "400", *every)
    assert proc.returncode == 0, proc.stderr
    assert "vocab sample: " in proc.stderr and "MB/s, ETA" in proc.stderr, proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("command", ["corpus", "shard", "prepare"])
def test_a_second_writer_of_an_output_is_refused_and_a_killed_one_blocks_nothing(command, tmp_path, wiki_corpus):
    """A real process holds the output's lock (as a running albert-data does); the command refuses in one line naming
    it, writes nothing, and runs once the holder is SIGKILLed."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from data_prep.mpi import World; from data_prep.stage import "
            "one_writer\nwith one_writer(Path(sys.argv[1]), World()):\n    print('held', flush=True); time.sleep(600)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        args = {
            "corpus": ["corpus", "--input", str(wiki_corpus / "corpus-00000.txt"), "--output", str(out)],
            "shard": ["shard", "--input", str(wiki_corpus), "--spm-model", "x.model", "--output", str(out)],
            "prepare": ["prepare", "--input", str(wiki_corpus / "corpus-00000.txt"), "--output", str(out)],
        }[command]
        refused = subprocess.run([sys.executable, "-m", "data_prep.cli", *args], capture_output=True, text=True)
        assert refused.returncode == 2, refused.stderr
        errors = [line for line in refused.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and f"{out} is in use by pid {holder.pid} on host" in errors[0], refused.stderr
        assert "Traceback" not in refused.stderr and not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    if command == "corpus":  # the kernel released the dead holder's lock: the next run goes ahead
        args[-1] = str(out)
        done = subprocess.run([sys.executable, "-m", "data_prep.cli", *args, "--num-files", "1"], capture_output=True)
        assert done.returncode == 0, done.stderr
