"""The `shard` step at cluster scale: files created, shard size by bytes, failures that stop every process promptly
with a line naming the piece or shard, `--resume` after them, package versions, progress lines in batch jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_sharding import cli, shard_cmd, shas

from data_prep.examples import record_dtype
from data_prep.inspection import verify_folder
from data_prep.sharding import WORK_FORMAT, ShardSettings, auto_num_shards, estimated_record_bytes
from data_prep.shards import MANIFEST_VERSION, Manifest
from data_prep.spill import read_index

sys.path.insert(0, str(REPO))
from bench import syscalls  # noqa: E402

FAULT = REPO / "tests" / "helpers" / "shard_fault.py"  # injects the fault from outside albert-data


def faulty(
    fault: str, *args: str, launcher: list[str] = (), timeout: float = 120
) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [*launcher, sys.executable, str(FAULT), "--fault", fault, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    return proc, time.monotonic() - started


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


@pytest.mark.integration
@pytest.mark.parametrize(
    "fault, names", [("kill-piece:f00001-p00000", "piece f00001-p00000"), ("kill-shard:1", "shard 1 (shard-00001.h5")]
)
def test_killed_worker_stops_the_run_and_resume_gives_the_same_shards(
    fault, names, wiki_corpus, spm_model, wiki_shards, tmp_path
):
    """A worker process killed with SIGKILL (as by the OOM killer): the command exits non-zero at once with one line
    naming the piece or shard and saying that --resume continues; --resume then gives the uninterrupted run's bytes,
    logging its progress (no terminal) every --progress-seconds."""
    out = tmp_path / "out"
    proc, seconds = faulty(fault, *shard_cmd(wiki_corpus, spm_model, out, "--workers", "2"))
    assert proc.returncode != 0 and seconds < 60, (proc.returncode, seconds, proc.stderr)
    [line] = errors(proc.stderr)
    assert names in line and "killed by SIGKILL" in line and "--resume" in line, line
    assert "Traceback" not in proc.stderr and not (out / "manifest.json").exists()
    resumed = cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume", "--progress-seconds", "0.001"), check=True)
    assert shas(out) == shas(wiki_shards)
    assert Manifest.load(out).data["stats"] == Manifest.load(wiki_shards).data["stats"]
    assert not (out / ".work").exists() and verify_folder(out) == []
    assert "shards: 3/3 shard (100.0%)" in resumed.stderr and "ETA" in resumed.stderr, resumed.stderr


@pytest.mark.integration
def test_task_that_raises_stops_the_run_with_its_piece_and_error(wiki_corpus, spm_model, tmp_path):
    proc, seconds = faulty("raise-piece:f00001-p00000", *shard_cmd(wiki_corpus, spm_model, tmp_path / "out"))
    assert proc.returncode == 2 and seconds < 60, proc.stderr
    lines = errors(proc.stderr)
    # the unexpected error's traceback (from the task's process) is logged, then the one line that says it all
    assert "Traceback" in lines[0] or "failed:" in lines[0], proc.stderr
    assert (
        "examples: piece f00001-p00000" in lines[-1]
        and "OSError: [Errno 28] No space left on device" in lines[-1]
        and "--resume" in lines[-1]
    ), proc.stderr


@pytest.mark.mpi
@pytest.mark.parametrize(
    "fault, says",
    [
        ("kill-first-piece-on-rank:1", "killed by SIGKILL"),  # in a task
        ("raise-on-rank:1", "Disk quota exceeded"),  # outside any task, while rank 0 goes on to its work
    ],
)
def test_failure_on_one_mpi_rank_stops_every_rank(fault, says, wiki_corpus, spm_model, tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "OpenMPI is installed by `make test` (.ci/system-deps.sh)"
    launcher = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2"]
    out = tmp_path / "out"
    proc, seconds = faulty(fault, *shard_cmd(wiki_corpus, spm_model, out, "--workers", "2"), launcher=launcher)
    assert proc.returncode != 0 and seconds < 60, (proc.returncode, seconds, proc.stderr)
    assert "MPI: 2 ranks" in proc.stderr
    [line] = errors(proc.stderr)[:1]
    assert "[rank 1]" in line and says in line and "stopping all 2 ranks" in line, proc.stderr
    assert not (out / "manifest.json").exists()


def _interrupted(wiki_corpus, spm_model, out: Path) -> dict:
    proc, _ = faulty("kill-piece:f00002-p00000", *shard_cmd(wiki_corpus, spm_model, out))
    assert proc.returncode != 0 and (out / ".work" / "settings.json").exists(), proc.stderr
    return json.loads((out / ".work" / "settings.json").read_text())


@pytest.mark.integration
def test_resume_refuses_other_package_versions_settings_and_work_formats(wiki_corpus, spm_model, tmp_path):
    out = tmp_path / "out"
    saved = _interrupted(wiki_corpus, spm_model, out)
    assert set(saved["versions"]) == {"albert-pretrain", "h5py", "numpy", "sentencepiece"}
    now = saved["versions"]["numpy"]
    cases = [
        (
            {**saved, "versions": {**saved["versions"], "numpy": "1.26.4"}},
            f"--resume with other package versions (numpy 1.26.4 then, {now} now) than the interrupted run",
        ),
        (
            {**saved, "settings": {**saved["settings"], "seed": 1}},
            "--resume with other settings than the interrupted run",
        ),
        (
            {k: v for k, v in saved.items() if k not in ("work_format", "versions")},
            f"another albert-data version (work files of format 1, this version writes {WORK_FORMAT}) cannot be continued; remove the folder",
        ),
    ]
    for doc, message in cases:
        (out / ".work" / "settings.json").write_text(json.dumps(doc))
        proc = cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume"))
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _interrupted_on_a_copy(wiki_corpus, spm_model, tmp_path: Path) -> tuple[Path, Path, dict[str, dict]]:
    """A copy of the corpus and a shard run of it killed at piece f00002-p00000: (the copy, the output, what each
    finished piece read, by piece)."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    shutil.copytree(wiki_corpus, corpus)
    proc, _ = faulty("kill-piece:f00002-p00000", *shard_cmd(corpus, spm_model, out))
    assert proc.returncode != 0 and "killed by SIGKILL" in proc.stderr, proc.stderr
    done = {spill.stem: read_index(spill)[1]["source"] for spill in (out / ".work" / "spill").glob("f*.bin")}
    assert len(done) >= 2 and "f00002-p00000" not in done, sorted(done)
    return corpus, out, done


