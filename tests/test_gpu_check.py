"""bench/gpu_check.py on CPU: its smoke run end to end (real albert-pretrain runs, read back from what they wrote),
its preflight, and the parts that decide PASS/FAIL."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import gpu_check

from pipeline.run_config import Precision, engine_config


def run_check(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run(
        [sys.executable, "bench/gpu_check.py", *args],
        check=False,
        cwd=REPO,
        env={**env, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, row cells) of the one Markdown table in `text`."""
    block = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line[:1] == "|"]
    return block[0], block[2:]


@pytest.mark.slow
def test_smoke_run_reports_what_each_run_wrote(wiki_shards, tmp_path):
    work = tmp_path / "work"
    smoke = run_check(
        "--device", "cpu", "--smoke", "--pretrain-data", str(wiki_shards), "--pretrain-work", str(work), timeout=1500
    )
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    out = smoke.stdout
    assert out.startswith("## GPU check: CPU smoke run") and "every row passed" in out
    headers, rows = markdown_table(out)
    assert headers == gpu_check.HEADERS
    assert [r[0] for r in rows] == list(gpu_check.SMOKE_ROWS)
    for cells in rows:
        cell = dict(zip(headers, cells))
        assert cell["result"] == "PASS"
        run = work / cells[0] / "run"
        info = json.loads((run / "run-info.json").read_text())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        clean = records[1:]  # the first logging interval holds start-up
        assert cell["samples/s"] == f"{statistics.fmean(r['samples_per_sec'] for r in clean):,.1f}"
        assert cell["MFU"] == f"{statistics.fmean(r['mfu'] for r in clean):.1%}"
        assert cell["optimizer (DeepSpeed wrapper)"] == (
            f"{info['optimizer']['kind']} ({info['optimizer']['deepspeed_wrapper']})"
        )
        assert cell["loss first -> last"] == f"{records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}"
        assert cell["peak memory (MiB)"] == f"{records[-1]['peak_rss_bytes'] / 2**20:,.0f}"  # CPU: no device peak
    wrappers = {r[0]: r[1] for r in rows}
    assert wrappers["z0-bf16"] == "our Lamb (FP16_UnfusedOptimizer)"
    assert wrappers["z2-bf16"] == "our Lamb (DeepSpeedZeroOptimizer)"
    assert {r[0]: r[2] for r in rows}["parity-eager"] == "explicit; compile off"
    # same weights and data: SDPA against the explicit form in fp32 differs by rounding only
    first, worst = re.search(r"- parity-fused: loss vs eager: step 1 (\S+), max (\S+) over 4 steps", out).groups()
    assert float(first) <= float(worst) < 1e-5
    assert "- device: " in out and "deepspeed 0.19" in out and "- DeepSpeed FusedLamb: no CUDA" in out
    # DeepSpeed's logs go to each run's log file: stdout holds the report only
    assert not any(line.startswith("[20") for line in out.splitlines())


def test_without_cuda_the_check_stops_in_one_line():
    """This machine has no GPU: the check measures nothing unless asked for its CPU smoke mode."""
    for args in ([], ["--device", "cpu"]):
        result = run_check(*args)
        assert result.returncode == 2 and result.stdout == ""
        (line,) = [x for x in result.stderr.splitlines() if x.strip()]
        assert line.startswith("gpu_check: ") and ("no CUDA device visible" in line or "--smoke" in line)


def test_preflight_names_every_missing_module_at_once():
    missing = gpu_check.missing_modules(("json", "no_such_module_a", "no_such_module_b"))
    assert missing == ["no_such_module_a", "no_such_module_b"]
    assert gpu_check.missing_modules(gpu_check.RUN_MODULES + gpu_check.DEEPSPEED_MODULES) == []  # this venv has all
    # DeepSpeed's import needs these (deepspeed/__init__.py and what it imports at start)
    assert set(gpu_check.DEEPSPEED_MODULES) >= {"packaging", "einops", "msgpack", "tqdm", "psutil", "numpy"}
    assert set(gpu_check.RUN_MODULES) >= {"tensorboard", "h5py", "safetensors"}


@pytest.mark.parametrize("key", gpu_check.ALL_ROWS)
def test_every_row_gets_a_deepspeed_config_albert_pretrain_accepts(key):
    row = gpu_check.make_row(key)
    ds = gpu_check.derive_ds_config(row, micro=4, accum=2, ranks=2, steps=30, warmup=5)
    config = engine_config(ds, world=2, max_steps=30, allow_fp16_on_cpu=True)
    assert config.zero_stage == row.stage and config.precision == Precision(row.precision)
    assert (config.batch.micro, config.batch.accum, config.batch.global_size) == (4, 2, 16)
    assert ds["scheduler"]["params"]["total_num_steps"] == 30
    assert row.parity == key.startswith("parity") and (row.compile == "on") == key.endswith(("compile", "compiled"))


