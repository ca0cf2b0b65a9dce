"""`albert-pretrain` checks what it is given against what made it, and survives damage and interruption: real runs.

Two trainings racing for one output; evaluation and resume on shards of another vocabulary or other examples; a
checkpoint damaged on disk; a torn metrics line; Ctrl-C to a 2-rank torchrun; a disk that fills during a save."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SHARD_ARGS, VOCAB_SIZE
from helpers.engine_helpers import ds_config, metrics, pretrain

pytestmark = pytest.mark.integration  # tier: see pyproject.toml

FAULT_WORKER = REPO / "tests" / "helpers" / "fault_worker.py"  # injects the fault from outside albert-pretrain

DS = ds_config(0, "fp32")


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def refused(proc, message: str) -> str:
    """Exit 2 with one error line holding `message`, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def shards(corpus: Path, spm: Path, out: Path, *extra: str) -> Path:
    from data_prep.cli import main as albert_data

    args = ["shard", "--input", str(corpus), "--spm-model", str(spm), "--output", str(out), *SHARD_ARGS, *extra]
    assert albert_data(args) == 0
    return out


@pytest.fixture(scope="module")
def other_vocabulary_shards(wiki_corpus, tmp_path_factory) -> Path:
    """Shards of the same corpus and vocabulary size, but another vocabulary (trained on a sample of other sentences):
    every check of form passes them."""
    from data_prep.cli import train_vocab_from

    folder = tmp_path_factory.mktemp("other-vocab")
    spm = train_vocab_from([wiki_corpus], folder / "spiece", VOCAB_SIZE, 20_000, 999, 1, "docs")
    return shards(wiki_corpus, spm, folder / "shards")


@pytest.fixture(scope="module")
def other_seed_shards(wiki_corpus, wiki_shards, tmp_path_factory) -> Path:
    """The training shards' vocabulary, other examples (another seed)."""
    out = tmp_path_factory.mktemp("other-seed") / "shards"
    return shards(wiki_corpus, wiki_shards / "spiece.model", out, "--seed", "8")


def test_a_second_training_into_one_output_is_refused_and_a_killed_one_blocks_nothing(wiki_shards, tmp_path):
    first = pretrain(tmp_path, wiki_shards, DS, steps=100_000, wait=False)
    try:
        deadline = time.time() + 120
        while not ((tmp_path / "metrics.jsonl").exists() and metrics(tmp_path)) and time.time() < deadline:
            assert first.poll() is None, first.communicate()[0]
            time.sleep(0.2)
        second = pretrain(tmp_path, wiki_shards, DS, steps=3)
        refused(second, f"{tmp_path} is in use by pid {first.pid} on host")
    finally:
        first.kill()
        first.wait()
    steps = [m["step"] for m in metrics(tmp_path)]
    assert steps == list(range(1, len(steps) + 1)), "the refused run wrote into the first one's metrics"
    ok(pretrain(tmp_path, wiki_shards, DS, steps=3, extra=["--resume", "never"]))


def test_another_commands_output_folder_is_refused(wiki_shards, tmp_path):
    shard_copy = tmp_path / "shards"
    shutil.copytree(wiki_shards, shard_copy)
    before = sorted(p.name for p in shard_copy.iterdir())
    refused(pretrain(shard_copy, wiki_shards, DS, steps=3), "holds the output of `albert-data shard` (a shard folder)")
    assert sorted(p.name for p in shard_copy.iterdir()) == sorted([*before, "configs"])  # (the test's own configs)


def test_eval_shards_of_another_vocabulary_are_refused(wiki_shards, other_vocabulary_shards, tmp_path):
    proc = pretrain(tmp_path, wiki_shards, DS, steps=3, extra=["--eval-data", str(other_vocabulary_shards)])
    refused(proc, f"{other_vocabulary_shards}: the evaluation shards were made with another vocabulary")
    assert not (tmp_path / "checkpoints").exists()


def test_resume_on_other_data_is_refused_unless_new_data_says_so(
    wiki_shards, other_vocabulary_shards, other_seed_shards, tmp_path
):
    ok(pretrain(tmp_path, wiki_shards, DS, steps=3))
    meta = json.loads((tmp_path / "checkpoints" / "step-00000003" / "complete.json").read_text())
    assert meta["vocab_sha256"] == meta["data_identity"]["vocab_sha256"]
    refused(pretrain(tmp_path, other_vocabulary_shards, DS, steps=5), "embeddings index the other vocabulary")
    refused(pretrain(tmp_path, other_seed_shards, DS, steps=5), "pass --new-data")
    proc = ok(pretrain(tmp_path, other_seed_shards, DS, steps=5, extra=["--new-data"]))
    assert "--new-data: continuing" in proc.stderr and "resumed from" in proc.stderr
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4, 5]
    after = json.loads((tmp_path / "checkpoints" / "step-00000005" / "complete.json").read_text())
    assert after["data_identity"]["folder"] == str(other_seed_shards)


