"""bench/gpu_check.py on CPU: the smoke run end to end (a real subprocess), and its parts that decide PASS/FAIL."""

from __future__ import annotations

import _thread
import argparse
import json
import os
import subprocess
import sys
import threading
import types
import warnings

import pytest
import torch
from conftest import REPO
from helpers.engine_helpers import TEST_MODEL
from helpers.model_fixtures import small_config

sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gpu_check
import gpu_check_common as common
import gpu_check_parity
import gpu_check_pretrain as gcp
import gpu_check_steps
import pretrain_instrument

from pipeline.lamb_deepspeed import OptimizerKind


def run_check(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", *args],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, row cells) of every Markdown table in `text`."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append((block[0], block[2:]))
            block = []
    return tables


def section(text: str, number: int) -> str:
    start = text.index(f"\n### {number}.")
    end = text.find("\n### ", start + 1)
    return text[start : end if end > 0 else None]


@pytest.fixture(scope="module")
def smoke() -> subprocess.CompletedProcess:
    return run_check("--smoke", timeout=480)  # about a minute alone; much longer on a machine other jobs load


@pytest.mark.slow
def test_smoke_run_prints_every_table(smoke):
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    out = smoke.stdout
    assert out.startswith("## GPU check")
    assert "- date: " in out and "- device: CPU" in out and "- torch " in out and "; deepspeed " in out
    assert "all checks passed" in out

    ((headers, rows),) = markdown_tables(section(out, 1))
    assert headers == gpu_check_steps.STEP_HEADERS
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("albert-tiny", shape, precision, "our Lamb")
        for shape in ("8 x 32", "4 x 64")
        for precision in ("fp32", "bf16")
    ]
    for r in rows:
        assert float(r[5]) > 0 and float(r[6].replace(",", "")) > 0  # ms/step, tokens/s
        assert r[8] == "unknown" and r[9].endswith("%")  # no nominal CPU peak; MFU against the measured matmul peak
    assert {r[4] for r in rows if r[2] == "fp32"} == {"SDPA fused CPU kernel"}  # read from the profiler
    assert "FusedLamb: skipped: needs CUDA" in section(out, 1)

    parity, curves = markdown_tables(section(out, 2))
    assert parity[0] == ["comparison", "A", "B", "max abs diff", "rel. diff", "loss A", "loss B", "expected", "result"]
    assert len(parity[1]) == 4 and all(r[-1].startswith("PASS") for r in parity[1])
    assert parity[1][0][4] == "0.00e+00"  # the control: our Lamb against itself
    assert curves[0][0] == "step" and len(curves[1]) == 8  # loss curves, one line per step

    assert "skipped: needs CUDA" in section(out, 3)

    ((headers, rows),) = markdown_tables(section(out, 4))
    assert headers[:4] == ["config", "ZeRO stage", "optimizer", "DeepSpeed wrapper"] and "peak (MiB)" in headers
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("0", "our Lamb", "FP16_UnfusedOptimizer"),
        ("1", "our Lamb", "DeepSpeedZeroOptimizer"),
        ("2", "our Lamb", "DeepSpeedZeroOptimizer"),
        ("3", "our Lamb", "DeepSpeedZeroOptimizer_Stage3"),
    ]
    assert all(float(r[-1]) > 0 for r in rows)  # a finite loss at every stage

    # Section 5: the real albert-pretrain, per row a straight run, a resumed second process and an export.
    text = section(out, 5)
    ((headers, rows),) = markdown_tables(text)
    assert headers == gcp.CPU_HEADERS
    assert [(r[0], r[1], r[2]) for r in rows] == [("0", "bf16", "our Lamb"), ("3", "fp16", "our Lamb")]
    for r in rows:
        cells = dict(zip(headers, r))
        assert cells["resume exact"] == "yes" and cells["export loads"] == "yes" and cells["result"] == "PASS"
        assert cells["host syncs / step"] == "n/a (CPU)" and float(cells["samples/s"].replace(",", "")) > 0
        assert float(cells["peak RSS (MiB)"].replace(",", "")) > 0
    assert "albert-tiny with the shards' vocabulary of 4,000 pieces" in text and "--compile off" in text
    assert "resume: steps 6-8: 6 micro-batch losses identical" in text
    # DeepSpeed's own logs and op-build messages go to stderr: stdout holds the report only.
    assert not any(line.startswith("[20") for line in out.splitlines()) and "built successfully" not in out


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L40", 181),
        ("NVIDIA L4", 121),
        ("NVIDIA A10", 125),
        ("AMD Instinct MI300X", 1307),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA A10G", None),
        ("NVIDIA GeForce RTX 3090", None),
        ("cpu", None),
    ],
)
def test_nominal_peak_by_device_name(name, tflops):
    assert common.nominal_peak_tflops(name) == tflops