def test_row_names_are_checked():
    assert gpu_check.parse_rows("z1-bf16, z2-bf16") == ["z1-bf16", "z2-bf16"]
    assert gpu_check.parse_rows("all") == list(gpu_check.ALL_ROWS)
    for wrong in ("z0-fp16", "z1-bf16,z1-bf16", "z4-bf16", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            gpu_check.parse_rows(wrong)


def result_with(key: str, losses: list[float], kind: str = "our Lamb", **info) -> gpu_check.Result:
    """A row's result as a finished run would give it: its metrics lines and run-info."""
    records = [{"step": i + 1, "loss": x, "samples_per_sec": 10.0 + i} for i, x in enumerate(losses)]
    run_info = {"optimizer": {"kind": kind, "description": "why"}, "compile": info.get("compile", {})}
    return gpu_check.Result(gpu_check.make_row(key), gpu_check.RunRead(records, run_info))


def test_parity_fails_beyond_the_tolerance_and_says_by_how_much():
    eager = result_with("parity-eager", [9.0, 8.5, 8.0])
    close, far = (
        result_with("parity-fused", [9.0, 8.5, 8.0 * (1 + 5e-4)]),
        result_with("parity-compiled", [9.0, 8.6, 8.0]),
    )
    gpu_check.compare_parity(eager, close, tol=1e-3)
    gpu_check.compare_parity(eager, far, tol=1e-3)
    assert close.status == "PASS" and "max 5.0e-04 over 3 steps" in close.notes[0]
    assert far.status.startswith("FAIL: loss differs from parity-eager by 1.18e-02")


def test_a_zero0_row_fails_on_cuda_unless_the_run_chose_fusedlamb():
    ours, fused = result_with("z0-bf16", [9.0, 8.0]), result_with("z0-bf16", [9.0, 8.0], kind="FusedLamb")
    gpu_check.judge(ours, cuda=True)
    gpu_check.judge(fused, cuda=True)
    assert ours.status.startswith("FAIL: the run chose our Lamb, not FusedLamb") and fused.status == "PASS"
    cpu = result_with("z0-bf16", [9.0, 8.0])
    gpu_check.judge(cpu, cuda=False)
    assert cpu.status == "PASS"
    nan = result_with("z2-bf16", [9.0, float("nan")])
    gpu_check.judge(nan, cuda=False)
    assert nan.status == "FAIL: a logged loss is not finite"


def test_zero1_vs_zero2_by_the_stated_rule():
    def rates(z1: float, z2: float) -> dict[str, gpu_check.Result]:
        return {"z1-bf16": result_with("z1-bf16", [9.0, 8.0]), "z2-bf16": result_with("z2-bf16", [9.0, 8.0])} | {
            k: gpu_check.Result(
                gpu_check.make_row(k), gpu_check.RunRead([{"step": 1, "loss": 1.0, "samples_per_sec": v}], {})
            )
            for k, v in (("z1-bf16", z1), ("z2-bf16", z2))
        }

    assert "gpu-zero2-bf16-lamb-4096.json" in gpu_check.zero_default(rates(104.0, 100.0))  # a tie goes to ZeRO-2
    assert "gpu-zero1-bf16-lamb-4096.json" in gpu_check.zero_default(rates(106.0, 100.0))
    assert "not decided" in gpu_check.zero_default({"z2-bf16": result_with("z2-bf16", [1.0])})


def test_compile_counters_are_read_from_run_info():
    recorded = result_with(
        "z2-bf16-compile",
        [9.0],
        compile={"counters": {"graph_breaks": 2, "unique_graphs": 3, "graph_break_reasons": {}}},
    )
    assert gpu_check.compile_counters(recorded) == "counters: graph_breaks 2, unique_graphs 3"
    assert "not in run-info.json" in (gpu_check.compile_counters(result_with("z2-bf16-compile", [9.0])) or "")
    assert gpu_check.compile_counters(result_with("z2-bf16", [9.0])) is None  # compile off: nothing to report


def test_a_run_that_times_out_is_a_failed_row_naming_its_log(wiki_shards, tmp_path):
    args = gpu_check.parse_args(["--device", "cpu", "--smoke", "--pretrain-data", str(wiki_shards)])
    (tmp_path / "model.json").write_text("{}")
    result = gpu_check.run_row(gpu_check.make_row("z2-bf16"), tmp_path, Path(wiki_shards), args, False, 1.0)
    assert result.status.startswith("FAIL: timed out after 1 s") and str(tmp_path / "z2-bf16" / "pretrain.log") in (
        result.failure or ""
    )
