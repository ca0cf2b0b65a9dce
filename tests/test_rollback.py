"""Recovery from anomalous steps (--on-anomaly rollback) and from shards that break during training
(--skip-bad-shards), on real runs with the fault injected from outside albert-pretrain: the run goes back to the
newest checkpoint before the step, leaves out exactly the recorded examples and finishes; a run given those skips
from the start ends in the same state; resumes, on the same or another layout, leave out the same examples."""

from __future__ import annotations

import json
import shutil
import zlib

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO
from helpers.engine_helpers import ds_config, final_params, metrics, pretrain

from pipeline.data import PretrainingData

pytestmark = pytest.mark.integration  # tier: see pyproject.toml

FAULT_WORKER = REPO / "tests" / "helpers" / "fault_worker.py"  # injects the fault from outside albert-pretrain
ROLLBACK = ["--on-anomaly", "rollback", "--save-interval", "2", "--record-batches", "--skip-margin", "1"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def records(out, rank: int = 0) -> dict[int, list[int]]:
    lines = (out / f"batches-rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r["examples"] for r in map(json.loads, lines)}


def plain_crcs(shards, world: int, micro: int, steps: range) -> set[int]:
    """The examples (CRC32 of input_ids) of these steps in a run without skips, on every rank (seed 42)."""
    crcs = set()
    for rank in range(world):
        d = PretrainingData(shards, micro, 1, rank=rank, world=world, seed=42)
        batches = iter(d)
        for step in range(1, steps.stop):
            b = next(batches)
            if step in steps:
                crcs |= {zlib.crc32(row.numpy().tobytes()) for row in b["input_ids"]}
        d.close()
    return crcs


def copy_before(run, dest, step: int):
    """A copy of a finished run's output as it was before `step`: its checkpoints from `step` on removed."""
    shutil.copytree(run, dest)
    for tag in (dest / "checkpoints").glob("step-*"):
        if int(tag.name[5:]) >= step:
            shutil.rmtree(tag)
    (dest / "finished.json").unlink()
    return dest


def same_params(a, b) -> None:
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_rollback_leaves_out_the_window_and_equals_a_run_that_skipped_it_from_the_start(wiki_shards, tmp_path):
    ds = ds_config(2, "bf16")
    rolled = tmp_path / "rolled"
    proc = ok(
        pretrain(
            rolled,
            wiki_shards,
            ds,
            steps=8,
            nproc=2,
            extra=[*ROLLBACK, "--fault", "nan-once-at-step:5"],
            script=FAULT_WORKER,
        )
    )
    assert "step 5: non-finite loss; rolled back to" in proc.stderr and "(step 4)" in proc.stderr
    [event] = metrics(rolled, "anomaly")
    assert event["step"] == 5 and event["to_step"] == 4 and event["action"] == "rollback"
    assert event["examples_left_out"] == 2 * 4 * 2  # steps 5 and 6 (margin 1) of 2 ranks x micro-batch 4
    assert [m["step"] for m in metrics(rolled)] == list(range(1, 9))
    skips = json.loads((rolled / "data-skips.json").read_text())["skips"]
    assert [(s["kind"], s["at"], s["until"], s["step"]) for s in skips] == [("window", 4, 6, 5)]
    # the steps after the rollback saw none of the examples that steps 5-6 had without it
    seen = {c for r in (0, 1) for step, crcs in records(rolled, r).items() if step >= 5 for c in crcs}
    assert not seen & plain_crcs(wiki_shards, 2, 4, range(5, 7))

    fresh = tmp_path / "fresh"  # the same skips from the start, no fault
    ok(
        pretrain(
            fresh, wiki_shards, ds, steps=8, nproc=2, extra=[*ROLLBACK, "--data-skips", str(rolled / "data-skips.json")]
        )
    )
    assert records(fresh, 0) == records(rolled, 0) and records(fresh, 1) == records(rolled, 1)
    same_params(fresh, rolled)

    # a resume from the checkpoint written before the rollback (it does not know the skip; data-skips.json does)
    resumed = copy_before(rolled, tmp_path / "resumed", step=5)
    ok(pretrain(resumed, wiki_shards, ds, steps=8, nproc=2, extra=ROLLBACK))
    assert records(resumed, 0) == records(rolled, 0)
    same_params(resumed, rolled)

    # and on one rank (another layout: the same global batch as 1 x 4 x accumulation 2)
    one = copy_before(resumed, tmp_path / "one-rank", step=5)
    ok(pretrain(one, wiki_shards, ds_config(0, "bf16", accum=2), steps=8, extra=ROLLBACK))
    seen = {c for step, crcs in records(one).items() if step >= 5 for c in crcs}
    assert not seen & plain_crcs(wiki_shards, 2, 4, range(5, 7))


def test_a_run_that_keeps_failing_stops_after_max_rollbacks(wiki_shards, tmp_path):
    proc = pretrain(
        tmp_path,
        wiki_shards,
        ds_config(0, "fp32"),
        steps=8,
        extra=[*ROLLBACK, "--max-rollbacks", "2", "--fault", "nan-at-step:5"],
        script=FAULT_WORKER,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert "3 rollbacks within 1000 steps, more than --max-rollbacks 2" in errors[0]
    assert errors[0].count("step 5 (non-finite loss)") == 3 and "last good checkpoint" in errors[0]
    assert [e["to_step"] for e in metrics(tmp_path, "anomaly")] == [4, 2]  # the second went one checkpoint further


@pytest.mark.parametrize("fault", ["nan-from-step:5", "grad-inf-from-step:5"])
def test_an_fp16_overflow_spiral_rolls_back_to_before_its_first_overflow(fault, wiki_shards, tmp_path):
    """An overflow at every step from 5 (a NaN loss, or a finite loss with an infinite gradient) halves the loss
    scale down to its floor: the rollback goes to the checkpoint before step 5 (not to one written during the
    spiral), leaves out the batches of every overflowed step and the margin's, and the run finishes with that
    checkpoint's loss scale."""
    fp16 = ["--allow-fp16-on-cpu", "--keep-checkpoints", "20", "--fault", fault]
    proc = ok(
        pretrain(
            tmp_path,
            wiki_shards,
            ds_config(2, "fp16"),
            steps=20,
            nproc=2,
            extra=[*ROLLBACK, *fp16],
            script=FAULT_WORKER,
        )
    )
    [event] = metrics(tmp_path, "anomaly")
    assert event["step"] == 5 and event["to_step"] == 4 and event["action"] == "rollback", event
    assert event["cause"].startswith("fp16 overflow at every step from 5 to ")
    floor_step = int(event["cause"].split(" to ")[1].split(",")[0])
    assert floor_step >= 5 + 8  # from 2^8 to the floor 1, a halving per overflow (after the first, hysteresis 2)
    assert event["examples_left_out"] == (floor_step - 5 + 1 + 1) * 4 * 2  # every overflowed step and the margin
    assert f"rolled back to {tmp_path / 'checkpoints' / 'step-00000004'}" in proc.stderr
    lines = metrics(tmp_path)
    assert [m["step"] for m in lines] == list(range(1, 21))
    assert all(m["loss_scale"] == 2.0**8 for m in lines[4:7])  # the checkpoint's scale, after the rollback
    seen = {c for r in (0, 1) for step, crcs in records(tmp_path, r).items() if step >= 5 for c in crcs}
    assert not seen & plain_crcs(wiki_shards, 2, 4, range(5, floor_step + 2))


def test_a_loss_spike_rolls_back_and_a_normal_run_never_trips(wiki_shards, tmp_path):
    spike = ["--spike-window", "3", "--spike-factor", "3"]
    proc = ok(
        pretrain(
            tmp_path,
            wiki_shards,
            ds_config(0, "fp32"),
            steps=8,
            extra=[*ROLLBACK, *spike, "--fault", "spike-once-at-step:7:10"],
            script=FAULT_WORKER,
        )
    )
    [event] = metrics(tmp_path, "anomaly")
    assert event["step"] == 7 and event["cause"].startswith("loss spike") and event["to_step"] == 6, proc.stderr
    # --on-anomaly stop: the spike is logged and the run goes on
    stop = tmp_path / "stop"
    ok(
        pretrain(
            stop,
            wiki_shards,
            ds_config(0, "fp32"),
            steps=8,
            extra=[*spike, "--fault", "spike-once-at-step:7:10"],
            script=FAULT_WORKER,
        )
    )
    [event] = metrics(stop, "anomaly")
    assert event["action"] == "none" and len(metrics(stop)) == 8


def breaking_block(shards, world: int, rows_per_step: int, window: int) -> tuple[int, str, int]:
    """A seed, a shard and the HDF5 chunk of it that a rank starts reading at steps 3-6 of epoch 0 (a block is a
    chunk; a middle chunk, which the start-up check does not read)."""
    d = PretrainingData(shards, rows_per_step, 1, world=world, window=window)
    share = d.layout_rows // world
    for seed in range(5000):
        order, starts = PretrainingData(shards, rows_per_step, 1, world=world, seed=seed, window=window)._epoch_layout(
            0
        )
        for rank in range(world):
            nxt = int(np.searchsorted(starts, rank * share, side="right"))  # the block after the share's first
            shard, first, _ = order[nxt]
            step = (starts[nxt] - rank * share) // rows_per_step + 1
            if 3 <= step <= 6 and 0 < first < d.shards[shard].rows - 1024 and nxt < len(order) - 1:
                return seed, d.shards[shard].path.name, int(first // 1024)
    raise AssertionError("no seed puts a middle chunk at steps 3-6")


def test_a_shard_that_breaks_during_training_is_left_out_on_every_rank_and_on_resume(wiki_shards, tmp_path):
    """A chunk in the middle of a shard is damaged; with --skip-bad-shards the rank that reads it first stops every
    rank before the step's forward, all leave the shard out from that step's position and finish; the skip is
    recorded, so a resume from before it (on one rank) leaves the shard out too."""
    data = tmp_path / "shards"
    shutil.copytree(wiki_shards, data)
    seed, name, chunk_index = breaking_block(data, 2, 32, window=32)
    shard = data / name
    with h5py.File(shard, "r") as f:
        shard_crcs = {zlib.crc32(row.astype("int64").tobytes()) for row in f["input_ids"][:]}
        chunk = f["input_ids"].id.get_chunk_info(chunk_index)
    raw = bytearray(shard.read_bytes())
    raw[chunk.byte_offset + chunk.size // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    common = ["--skip-bad-shards", "--record-batches", "--seed", str(seed), "--shuffle-window", "32"]
    run = tmp_path / "run"
    proc = ok(
        pretrain(
            run,
            data,
            ds_config(2, "fp32", micro=16, accum=2),
            steps=10,
            nproc=2,
            extra=[*common, "--save-interval", "2", "--keep-checkpoints", "10"],
        )
    )
    [event] = metrics(run, "anomaly")
    assert event["cause"] == "unreadable shard" and event["shards"] == [name], proc.stderr
    assert f"shard(s) {name} failed to read; left out from here on" in proc.stderr
    [skip] = json.loads((run / "data-skips.json").read_text())["skips"]
    assert skip["kind"] == "shard" and skip["shard"] == name
    failed_at = event["step"]
    assert 3 <= failed_at <= 6 and [m["step"] for m in metrics(run)] == list(range(1, 11))
    for r in (0, 1):
        assert not {c for step, crcs in records(run, r).items() if step >= failed_at for c in crcs} & shard_crcs
    # a resume on one rank from the checkpoint before the failure leaves the shard out from there
    one = copy_before(run, tmp_path / "one", step=failed_at)
    resumed_from = max(int(p.name[5:]) for p in (one / "checkpoints").glob("step-*"))
    ok(pretrain(one, data, ds_config(0, "fp32", micro=16, accum=4), steps=10, extra=common))
    assert not {c for step, crcs in records(one).items() if step > resumed_from for c in crcs} & shard_crcs


def test_skips_of_other_data_are_refused(wiki_shards, tmp_path):
    other = tmp_path / "other-skips.json"
    other.write_text(
        json.dumps({"version": 1, "data": {"folder": "/elsewhere", "shards_sha256": "0" * 64}, "skips": []})
    )
    proc = pretrain(tmp_path / "a", wiki_shards, ds_config(0, "fp32"), steps=4, extra=["--data-skips", str(other)])
    assert proc.returncode == 2 and "records examples of other training data (/elsewhere)" in proc.stderr, proc.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()
    proc = pretrain(
        tmp_path / "b",
        wiki_shards,
        ds_config(0, "fp32"),
        steps=4,
        extra=["--on-anomaly", "rollback", "--keep-checkpoints", "1"],
    )
    assert proc.returncode == 2 and "--on-anomaly rollback needs --keep-checkpoints 2 or more" in proc.stderr
    proc = pretrain(
        tmp_path / "c",
        wiki_shards,
        ds_config(0, "fp32"),
        steps=4,
        extra=["--on-anomaly", "rollback", "--skip-margin", "100000"],
    )
    assert (
        proc.returncode == 2 and "--skip-margin 100000: a rollback would leave out 100001 steps' batches" in proc.stderr
    )