def test_peak_override_and_unknown():
    assert common.resolve_peaks(torch.device("cpu"), 500.0).nominal == 500e12
    peaks = common.resolve_peaks(torch.device("cpu"), None)
    assert peaks.nominal is None and "unknown" in peaks.describe()


def test_lamb_parity_is_zero_against_itself_and_catches_a_different_rule():
    cfg = small_config()
    cpu = torch.device("cpu")
    batches = common.batches_on(cpu, cfg, 4, 32, count=2)
    params = common.shipped_lamb_params()
    on, off = {**params, "bias_correction": True}, {**params, "bias_correction": False}
    tol = 1e-5  # the default of --parity-tol

    same = gpu_check_parity.lamb_parity(cfg, common.our_lamb(on), common.our_lamb(on), batches, 6, cpu)
    assert same.max_abs == 0.0 and same.rel == 0.0 and same.agrees(tol)

    # The smallest real difference the tolerance is meant to catch: weight decay 0.01 vs 0.02.
    other_decay = gpu_check_parity.lamb_parity(
        cfg, common.our_lamb(on), common.our_lamb({**on, "weight_decay": 0.02}), batches, 6, cpu
    )
    assert other_decay.rel > 2 * tol and not other_decay.agrees(tol)

    # FusedLamb's rule (its kernel restated in torch): equal to ours without bias correction, and to ours with
    # FusedLamb's bias correction moved into the learning rate; not equal to ours with bias correction.
    def fused(p):
        return gpu_check_parity.fused_lamb_factory(p, gpu_check_parity.FusedLambReference)

    assert gpu_check_parity.lamb_parity(cfg, fused(off), common.our_lamb(off), batches, 6, cpu).rel < tol / 10
    factor = gpu_check_parity.bias_correction_factor(params["betas"])
    assert (
        gpu_check_parity.lamb_parity(cfg, fused(on), common.our_lamb(off), batches, 6, cpu, lr_factor_b=factor).rel
        < tol / 10
    )
    assert gpu_check_parity.lamb_parity(cfg, fused(on), common.our_lamb(on), batches, 6, cpu).rel > 100 * tol


@pytest.mark.parametrize("bias_correction", [True, False])
def test_fused_lamb_factory_builds_deepspeeds_fusedlamb(bias_correction, monkeypatch):
    """The parity section builds DeepSpeed's real FusedLamb class (also with bias correction on, which
    select_optimizer would refuse) on select_optimizer's groups. Only its CUDA kernel is left out here: the
    builder's load() is stubbed, so the constructor's own checks of the arguments still run."""
    import deepspeed.ops.lamb.fused_lamb as fused_lamb

    class NoKernel:
        def load(self):
            return object()

    monkeypatch.setattr(fused_lamb, "FusedLambBuilder", NoKernel)
    params = {**common.shipped_lamb_params(), "bias_correction": bias_correction}
    from pipeline.model import AlbertForPreTraining

    opt = gpu_check_parity.fused_lamb_factory(params)(AlbertForPreTraining(small_config()))
    assert isinstance(opt, fused_lamb.FusedLamb)
    decay, no_decay = opt.param_groups
    assert decay["bias_correction"] is bias_correction
    # the no-decay group (LayerNorms, biases): no weight decay, and the trust ratio pinned to 1
    assert (no_decay["weight_decay"], no_decay["min_coeff"], no_decay["max_coeff"]) == (0.0, 1.0, 1.0)
    assert (decay["min_coeff"], decay["max_coeff"]) == (params["min_coeff"], params["max_coeff"])


