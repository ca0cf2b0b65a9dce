"""`albert-pretrain` for real: 2 ranks over gloo, every ZeRO stage, exact resume, signals, faults, clear refusals."""

from __future__ import annotations

import json
import math
import shutil
import signal
import time

import psutil
import pytest
import torch
from conftest import REPO
from helpers.engine_helpers import TEST_MODEL, ds_config, final_params, metrics, pretrain

pytestmark = pytest.mark.integration  # tier: see pyproject.toml

FAULT_WORKER = REPO / "tests" / "helpers" / "fault_worker.py"  # injects the fault from outside albert-pretrain


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_bf16_each_zero_stage(stage, wiki_shards, tmp_path):
    ok(
        pretrain(
            tmp_path,
            wiki_shards,
            ds_config(stage, "bf16"),
            steps=4,
            nproc=2,
            extra=["--eval-data", str(wiki_shards), "--eval-batches", "2"],
        )
    )
    lines = metrics(tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    keys = {
        "step",
        "samples",
        "loss",
        "mlm_loss",
        "sop_loss",
        "mlm_accuracy",
        "sop_accuracy",
        "lr",
        "grad_norm",
        "loss_scale",
        "samples_per_sec",
        "tokens_per_sec",
        "model_flops_per_step",
        "tflops_per_sec",
        "mfu",
        "data_wait_sec",
        "forward_backward_sec",
        "optimizer_sec",
        "peak_device_memory_bytes",
        "peak_rss_bytes",
        "trust_ratio_min",
        "trust_ratio_mean",
        "trust_ratio_max",
        "grad_norm_decay",
        "grad_norm_no_decay",
    }
    assert all(0.01 <= m["trust_ratio_min"] <= m["trust_ratio_mean"] <= m["trust_ratio_max"] <= 10 for m in lines)
    for m in lines:  # the groups' parts of the global norm
        assert m["grad_norm_decay"] > 0 and m["grad_norm_no_decay"] > 0
        assert math.hypot(m["grad_norm_decay"], m["grad_norm_no_decay"]) == pytest.approx(m["grad_norm"], rel=1e-6)
    assert keys <= set(lines[-1]) and lines[-1]["samples"] == 4 * 8 and lines[-1]["loss_scale"] == 1.0
    assert all(0 < m["loss"] < 20 for m in lines)
    info = json.loads((tmp_path / "run-info.json").read_text())
    layout = {"world_size": 2, "zero_stage": stage, "precision": "bf16", "micro_batch": 4, "global_batch": 8}
    assert layout.items() <= info["layout"].items() and info["layout"]["gradient_accumulation"] == 1
    assert info["optimizer"]["kind"] == "our Lamb" and "no CUDA" in info["optimizer"]["description"]
    assert info["peak"]["source"] == "measured" and info["peak"]["matmul"] == "bf16" and info["device"]["type"] == "cpu"
    assert info["model_flops"]["per_step"] == lines[-1]["model_flops_per_step"] > 0
    assert info["attention"]["implementation"] == "explicit" and info["compile"]["enabled"] is False  # CPU, bf16
    for m in lines:
        # this run's own seconds: 2 ranks on a machine with other work, a model far too small to fill a core
        assert 0 < m["mfu"] < 1 and m["tflops_per_sec"] > 0
        assert m["tflops_per_sec"] == pytest.approx(m["mfu"] * info["peak"]["tflops_per_rank"])
        seconds = 8 / m["samples_per_sec"]  # one step per line
        assert m["tflops_per_sec"] == pytest.approx(m["model_flops_per_step"] / seconds / 2 / 1e12)
        assert 0 < m["forward_backward_sec"] < seconds and 0 < m["optimizer_sec"] < seconds
        assert m["peak_rss_bytes"] > 2**20 and m["peak_device_memory_bytes"] is None
        assert m["tokens_per_sec"] <= 8 * 128 / seconds * (1 + 1e-9)  # real tokens (padding is not counted)
    ev = metrics(tmp_path, "eval")
    assert len(ev) == 1 and ev[0]["step"] == 4
    done = json.loads((tmp_path / "checkpoints" / "step-00000004" / "complete.json").read_text())
    assert done["zero_stage"] == stage and done["world_size"] == 2
    assert (done["format_version"], done["precision"], done["micro_batch"], done["global_batch"]) == (3, "bf16", 4, 8)
    assert set(done) == {
        "format_version",
        "world_size",
        "zero_stage",
        "precision",
        "global_batch",
        "micro_batch",
        "optimizer_wrapper",
        "data",
        "model_config",
        "data_identity",
        "vocab_sha256",
        "files",
        "step",
        "tag",
    }


def test_tensorboard_gets_the_same_scalars(wiki_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ok(pretrain(tmp_path, wiki_shards, ds_config(0, "fp32"), steps=3, extra=["--peak-tflops", "0.5"]))
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    lines = metrics(tmp_path)
    numbers = {k for k, v in lines[-1].items() if isinstance(v, (int, float)) and k != "step"}
    assert {"loss", "mlm_accuracy", "lr", "tokens_per_sec", "data_wait_sec", "mfu", "optimizer_sec"} <= numbers
    assert {f"train/{k}" for k in numbers} <= tags  # every number of metrics.jsonl
    for key in ("loss", "mfu", "tflops_per_sec", "forward_backward_sec", "peak_rss_bytes"):
        assert [e.value for e in ea.Scalars(f"train/{key}")] == pytest.approx([m[key] for m in lines], rel=1e-6)
    # --peak-tflops: the peak MFU is computed against, recorded with its source
    info = json.loads((tmp_path / "run-info.json").read_text())
    assert info["peak"] == {"tflops_per_rank": 0.5, "source": "flag", "matmul": "fp32", "rank0_tflops": 0.5}
    assert all(m["mfu"] == pytest.approx(m["tflops_per_sec"] / 0.5) for m in lines)


def test_accumulation_equals_a_larger_micro_batch(wiki_shards, tmp_path):
    big = ok(pretrain(tmp_path / "big", wiki_shards, ds_config(0, "fp32", micro=8, accum=1), steps=5))
    acc = ok(pretrain(tmp_path / "acc", wiki_shards, ds_config(0, "fp32", micro=2, accum=4), steps=5))
    del big, acc
    a, b = final_params(tmp_path / "big"), final_params(tmp_path / "acc")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    la, lb = [m["loss"] for m in metrics(tmp_path / "big")], [m["loss"] for m in metrics(tmp_path / "acc")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_exact_resume_same_examples_bit_identical(wiki_shards, tmp_path):
    ds = ds_config(2, "fp32")
    ok(pretrain(tmp_path / "straight", wiki_shards, ds, steps=12, nproc=2, extra=["--record-batches"]))
    ok(pretrain(tmp_path / "split", wiki_shards, ds, steps=6, nproc=2, extra=["--record-batches"]))
    # the scheduler's total_num_steps comes from --max-steps: give the first half the full schedule
    shutil.rmtree(tmp_path / "split")
    ds_full = ds_config(2, "fp32")
    ds_full["scheduler"]["params"]["total_num_steps"] = 12
    ok(pretrain(tmp_path / "split", wiki_shards, ds_full, steps=6, nproc=2, extra=["--record-batches"]))
    ok(pretrain(tmp_path / "split", wiki_shards, ds_full, steps=12, nproc=2, extra=["--record-batches"]))
    for r in (0, 1):
        seen = [(tmp_path / d / f"batches-rank{r}.jsonl").read_text() for d in ("straight", "split")]
        assert seen[0] == seen[1], "resumed run saw other examples"
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "split")]
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a), "parameters differ after resume"


