"""Resume on another number of ranks or ZeRO stage (real albert-pretrain runs over gloo): the state the new layout
starts from equals the saved one exactly, per parameter (weights and LAMB's moments, read by DeepSpeed's own getters
on both sides), the step, the LR schedule and the fp16 loss scale carry over, and no example of the epoch is seen twice.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from helpers.engine_helpers import TEST_MODEL, ds_config, metrics, pretrain

pytestmark = pytest.mark.integration

STATE_DUMP = REPO / "tests" / "helpers" / "state_dump.py"
GLOBAL = 8


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def run(out, data, world: int, stage: int, precision: str, accum: int, steps: int, total: int, extra=()):
    ds = ds_config(stage, precision, micro=GLOBAL // world // accum, accum=accum)
    ds["scheduler"]["params"]["total_num_steps"] = total  # one schedule across both parts
    args = ["--record-batches", "--dump", str(out / "dump_dir"), *extra]
    return ok(pretrain(out, data, ds, steps=steps, nproc=world, extra=args, script=STATE_DUMP))


def assert_same_state(saved: dict, loaded: dict) -> None:
    assert saved["params"].keys() == loaded["params"].keys()
    for name, d in saved["params"].items():
        for k, t in d.items():
            assert torch.equal(t, loaded["params"][name][k]), f"{name} {k} differs after the resume"
    for k in ("lamb_step", "global_steps", "global_samples", "lr"):
        assert saved[k] == loaded[k], k


def examples(out) -> list[int]:
    return [
        c
        for f in sorted(out.glob("batches-rank*.jsonl"))
        for line in f.read_text().splitlines()
        for c in json.loads(line)["examples"]
    ]


@pytest.mark.parametrize(
    "first, second",
    [
        ((2, 2, "fp32", 1), (1, 0, "fp32", 2)),  # 2 ranks ZeRO-2 -> 1 rank ZeRO-0, accumulation 2
        ((1, 0, "fp32", 2), (2, 2, "fp32", 1)),  # 1 rank -> 2 ranks
        ((2, 3, "fp32", 1), (2, 1, "fp32", 2)),  # ZeRO-3 -> ZeRO-1, the micro-batch split differently
        ((2, 2, "fp32", 1), (4, 3, "fp32", 1)),  # into ZeRO-3 on 4 ranks: the SOP bias (2 values) not divisible
        ((2, 2, "bf16", 1), (1, 0, "bf16", 1)),  # bf16: ZeRO-2 -> FP16_UnfusedOptimizer's masters at ZeRO-0
    ],
)
def test_resume_on_another_layout_carries_the_state_exactly(first, second, wiki_shards, tmp_path):
    (w1, s1, p1, a1), (w2, s2, p2, a2) = first, second
    run(tmp_path, wiki_shards, w1, s1, p1, a1, steps=6, total=12)
    proc = run(tmp_path, wiki_shards, w2, s2, p2, a2, steps=12, total=12)
    ranks = f"{w2} rank{'s' if w2 > 1 else ''}"
    assert f"resuming a {w1}-rank ZeRO-{s1} ({p1}) checkpoint on {ranks} with ZeRO-{s2} ({p2})" in proc.stderr
    assert_same_state(
        torch.load(tmp_path / "dump_dir" / "saved-step6.pt"), torch.load(tmp_path / "dump_dir" / "loaded-step6.pt")
    )
    seen = examples(tmp_path)
    assert len(seen) == 12 * GLOBAL and len(set(seen)) == len(seen), "an example seen twice across the two parts"
    steps = [m["step"] for m in metrics(tmp_path) if m.get("split", "train") == "train"]
    assert steps == list(range(1, 13))


def test_fp16_loss_scale_and_schedule_carry_over(wiki_shards, tmp_path):
    fp16 = ["--allow-fp16-on-cpu"]
    run(tmp_path, wiki_shards, 2, 2, "fp16", 1, steps=4, total=8, extra=fp16)
    run(tmp_path, wiki_shards, 1, 1, "fp16", 2, steps=6, total=8, extra=fp16)
    saved, loaded = (torch.load(tmp_path / "dump_dir" / f"{k}-step4.pt") for k in ("saved", "loaded"))
    assert_same_state(saved, loaded)
    assert saved["loss_scale"]["cur_scale"] == loaded["loss_scale"]["cur_scale"] == 2.0**8
    for k in ("cur_iter", "last_overflow_iter", "cur_hysteresis"):
        assert saved["loss_scale"][k] == loaded["loss_scale"][k], k
    lines = metrics(tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6] and lines[4]["loss_scale"] == 2.0**8


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(micro=4), "written with a global batch of 8, this run has 4"),
        (
            dict(model={**TEST_MODEL, "hidden_size": 32, "intermediate_size": 64}),
            "written for another model (hidden_size 64 -> 32",
        ),
        (dict(format_version=4), "checkpoint format version 4, newer than this albert-pretrain reads (3)"),
    ],
)
def test_a_checkpoint_that_cannot_continue_is_refused_before_any_step(change, message, wiki_shards, tmp_path):
    ok(pretrain(tmp_path, wiki_shards, ds_config(2, "fp32", micro=4), steps=3, nproc=2))
    marker = tmp_path / "checkpoints" / "step-00000003" / "complete.json"
    meta = json.loads(marker.read_text())
    assert meta["format_version"] == 3 and meta["micro_batch"] == 4 and meta["optimizer_wrapper"]
    if "format_version" in change:  # written by a later version of albert-pretrain
        marker.write_text(json.dumps({**meta, "format_version": change["format_version"]}))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    ds = ds_config(0, "fp32", micro=change.get("micro", 8))
    proc = pretrain(tmp_path, wiki_shards, ds, steps=5, model=change.get("model"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert len(metrics(tmp_path)) == 3


def test_a_checkpoint_with_a_missing_rank_file_is_named(wiki_shards, tmp_path):
    ok(pretrain(tmp_path, wiki_shards, ds_config(2, "fp32", micro=4), steps=3, nproc=2))
    tag = tmp_path / "checkpoints" / "step-00000003"
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    proc = pretrain(tmp_path, wiki_shards, ds_config(0, "fp32", micro=8), steps=5)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{tag} is damaged (zero_pp_rank_1_mp_rank_00_optim_states.pt: missing)" in proc.stderr
    assert "every checkpoint is damaged since it was saved" in proc.stderr and "--resume never" in proc.stderr
    assert len(metrics(tmp_path)) == 3


def test_a_version_1_checkpoint_converts_as_well(wiki_shards, tmp_path):
    """A checkpoint of format version 1 (complete.json without "format_version"), in its oldest form: its loader
    position names no plan, its ZeRO-0 state no parameters, complete.json no micro-batch nor optimizer wrapper. The
    writer's ranks and micro-batch come from complete.json and its DeepSpeed config, the names from LAMB's group
    order."""
    run(tmp_path, wiki_shards, 1, 0, "fp32", 2, steps=4, total=8)
    tag = tmp_path / "checkpoints" / "step-00000004"
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    del states["lamb_param_names"], states["loader"]["plan"], states["loader"]["earlier"]
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    meta = json.loads((tag / "complete.json").read_text())
    del meta["format_version"], meta["micro_batch"], meta["optimizer_wrapper"]
    del meta["files"], meta["data_identity"], meta["vocab_sha256"]  # (added in format 3)
    (tag / "complete.json").write_text(json.dumps(meta))
    run(tmp_path, wiki_shards, 2, 2, "fp32", 1, steps=8, total=8)
    assert_same_state(*(torch.load(tmp_path / "dump_dir" / f"{k}-step4.pt") for k in ("saved", "loaded")))
    seen = examples(tmp_path)
    assert len(seen) == 8 * GLOBAL and len(set(seen)) == len(seen)