def test_zero_budget_skips_every_section():
    with pytest.raises(common.SectionSkipped, match="skipped: budget"):
        common.Budget(0).check(1.0)
    common.Budget(100).check(10.0, reserve_s=50.0)
    with pytest.raises(common.SectionSkipped, match="50 s kept for later sections"):
        common.Budget(100).check(60.0, reserve_s=50.0)

    proc = run_check("--smoke", "--budget", "0", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for number in (1, 2, 4, 5):
        assert "skipped: budget (0 s left of 0 s" in section(proc.stdout, number)
    assert "skipped: needs CUDA" in section(proc.stdout, 3)
    assert "Loss curves" not in proc.stdout and "all checks passed" in proc.stdout


def test_fp16_section_runs_with_the_cpu_override(tmp_path):
    """The GPU-only fp16 engine section, run on CPU through DeepSpeed's documented testing override."""
    model = tmp_path / "model.json"
    model.write_text(json.dumps(TEST_MODEL))
    proc = run_check(
        "--sections",
        "3",
        "--fp16-on-cpu",
        "--fp16-config",
        str(model),
        "--fp16-shape",
        "4x32",
        "--fp16-steps",
        "24",
        "--loss-scale-window",
        "4",
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, trajectory = markdown_tables(section(proc.stdout, 3))
    values = dict(summary[1])
    assert values["loss scale: first / min / max / final"].startswith("65536 /")
    assert values["NaN/inf loss"] == "no" and values["result"] == "PASS"
    assert trajectory[0] == ["step", "loss", "loss scale after the step", "skipped steps so far"]


# --------------------------------------------------------------------------------------------- section 5: albert-pretrain


def sync_warning() -> None:
    """What torch emits at a synchronizing CUDA call under torch.cuda.set_sync_debug_mode("warn"): TORCH_WARN in
    c10/cuda/CUDAFunctions.cpp (warn_or_error_on_sync; that file is not in the CPU wheel), a UserWarning."""
    warnings.warn(
        pretrain_instrument.SYNC_WARNING + " (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:164.)",
        UserWarning,
        stacklevel=2,
    )


class FakeEngine:
    """A DeepSpeed engine's counting: step() after every micro-batch, global_steps advancing at the boundary."""

    def __init__(self, accum: int):
        self.accum, self.micro, self.global_steps = accum, 0, 0
        self.device, self.optimizer = "cpu", None
        self.backward_calls = 0

    def backward(self, loss):
        self.backward_calls += 1

    def step(self):
        self.micro += 1
        if self.micro % self.accum == 0:
            self.global_steps += 1


def test_instrument_counts_the_sync_warnings_between_optimizer_steps():
    engine = FakeEngine(accum=2)
    instrument = pretrain_instrument.Instrument(count_syncs=True)
    plan = {1: 3, 2: 0, 3: 1, 4: 2, 5: 1, 6: 4}  # syncs in each optimizer step, all from one source line
    with warnings.catch_warnings():
        # albert-pretrain's own filters (main() adds them before setup): they must not hide the syncs
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        warnings.filterwarnings("ignore", category=UserWarning, module=__name__)
        instrument.attach(engine)
        try:
            sync_warning()  # before the first micro-step of step 1: still step 1's
            for step, n in plan.items():
                if step == 4:
                    warnings.filterwarnings("ignore", message=".*synchronizing")  # added while training: overridden
                for micro in range(engine.accum):
                    engine.backward(torch.tensor(float(step + micro)))
                    for _ in range(n - (step == 1) if micro == engine.accum - 1 else 0):
                        sync_warning()  # the same line every time: the 'default' action would show it once
                    if step == 3 and micro == 0:
                        # another Python thread (the loader's prefetch): listed, not counted; a thread Python did
                        # not start (the autograd engine's, running backward hooks): counted
                        t = threading.Thread(target=sync_warning, name="prefetch")
                        t.start()
                        t.join()
                        done = threading.Event()
                        _thread.start_new_thread(lambda done=done: (sync_warning(), done.set()), ())
                        assert done.wait(10)
                    warnings.warn("some other warning", UserWarning, stacklevel=1)  # shown as usual, not counted
                    engine.step()
        finally:
            instrument.finish()
    windows = instrument.counter.windows
    assert [w.step for w in windows] == list(plan)
    assert [w.count for w in windows] == [n + (step == 3) for step, n in plan.items()]
    assert [sum(w.background.values()) for w in windows] == [0, 0, 1, 0, 0, 0]
    assert "[prefetch]" in next(iter(windows[2].background))
    assert all(src.startswith("tests/test_gpu_check.py:") for w in windows for src in w.syncs)
    assert instrument.loss_values() == {s: [float(s), float(s + 1)] for s in plan}
    assert warnings.showwarning is not instrument.counter._show  # uninstalled

    args = argparse.Namespace(max_steps=6, log_interval=7, save_interval=5, eval_interval=0)
    result = instrument.result(args, 0, None)
    # clean steps: not 1-2 (first two), not 5 (save) nor 6 (after the save; final)
    assert result["syncs"]["steps"] == [3, 4] and result["syncs"]["max"] == 2 and result["syncs"]["mean"] == 2.0
    assert result["start_step"] == 0 and result["final_step"] == 6 and result["losses"]["3"] == [3.0, 4.0]


def test_instrument_counts_an_explicit_synchronize_once_and_switches_to_deterministic_kernels():
    counter = pretrain_instrument.SyncCounter()
    owner = types.SimpleNamespace(synchronize=sync_warning)  # like Stream.synchronize, which also warns
    counter._wrap(owner, "synchronize")
    with warnings.catch_warnings():
        counter.install(explicit=False)
        try:
            owner.synchronize()
            owner.synchronize()
            sync_warning()
        finally:
            counter.uninstall()
    assert owner.synchronize is sync_warning  # restored
    (window,) = [counter.boundary(1)]
    assert window.count == 3 and sum(v for k, v in window.syncs.items() if k.endswith("(synchronize)")) == 2

    engine = FakeEngine(accum=1)
    instrument = pretrain_instrument.Instrument(deterministic_from=2, count_syncs=False)
    try:
        instrument.attach(engine)
        flags = []
        for _ in range(1, 5):
            engine.backward(torch.tensor(1.0))
            engine.step()
            flags.append(torch.are_deterministic_algorithms_enabled())
        assert flags == [False, True, True, True]
        assert [w.deterministic for w in instrument.counter.windows] == [False, False, True, True]
    finally:
        torch.use_deterministic_algorithms(False)
        instrument.finish()


def test_clean_steps_leave_out_start_logging_saving_and_deterministic_steps():
    # the GPU rows: 30 steps, a save at 20, logging at the last step only, deterministic kernels from 20 on
    assert pretrain_instrument.clean_steps(1, 30, 31, 20, 0, 20) == list(range(3, 20))
    assert pretrain_instrument.clean_steps(21, 30, 31, 20, 0, 20) == []  # the resumed process: all deterministic
    assert pretrain_instrument.clean_steps(1, 12, 4, 100, 6) == [
        3,
        10,
        11,
    ]  # 4, 8 logged; 6 evaluated; 5, 7, 9 after them; 12 last
    windows = [pretrain_instrument.Window(s, 0.1 * s, {"a.py:1": 1, "b.py:2": s % 2}) for s in range(1, 6)]
    summary = pretrain_instrument.summarize_windows(windows, [2, 3])
    assert (
        summary["max"] == 2
        and summary["mean"] == 1.5
        and summary["per_step_by_source"] == {"a.py:1": 1.0, "b.py:2": 0.5}
    )
    assert summary["seconds_mean"] == pytest.approx(0.25)


def test_pretrain_rows_and_their_deepspeed_configs():
    from pipeline.run_config import resolve_batch

    assert gcp.parse_rows("all") == list(gcp.ALL_ROWS)
    for bad in ("z0-fp16", "z4-bf16", "zero2-bf16", "z1-fp8", "z1-bf16,z1-bf16"):
        with pytest.raises(argparse.ArgumentTypeError):
            gcp.parse_rows(bad)
    cuda = gcp.plan_rows(list(gcp.ALL_ROWS), "cuda")
    assert [(r.stage, r.precision, r.expect_optimizer) for r in cuda] == [
        (0, "bf16", "FusedLamb"),
        (1, "bf16", "our Lamb"),
        (1, "fp16", "our Lamb"),
        (2, "bf16", "our Lamb"),
        (2, "fp16", "our Lamb"),
        (3, "bf16", "our Lamb"),
        (3, "fp16", "our Lamb"),
    ]
    assert {r.expect_optimizer for r in gcp.plan_rows(list(gcp.ALL_ROWS), "cpu")} == {"our Lamb"}
    for row in [*cuda, gcp.PretrainRow(0, "fp32", "FusedLamb")]:
        shipped = json.loads(row.shipped_config().read_text())
        ds = gcp.derive_ds_config(row, 64, 2, 30, 10)
        assert ds["zero_optimization"]["stage"] == row.stage
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (
            128,
            64,
        ) and "gradient_accumulation_steps" not in ds
        batch = resolve_batch(ds, 1)
        assert (batch.micro, batch.accum) == (64, 2)
        assert (
            ds["scheduler"]["params"]["warmup_num_steps"] == 10 and ds["scheduler"]["params"]["total_num_steps"] == 30
        )
        assert ds["optimizer"] == shipped["optimizer"] and ds["optimizer"]["params"]["bias_correction"] is False
        assert ds.get("fp16", {}).get("enabled", False) == (row.precision == "fp16")
        assert ds.get("bf16", {}).get("enabled", False) == (row.precision == "bf16")
        if row.stage == 0:
            assert "data_types" not in ds and ds["zero_optimization"] == {"stage": 0}
        elif row.stage > 1:  # the shipped stage's own settings are kept
            assert ds["zero_optimization"] == shipped["zero_optimization"]


def test_resume_comparison_is_bit_exact():
    straight = {"1": [9.0, 9.1], "4": [8.0, 8.1], "5": [7.5, 7.25], "6": [7.0, 6.9]}
    assert gcp.compare_resume(straight, {"5": [7.5, 7.25], "6": [7.0, 6.9]}, 4, 4, 6).ok
    first = gcp.compare_resume(straight, {"5": [7.5, 7.250000001], "6": [7.0, 6.9]}, 4, 4, 6)
    assert not first.ok and first.note.startswith("step 5:") and "first step after the checkpoint" in first.note
    later = gcp.compare_resume(straight, {"5": [7.5, 7.25], "6": [7.0, 6.8999]}, 4, 4, 6)
    assert not later.ok and later.note.startswith("step 6:") and "step 5 matched" in later.note
    assert "started at step 0" in gcp.compare_resume(straight, {"5": [7.5, 7.25], "6": [7.0, 6.9]}, 0, 4, 6).note
    assert "no loss recorded for step(s) 6" in gcp.compare_resume(straight, {"5": [7.5, 7.25]}, 4, 4, 6).note
    assert not gcp.compare_resume({"5": [float("nan")]}, {"5": [float("nan")]}, 4, 4, 5).ok  # NaN is never exact


def row_result(
    tmp_path,
    row,
    *,
    rc=0,
    optimizer_kind="our Lamb",
    instrument_optimizer="Lamb",
    syncs=1,
    ours=1,
    resumed_rc=0,
    resumed=None,
    export=True,
    log_extra="",
):
    """A RowResult as the section would have made it, from constructed process outcomes."""
    folder = tmp_path / row.key
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "straight.log"
    log.write_text(f"12:00:00 [rank 0] INFO albert-pretrain: launcher: single, 1 rank(s)\n{log_extra}")
    losses = {str(s): [10.0 - 0.1 * s, 10.05 - 0.1 * s] for s in range(1, 31)}
    instrument = {
        "start_step": 0,
        "losses": losses,
        "optimizer_kind": optimizer_kind,
        "optimizer": instrument_optimizer,
        "peak_memory_bytes": 5 * 2**30,
        "syncs": {
            "max": syncs,
            "ours_max": ours,
            "mean": syncs,
            "steps": list(range(3, 20)),
            "seconds_mean": 0.05,
            "per_step_by_source": {}
            if syncs is None
            else {"pipeline/pretrain.py:470": float(ours), "deepspeed/utils/timer.py:237 (synchronize)": syncs - ours},
        },
    }
    r = gcp.RowResult(row, flops_per_step=4e12, samples_per_step=128, nominal_peak=989e12)
    r.straight = gcp.ProcessResult(rc, 20.0, log, instrument if rc == 0 else None)
    if rc == 0:
        resumed_losses = resumed or {k: v for k, v in losses.items() if int(k) > 20}
        rlog = folder / "resumed.log"
        rlog.write_text("RuntimeError: resumed run broke\n" if resumed_rc else "")
        r.resumed = gcp.ProcessResult(
            resumed_rc, 15.0, rlog, {"start_step": 20, "losses": resumed_losses} if resumed_rc == 0 else None
        )
        if resumed_rc == 0:
            r.resume = gcp.compare_resume(losses, resumed_losses, 20, 20, 30)
        r.export = gcp.Check(export, "AlbertForPreTraining loads" if export else "from_pretrained failed: missing keys")
    return r


def test_a_failing_row_fails_the_check_and_is_named(tmp_path):
    rows = gcp.plan_rows(list(gcp.ALL_ROWS), "cuda")
    z0, z1b, z1h, z2b, z2h, z3b, z3h = rows
    results = [
        row_result(tmp_path, z0, optimizer_kind="FusedLamb", instrument_optimizer="FusedLamb"),  # passes
        row_result(tmp_path, z1b, syncs=4, ours=2),  # too many host syncs of ours
        row_result(tmp_path, z1h, resumed={str(s): [1.0, 1.0] for s in range(21, 31)}),  # resumed losses differ
        row_result(
            tmp_path,
            z2b,
            rc=1,
            log_extra="Traceback (most recent call last):\nRuntimeError: CUDA error: out of memory\n",
        ),
        row_result(tmp_path, z2h, rc=None),  # timed out
        row_result(tmp_path, z3b, export=False),
        row_result(tmp_path, z3h, resumed_rc=1),
    ]
    problems = {r.row.key: gcp.row_problems(r, count_syncs=True) for r in results}
    assert problems["z0-bf16"] == []
    assert problems["z1-bf16"] == [
        "2 host syncs of ours in one optimizer step (at most 1): 2 x pipeline/pretrain.py:470, "
        "2 x deepspeed/utils/timer.py:237 (synchronize)"
    ]
    assert problems["z1-fp16"][0].startswith("resume not exact: step 21:")
    assert problems["z2-bf16"] == ["albert-pretrain exited 1: RuntimeError: CUDA error: out of memory"]
    assert problems["z2-fp16"][0].startswith("albert-pretrain timed out after 20 s (log: ")
    assert problems["z3-bf16"] == ["export: from_pretrained failed: missing keys"]
    assert problems["z3-fp16"] == ["resumed albert-pretrain exited 1: RuntimeError: resumed run broke"]

    report = common.Report()
    gcp.report_rows(results, True, report)
    assert gpu_check.exit_code(report) == 1 and gpu_check.exit_code(common.Report()) == 0
    assert len(report.failures) == 6
    for r, failure in zip(results[1:], report.failures, strict=True):
        assert failure.startswith(f"albert-pretrain {r.row.name} ({r.row.key}): ")

    ((headers, cells),) = markdown_tables(gcp.format_table(results, count_syncs=True))
    assert headers == gcp.HEADERS
    by_key = {r.row.key: dict(zip(headers, c)) for r, c in zip(results, cells, strict=True)}
    good = by_key["z0-bf16"]
    assert (good["optimizer"], good["samples/s"], good["host syncs / step"], good["peak GPU memory (MiB)"]) == (
        "FusedLamb",
        "2,560",
        "1 (ours 1)",
        "5,120",
    )
    assert good["MFU (nominal peak)"] == f"{4e12 / 0.05 / 989e12:.1%}" and good["result"] == "PASS"
    assert (good["resume exact"], good["export loads"]) == ("yes", "yes")
    assert by_key["z1-fp16"]["resume exact"] == "no" and by_key["z3-bf16"]["export loads"] == "no"
    assert (
        by_key["z2-bf16"]["result"].startswith("FAIL: albert-pretrain exited 1")
        and by_key["z2-bf16"]["samples/s"] == "-"
    )
    assert all(c["result"].startswith("FAIL") for k, c in by_key.items() if k != "z0-bf16")


def test_the_fusedlamb_row_fails_unless_the_run_chose_fusedlamb(tmp_path):
    (z0,) = gcp.plan_rows(["z0-bf16"], "cuda")
    assert z0.expect_optimizer is OptimizerKind.FUSED_LAMB
    # albert-pretrain falls back to our LAMB when FusedLamb cannot be built: the ZeRO-0 row must not pass then
    fell_back = row_result(tmp_path, z0, optimizer_kind="our Lamb")
    assert gcp.row_problems(fell_back, True) == ["expected FusedLamb but the run chose our Lamb (DeepSpeed wraps Lamb)"]
    # the kind albert-pretrain chose, not the class DeepSpeed wraps alone, decides; and both must say FusedLamb
    wraps_ours = row_result(tmp_path, z0, optimizer_kind="FusedLamb", instrument_optimizer="Lamb")
    assert gcp.row_problems(wraps_ours, True) == [
        "expected FusedLamb but the run chose FusedLamb (DeepSpeed wraps Lamb)"
    ]
    silent = row_result(tmp_path, z0, optimizer_kind=None)
    assert "the run chose no optimizer (none recorded)" in gcp.row_problems(silent, True)[0]
    not_built = gcp.RowResult(
        z0, error="not run: the row needs DeepSpeed's FusedLamb, which is not available here (...)"
    )
    assert gcp.row_problems(not_built, True) == [not_built.error]
    # on CPU the ZeRO-0 row runs our LAMB, and host syncs are not counted
    (cpu_z0,) = gcp.plan_rows(["z0-bf16"], "cpu")
    cpu = row_result(tmp_path, cpu_z0, optimizer_kind="our Lamb", syncs=None)
    assert gcp.row_problems(cpu, count_syncs=False) == []
    ((headers, cells),) = markdown_tables(gcp.format_table([cpu], count_syncs=False, cuda=False))
    assert headers == gcp.CPU_HEADERS and cells[0][5] == "n/a (CPU)" and cells[0][-1] == "PASS"
    # a row left out for the time budget is reported, not failed
    skipped = gcp.RowResult(z0, skipped=["skipped: budget (3 s left of 450 s; needs about 25 s)"])
    assert gcp.row_problems(skipped, True) == []
    ((_, cells),) = markdown_tables(gcp.format_table([skipped], count_syncs=True))
    assert cells[0][-1].startswith("skipped: budget")


def test_the_script_exits_non_zero_naming_the_rows_that_could_not_run(tmp_path):
    """End to end through gpu_check.py's exit code: section 5 given no usable shards fails every row, by name."""
    proc = run_check("--smoke", "--sections", "5", "--pretrain-data", str(tmp_path / "no-shards"), timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ((headers, rows),) = markdown_tables(section(proc.stdout, 5))
    assert [r[-1].split(": ")[:2] for r in rows] == [["FAIL", "not run"]] * 2
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict.startswith("2 check(s) FAILED: albert-pretrain ZeRO-0 bf16 (z0-bf16): not run: no shards")
    assert (
        "albert-pretrain ZeRO-3 fp16 (z3-fp16): not run: no shards" in verdict
        and "no readable manifest.json" in verdict
    )


def test_deepspeeds_own_syncs_are_listed_not_judged(tmp_path):
    """DeepSpeed's ZeRO optimizers and fp16 loss scaler sync on their own every step: counted and listed, while a
    row fails only on syncs made by our code."""
    z1h = next(r for r in gcp.plan_rows(list(gcp.ALL_ROWS), "cuda") if r.key == "z1-fp16")
    assert gcp.row_problems(row_result(tmp_path, z1h, syncs=9, ours=1), count_syncs=True) == []
    assert "2 host syncs of ours" in gcp.row_problems(row_result(tmp_path, z1h, syncs=9, ours=2), count_syncs=True)[0]
    assert gcp.sync_cell({"max": 9, "mean": 9, "ours_max": 1}, True) == "9 (ours 1)"