def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumed(wiki_shards, tmp_path):
    ok(pretrain(tmp_path, wiki_shards, DS, steps=4, extra=["--save-interval", "2"]))
    newest = tmp_path / "checkpoints" / "step-00000004"
    files = json.loads((newest / "complete.json").read_text())["files"]
    assert "mp_rank_00_model_states.pt" in files and "rng-rank0.pt" in files
    victim = newest / "mp_rank_00_model_states.pt"
    with open(victim, "r+b") as f:  # a bit flip inside, same size: only the checksum tells
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    export = subprocess.run(
        [sys.executable, "-m", "pipeline.export", "--checkpoint", str(newest), "--output", str(tmp_path / "hf")],
        capture_output=True,
        text=True,
    )
    refused(export, f"{newest}: damaged since it was saved (mp_rank_00_model_states.pt: sha256 differs")
    assert not (tmp_path / "hf").exists()
    explicit = pretrain(tmp_path, wiki_shards, DS, steps=6, extra=["--resume", str(newest)])
    refused(explicit, f"{newest}: damaged since it was saved (mp_rank_00_model_states.pt: sha256 differs")
    proc = ok(pretrain(tmp_path, wiki_shards, DS, steps=6))
    assert f"{newest} is damaged (mp_rank_00_model_states.pt: sha256 differs" in proc.stderr
    assert "resumed from" in proc.stderr and "step-00000002" in proc.stderr
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_torn_last_metrics_line_does_not_block_the_resume(wiki_shards, tmp_path):
    ok(pretrain(tmp_path, wiki_shards, DS, steps=3, extra=["--record-batches"]))
    for log in (tmp_path / "metrics.jsonl", tmp_path / "batches-rank0.jsonl"):
        with open(log, "a") as f:
            f.write('{"step": 4, "loss": 7.1')  # the disk filled in the middle of a line
    proc = ok(pretrain(tmp_path, wiki_shards, DS, steps=5, extra=["--record-batches"]))
    assert "line 4 is torn" in proc.stderr
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_ctrl_c_saves_on_every_rank_and_the_run_resumes(wiki_shards, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it to torchrun and its ranks."""
    ds = ds_config(2, "fp32")
    run = pretrain(tmp_path, wiki_shards, ds, steps=100_000, nproc=2, wait=False, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None:
        if (tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 3:
            break
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGINT)
    out, _ = run.communicate(timeout=240)
    assert "received SIGINT: stopping after this step" in out and "stopped by a signal" in out, out[-3000:]
    assert "KeyboardInterrupt" not in out, out[-3000:]
    saved = [p.name for p in (tmp_path / "checkpoints").glob("step-*") if (p / "complete.json").exists()]
    assert len(saved) == 1, saved
    stopped_at = int(saved[0].split("-")[1])
    assert metrics(tmp_path)[-1]["step"] == stopped_at
    ok(pretrain(tmp_path, wiki_shards, ds, steps=stopped_at + 2, nproc=2))
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, stopped_at + 3))


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of a few MB (tmpfs; needs the right to mount, which root has), unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()

    def make(megabytes: float) -> Path:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()})")
        return mount

    yield make
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_survives(wiki_shards, tmp_path, small_disk):
    sized = tmp_path / "sized"
    ok(pretrain(sized, wiki_shards, DS, steps=3))
    run_bytes = sum(f.stat().st_size for f in sized.rglob("*") if f.is_file())
    checkpoint_bytes = sum(f.stat().st_size for f in (sized / "checkpoints").rglob("*") if f.is_file())
    out = small_disk((run_bytes + 0.6 * checkpoint_bytes) / 2**20) / "run"  # room for one checkpoint, not two
    proc = pretrain(out, wiki_shards, DS, steps=6, extra=["--save-interval", "2"])
    line = refused(proc, f"{out / 'checkpoints'}: saving step 4 failed")
    assert "the last good checkpoint" in line and "step-00000002, is intact" in line, line
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    # the run, moved to a disk with space, resumes from that checkpoint
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    proc = ok(pretrain(moved, wiki_shards, DS, steps=4, extra=["--save-interval", "2"]))
    assert "step-00000002" in proc.stderr and [m["step"] for m in metrics(moved)] == [1, 2, 3, 4]


def test_a_shard_that_breaks_in_the_middle_of_training_is_one_line(wiki_shards, tmp_path):
    """A chunk in the middle of a shard damaged (the start-up check reads the first and last rows only): the read
    fails during training, and the run stops with one line naming the shard and the rows."""
    import h5py

    from data_prep.shards import Manifest

    data = tmp_path / "shards"
    shutil.copytree(wiki_shards, data)
    shard = data / Manifest.load(data).shards[0]["name"]
    with h5py.File(shard, "r") as f:
        middle = f["input_ids"].id.get_num_chunks() // 2
        assert 0 < middle < f["input_ids"].id.get_num_chunks() - 1
        chunk = f["input_ids"].id.get_chunk_info(middle)
    raw = bytearray(shard.read_bytes())
    raw[chunk.byte_offset + chunk.size // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    out = tmp_path / "run"
    line = refused(pretrain(out, data, DS, steps=3), f"{shard}: cannot read rows")
    assert "run `albert-data verify` on the shard folder" in line and "the last good checkpoint" in line


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(wiki_shards, tmp_path):
    run = pretrain(
        tmp_path,
        wiki_shards,
        DS,
        steps=100_000,
        wait=False,
        start_new_session=True,
        script=FAULT_WORKER,
        extra=["--fault", "slow-steps:1.0"],
    )
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None:
        if (tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 2:
            break
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGINT)
    time.sleep(0.3)  # a person's second Ctrl-C: after the first was handled, inside the same (1 s) step
    os.killpg(run.pid, signal.SIGINT)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 130, out[-3000:]
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "interrupted again: stopped at once, without a checkpoint" in errors[0], out[-3000:]
    assert "Traceback" not in out and not list((tmp_path / "checkpoints").glob("step-*/complete.json"))
