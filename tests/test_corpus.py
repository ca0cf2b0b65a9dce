"""The corpus step: standard format, balanced split, atomic output, workers and ranks, resume, a killed
worker, bounded open files, bad inputs."""

from __future__ import annotations

import bz2
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
    ref = write_corpus([src], tmp_path / "ref", num_files=3, progress=False)
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
    (src / "0.txt").write_bytes(b"\0" + good[0][1:])  # finished before: not read again
    resumed = write_corpus([src], out, num_files=3, progress=False, resume=True)
    assert snapshot(out) == snapshot(tmp_path / "ref")
    assert (resumed.documents, resumed.bytes_written) == (ref.documents, ref.bytes_written)
    again = write_corpus([src], out, num_files=3, progress=False, resume=True)  # finished: only checked
    assert again.documents == ref.documents and snapshot(out) == snapshot(tmp_path / "ref")


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
    albert-data is refused, in one line each."""
    src = write_docs(tmp_path / "a.txt", [["One."], ["Two."]])
    out = tmp_path / "out"
    write_corpus([src], out, num_files=2, progress=False)
    summary = json.loads((out / ".corpus.json").read_text())
    assert summary["summary_version"] == SUMMARY_VERSION
    (out / ".corpus.json").write_text(json.dumps({**summary, "summary_version": SUMMARY_VERSION + 1}))
    with pytest.raises(DataPrepError, match=r"\.corpus\.json: made by a newer albert-data \(summary version 2"):
        write_corpus([src], out, num_files=2, progress=False, resume=True)
    (out / ".work").mkdir()
    (out / ".work" / "settings.json").write_text(json.dumps({"settings": {}, "inputs": []}))
    with pytest.raises(DataPrepError, match=rf"work files of format 1, this version writes {WORK_FORMAT}\) cannot"):
        write_corpus([src], out, num_files=2, progress=False, resume=True)


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