@pytest.mark.integration
def test_resume_makes_again_the_pieces_of_an_input_edited_in_place(wiki_corpus, spm_model, wiki_shards, tmp_path):
    """A run killed after some pieces finished; a finished piece's input edited in place, its size and its
    modification time kept (so only the hash of the bytes the piece read tells): --resume names the file and the
    piece, makes that piece again, keeps the others, and gives the shards of a clean run on the edited input."""
    corpus, out, done = _interrupted_on_a_copy(wiki_corpus, spm_model, tmp_path)
    name, source = sorted(done.items())[0]
    path = Path(source["path"])
    data = path.read_bytes()
    at = data.index(b" the ", source["start"] + len(data) // 2)
    before = path.stat()
    with open(path, "r+b") as f:  # the same inode, the same size
        f.seek(at)
        f.write(b" dog ")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_mtime_ns, path.stat().st_size) == (before.st_mtime_ns, before.st_size)
    resumed = cli(*shard_cmd(corpus, spm_model, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    [warning] = [line for line in resumed.stderr.splitlines() if " WARNING " in line]
    assert f"{path}: modified since the interrupted run (mtime as it was, but ctime " in warning, warning
    assert f"the bytes of piece {name} (bytes {source['start']}-{source['stop']}) differ" in warning, warning
    assert "1 finished piece(s) made again, 0 kept" in warning, warning
    clean = tmp_path / "clean"
    cli(*shard_cmd(corpus, spm_model, clean), check=True)
    assert shas(out) == shas(clean) != shas(wiki_shards)
    assert Manifest.load(out).data["stats"] == Manifest.load(clean).data["stats"]
    assert verify_folder(out) == []


@pytest.mark.integration
def test_resume_after_a_touch_keeps_the_pieces_and_a_finished_folder_checks_the_bytes(
    wiki_corpus, spm_model, wiki_shards, tmp_path
):
    """An input only touched after the interruption (its times moved, its bytes the same): --resume hashes what its
    finished pieces read, keeps them, and gives the uninterrupted run's shards. The finished folder met again: a
    touched input is the same input; one edited in place (size and mtime kept) is refused, naming it."""
    corpus, out, done = _interrupted_on_a_copy(wiki_corpus, spm_model, tmp_path)
    path = Path(sorted(done.values(), key=lambda source: source["path"])[0]["path"])
    later = path.stat().st_mtime_ns + 60 * 10**9
    os.utime(path, ns=(later, later))
    resumed = cli(*shard_cmd(corpus, spm_model, out, "--resume"))
    assert resumed.returncode == 0 and " WARNING " not in resumed.stderr, resumed.stderr
    assert f"{path}: touched since the interrupted run (mtime " in resumed.stderr, resumed.stderr
    assert "the bytes its 1 finished piece(s) read are the same" in resumed.stderr, resumed.stderr
    assert shas(out) == shas(wiki_shards)
    recorded = {entry["path"]: entry for entry in Manifest.load(out).data["inputs"]}
    assert recorded[str(path)]["mtime_ns"] == later and len(recorded[str(path)]["sha256"]) == 64
    os.utime(path, ns=(later + 10**9, later + 10**9))
    again = cli(*shard_cmd(corpus, spm_model, out, "--resume"))
    assert again.returncode == 0 and "shards already complete" in again.stderr, again.stderr
    assert f"{path}: touched since manifest.json was made" in again.stderr
    before = path.stat()
    data = path.read_bytes()
    at = data.index(b" the ")
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b" dog ")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    refused = cli(*shard_cmd(corpus, spm_model, out, "--resume"))
    [line] = errors(refused.stderr)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"already complete, but made from other bytes of {path} (modified since: mtime " in line, line
    assert "its sha256 differs from manifest.json's" in line, line


@pytest.mark.integration
@pytest.mark.skipif(not syscalls.available(), reason="strace is not installed")
def test_files_created_are_one_per_piece_and_per_shard(wiki_corpus, spm_model, wiki_shards, tmp_path):
    """Small pieces and many shards: the files created stay pieces + shards + a few, and the folders are made once,
    by one process (strace -f: the workers included)."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        *shard_cmd(wiki_corpus, spm_model, out, "--piece-mb", "0.1", "--num-shards", "40", "--workers", "2"),
    ]
    proc, meta = syscalls.traced(cmd, [tmp_path], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    pieces = int(proc.stderr.split(" input files in ")[1].split()[0])
    assert pieces > 20, proc.stderr
    assert pieces + 40 <= len(meta.created) <= pieces + 40 + 16, sorted(meta.created)
    # the output folder, .work, .work/spill, once (mkdir(parents=True) first tries the deepest: 2 calls fail), and
    # the output's parent, which holds the one-writer lock (it exists: the call fails)
    assert meta.calls["mkdir"] <= 6, meta.calls
    assert verify_folder(out) == []


def test_auto_shard_count_keeps_shards_within_shard_mb(wiki_corpus, spm_model, tmp_path):
    out = tmp_path / "out"
    proc = cli(*shard_cmd(wiki_corpus, spm_model, out, "--num-shards", "0", "--shard-mb", "1"), check=True)
    m = Manifest.load(out).data
    input_bytes = sum(f.stat().st_size for f in wiki_corpus.iterdir())
    settings = ShardSettings(dupe_factor=2, shard_bytes=1 << 20)
    assert m["settings"]["num_shards"] == auto_num_shards(input_bytes, settings) > 3, proc.stderr
    itemsize = record_dtype(128, 20).itemsize
    sizes = np.array([s["num_examples"] for s in m["shards"]]) * itemsize
    assert sizes.max() <= 1 << 20 and sizes.mean() > 0.6 * (1 << 20), sizes  # the estimate is an upper bound, close


def test_shard_size_below_one_record_is_refused_and_the_count_never_exceeds_the_examples():
    from data_prep.errors import DataPrepError

    with pytest.raises(
        DataPrepError, match=r"--shard-mb: shards of 104 bytes are smaller than one example record \(\d+ bytes"
    ):
        auto_num_shards(10 << 20, ShardSettings(shard_bytes=int(0.0001 * 2**20)))
    # one record per shard at most: 13 kB of text cannot make more examples than its records' worth
    record = record_dtype(128, 20).itemsize
    settings = ShardSettings(dupe_factor=1, shard_bytes=record)
    assert auto_num_shards(13_000, settings) == estimated_record_bytes(13_000, settings) // record


def test_progress_logs_lines_without_a_terminal(caplog):
    """Under pytest stderr is no terminal: lines instead of a bar, at most every `every` seconds, and a last one."""
    from data_prep.progress import progress

    caplog.set_level("INFO", logger="data_prep.progress")
    with progress("examples", total=4 << 20, unit="B", every=1e-6) as p:
        time.sleep(0.001)
        p.update(1 << 20)
        time.sleep(0.001)
        p.update(3 << 20)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("examples: 1.0/4.0 MB (25.0%), ") and "MB/s, ETA 0:00:00" in lines[0], lines
    assert lines[-1].startswith("examples: 4.0/4.0 MB (100.0%)") and lines[-1].endswith("(done)"), lines
    caplog.clear()
    with progress("shards", total=3, unit="shard", every=0) as p:
        p.update(3)
    assert caplog.records == []


def test_finished_folder_made_before_shard_mb_is_still_complete(wiki_corpus, spm_model, wiki_shards, tmp_path):
    """A finished folder whose manifest (version 1) has no shard_bytes (its shard count is recorded), or (version 2)
    records only the inputs' paths and sizes: --resume checks it, exit 0. A manifest of a newer version than this
    albert-data reads is refused in one line."""
    out = tmp_path / "done"
    shutil.copytree(wiki_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["manifest_version"] == MANIFEST_VERSION
    inputs = [{"path": entry["path"], "bytes": entry["bytes"]} for entry in manifest["inputs"]]
    (out / "manifest.json").write_text(json.dumps({**manifest, "manifest_version": 2, "inputs": inputs}))
    proc = cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume"))
    assert proc.returncode == 0 and "shards already complete" in proc.stderr, proc.stderr
    del manifest["settings"]["shard_bytes"], manifest["versions"], manifest["manifest_version"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume"))
    assert proc.returncode == 0 and "shards already complete" in proc.stderr, proc.stderr
    (out / "manifest.json").write_text(json.dumps({**manifest, "manifest_version": MANIFEST_VERSION + 1}))
    proc = cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume"))
    [line] = errors(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"manifest.json: made by a newer albert-data (manifest version {MANIFEST_VERSION + 1};" in line, line
