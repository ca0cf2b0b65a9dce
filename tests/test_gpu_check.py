"""bench/gpu_check.py on CPU: the smoke run end to end (a real subprocess), and its parts that decide PASS/FAIL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from engine_helpers import TEST_MODEL
from model_fixtures import small_config

sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gpu_check


def run_check(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


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
    return text[start:end if end > 0 else None]


@pytest.fixture(scope="module")
def smoke() -> subprocess.CompletedProcess:
    return run_check("--smoke")


def test_smoke_run_prints_every_table(smoke):
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    out = smoke.stdout
    assert out.startswith("## GPU check")
    assert "- date: " in out and "- device: CPU" in out and "- torch " in out and "; deepspeed " in out
    assert "all checks passed" in out

    (headers, rows), = markdown_tables(section(out, 1))
    assert headers == gpu_check.STEP_HEADERS
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("albert-tiny", shape, precision, "our Lamb") for shape in ("8 x 32", "4 x 64") for precision in ("fp32", "bf16")]
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

    (headers, rows), = markdown_tables(section(out, 4))
    assert headers[:4] == ["config", "ZeRO stage", "optimizer", "DeepSpeed wrapper"] and "peak (MiB)" in headers
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("0", "our Lamb", "FP16_UnfusedOptimizer"), ("1", "our Lamb", "DeepSpeedZeroOptimizer"),
        ("2", "our Lamb", "DeepSpeedZeroOptimizer"), ("3", "our Lamb", "DeepSpeedZeroOptimizer_Stage3")]
    assert all(float(r[-1]) > 0 for r in rows)  # a finite loss at every stage
    # DeepSpeed's own logs and op-build messages go to stderr: stdout holds the report only.
    assert not any(line.startswith("[20") for line in out.splitlines()) and "built successfully" not in out


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362), ("NVIDIA L40", 181),
    ("NVIDIA L4", 121), ("NVIDIA A10", 125), ("AMD Instinct MI300X", 1307),
    ("NVIDIA H100 NVL", None), ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 3090", None), ("cpu", None),
])
def test_nominal_peak_by_device_name(name, tflops):
    assert gpu_check.nominal_peak_tflops(name) == tflops


def test_peak_override_and_unknown():
    assert gpu_check.resolve_peaks(torch.device("cpu"), 500.0).nominal == 500e12
    peaks = gpu_check.resolve_peaks(torch.device("cpu"), None)
    assert peaks.nominal is None and "unknown" in peaks.describe()


def test_lamb_parity_is_zero_against_itself_and_catches_a_different_rule():
    cfg = small_config()
    cpu = torch.device("cpu")
    batches = gpu_check.batches_on(cpu, cfg, 4, 32, count=2)
    params = gpu_check.shipped_lamb_params()
    on, off = {**params, "bias_correction": True}, {**params, "bias_correction": False}
    tol = 1e-5  # the default of --parity-tol

    same = gpu_check.lamb_parity(cfg, gpu_check.our_lamb(on), gpu_check.our_lamb(on), batches, 6, cpu)
    assert same.max_abs == 0.0 and same.rel == 0.0 and same.agrees(tol)

    # The smallest real difference the tolerance is meant to catch: weight decay 0.01 vs 0.02.
    other_decay = gpu_check.lamb_parity(cfg, gpu_check.our_lamb(on), gpu_check.our_lamb({**on, "weight_decay": 0.02}), batches, 6, cpu)
    assert other_decay.rel > 2 * tol and not other_decay.agrees(tol)

    # FusedLamb's rule (its kernel restated in torch): equal to ours without bias correction, and to ours with
    # FusedLamb's bias correction moved into the learning rate; not equal to ours with bias correction.
    def fused(p):
        return gpu_check.fused_lamb_factory(p, gpu_check.FusedLambReference)

    assert gpu_check.lamb_parity(cfg, fused(off), gpu_check.our_lamb(off), batches, 6, cpu).rel < tol / 10
    factor = gpu_check.bias_correction_factor(params["betas"])
    assert gpu_check.lamb_parity(cfg, fused(on), gpu_check.our_lamb(off), batches, 6, cpu, lr_factor_b=factor).rel < tol / 10
    assert gpu_check.lamb_parity(cfg, fused(on), gpu_check.our_lamb(on), batches, 6, cpu).rel > 100 * tol


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
    params = {**gpu_check.shipped_lamb_params(), "bias_correction": bias_correction}
    from pipeline.model import AlbertForPreTraining

    opt = gpu_check.fused_lamb_factory(params)(AlbertForPreTraining(small_config()))
    assert isinstance(opt, fused_lamb.FusedLamb)
    decay, no_decay = opt.param_groups
    assert decay["bias_correction"] is bias_correction
    # the no-decay group (LayerNorms, biases): no weight decay, and the trust ratio pinned to 1
    assert (no_decay["weight_decay"], no_decay["min_coeff"], no_decay["max_coeff"]) == (0.0, 1.0, 1.0)
    assert (decay["min_coeff"], decay["max_coeff"]) == (params["min_coeff"], params["max_coeff"])


def test_zero_budget_skips_every_section():
    with pytest.raises(gpu_check.SectionSkipped, match="skipped: budget"):
        gpu_check.Budget(0).check(1.0)
    gpu_check.Budget(100).check(10.0, reserve_s=50.0)
    with pytest.raises(gpu_check.SectionSkipped, match="50 s kept for later sections"):
        gpu_check.Budget(100).check(60.0, reserve_s=50.0)

    proc = run_check("--smoke", "--budget", "0", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for number in (1, 2, 4):
        assert "skipped: budget (0 s left of 0 s" in section(proc.stdout, number)
    assert "skipped: needs CUDA" in section(proc.stdout, 3)
    assert "Loss curves" not in proc.stdout and "all checks passed" in proc.stdout


def test_fp16_section_runs_with_the_cpu_override(tmp_path):
    """The GPU-only fp16 engine section, run on CPU through DeepSpeed's documented testing override."""
    model = tmp_path / "model.json"
    model.write_text(json.dumps(TEST_MODEL))
    proc = run_check("--sections", "3", "--fp16-on-cpu", "--fp16-config", str(model), "--fp16-shape", "4x32",
                     "--fp16-steps", "24", "--loss-scale-window", "4", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, trajectory = markdown_tables(section(proc.stdout, 3))
    values = dict(summary[1])
    assert values["loss scale: first / min / max / final"].startswith("65536 /")
    assert values["NaN/inf loss"] == "no" and values["result"] == "PASS"
    assert trajectory[0] == ["step", "loss", "loss scale after the step", "skipped steps so far"]