def test_signal_saves_and_exits_then_resumes(wiki_shards, tmp_path):
    proc = pretrain(tmp_path, wiki_shards, ds_config(2, "fp32"), steps=10_000, nproc=2, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 3:
            break
        time.sleep(0.2)
    ranks = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "pipeline.pretrain" in " ".join(p.cmdline())
    ]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)  # one rank is told, both must stop at the same step
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "stopped by a signal" in out
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*") if (p / "complete.json").exists())
    assert len(saved) == 1
    stopped_at = int(saved[0].split("-")[1])
    assert metrics(tmp_path)[-1]["step"] == stopped_at
    ok(pretrain(tmp_path, wiki_shards, ds_config(2, "fp32"), steps=stopped_at + 2, nproc=2))
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, stopped_at + 3))


def test_killed_during_save_previous_checkpoint_loads(wiki_shards, tmp_path):
    ds = ds_config(0, "fp32")
    ok(pretrain(tmp_path, wiki_shards, ds, steps=3))
    killed = pretrain(
        tmp_path,
        wiki_shards,
        ds,
        steps=6,
        extra=["--save-interval", "5", "--fault", "kill-before-complete"],
        script=FAULT_WORKER,
    )
    assert killed.returncode == -9
    partial = tmp_path / "checkpoints" / "step-00000005"
    assert partial.is_dir() and not (partial / "complete.json").exists()
    proc = ok(pretrain(tmp_path, wiki_shards, ds, steps=6))
    assert "resumed from" in proc.stderr and "step-00000003" in proc.stderr
    assert not partial.exists() and (tmp_path / "checkpoints" / "step-00000006" / "complete.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(wiki_shards, tmp_path):
    ds = ds_config(0, "fp32")
    proc = pretrain(
        tmp_path,
        wiki_shards,
        ds,
        steps=8,
        extra=["--save-interval", "2", "--fault", "nan-at-step:5"],
        script=FAULT_WORKER,
    )
    assert proc.returncode == 2 and "step 5: the loss is not finite" in proc.stderr
    good = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*") if (p / "complete.json").exists())
    assert good[-1] == "step-00000004"
    ok(pretrain(tmp_path, wiki_shards, ds, steps=6))


def test_fp16_path_with_dynamic_loss_scaling(wiki_shards, tmp_path):
    ok(pretrain(tmp_path, wiki_shards, ds_config(2, "fp16"), steps=4, nproc=2, extra=["--allow-fp16-on-cpu"]))
    lines = metrics(tmp_path)
    assert len(lines) == 4 and lines[0]["loss_scale"] == 2.0**8


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda ds, m: m.update(vocab_size=30000),
            "vocabulary has 4000 pieces but the model config says vocab_size 30000",
        ),
        (lambda ds, m: m.update(max_position_embeddings=64), "exceed the model's max_position_embeddings 64"),
        (lambda ds, m: ds.update(train_batch_size=30), "train_batch_size 30"),
        (lambda ds, m: ds.update(fp16={"enabled": True}, zero_optimization={"stage": 0}), "fp16 with ZeRO stage 0"),
        (lambda ds, m: ds.update(fp16={"enabled": True}), "fp16 needs a GPU"),
        (
            lambda ds, m: ds["scheduler"]["params"].update(warmup_num_steps=3),
            "scheduler: warmup_num_steps 3 >= total_num_steps 3",
        ),
        (
            lambda ds, m: ds["optimizer"]["params"].update(eps_inside_sqrt=True),
            "unsupported Lamb params ['eps_inside_sqrt']",
        ),
        (
            lambda ds, m: ds["zero_optimization"].update(offload_optimizer={"device": "cpu"}),
            "zero_optimization.offload_optimizer (device cpu) cannot run with this engine's LAMB",
        ),
    ],
)
def test_refused_before_training(change, message, wiki_shards, tmp_path):
    ds, model = ds_config(2, "fp32"), dict(TEST_MODEL)  # warmup 2 of 3 steps: a valid schedule
    change(ds, model)
    proc = pretrain(tmp_path, wiki_shards, ds, steps=3, model=model)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_other_launchers(launcher, wiki_shards, tmp_path):
    proc = ok(pretrain(tmp_path, wiki_shards, ds_config(1, "bf16", warmup=1), steps=2, nproc=2, launcher=launcher))
    assert f"launcher: {launcher}, 2 rank(s)" in proc.stdout + proc.stderr
    assert len(metrics(tmp_path)) == 2
