"""The shipped DeepSpeed configs: bf16 with gradient accumulation accumulates the gradients in fp32.

DeepSpeed's default gradient accumulation dtype is the model's (bf16): every micro-batch's gradient would be
added into a bf16 sum, rounding the running sum each time. `"data_types": {"grad_accum_dtype": "fp32"}`
changes that, differently per ZeRO stage (DeepSpeed 0.19.8):
  ZeRO-0: refused (NotImplementedError "unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype=...").
  ZeRO-1: the engine swaps DeepSpeedZeroOptimizer for BF16_Optimizer, which sums into full-size fp32 buffers.
  ZeRO-2: DeepSpeedZeroOptimizer adds each micro-batch's reduced gradient into fp32 partition buffers.
  ZeRO-3: the partitioned gradient buffer (grad_partitions_flat_buffer) is fp32 instead of bf16.
The slow test builds real engines from the shipped configs (tests/helpers/ds_config_worker.py) and looks at the buffer
DeepSpeed accumulates into.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "ds_configs"
WORKER = REPO / "tests" / "helpers" / "ds_config_worker.py"
FP32_ACCUMULATION = {"grad_accum_dtype": "fp32"}
WRAPPERS = {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


def _bf16(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("bf16", {}).get("enabled", False))


def _stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def _accumulates(cfg: dict[str, Any]) -> bool:
    """Whether the config can accumulate micro-batches: explicit steps > 1, or a global batch larger than the
    micro-batch with the steps left to the world size (the GPU configs: 4096 = 64 x steps x ranks)."""
    steps = cfg.get("gradient_accumulation_steps")
    if steps is not None:
        return int(steps) > 1
    batch, micro = cfg.get("train_batch_size"), cfg.get("train_micro_batch_size_per_gpu")
    return batch is not None and (micro is None or int(batch) > int(micro))


def shipped_bf16_configs() -> list[Path]:
    """The shipped bf16 configs that accumulate (the CPU ones, the demo's among them, run one micro-batch per step)."""
    return [p for p in sorted(CONFIGS.glob("*.json")) if _bf16(cfg := json.loads(p.read_text())) and _accumulates(cfg)]


def test_shipped_bf16_configs_that_accumulate_do_so_in_fp32() -> None:
    accumulating = shipped_bf16_configs()
    gpu = [p.name for p in accumulating if p.name.startswith("gpu-")]
    assert gpu == ["gpu-zero1-bf16-lamb-4096.json", "gpu-zero2-bf16-lamb-4096.json", "gpu-zero3-bf16-lamb-4096.json"]
    for path in accumulating:
        cfg = json.loads(path.read_text())
        assert cfg.get("data_types") == FP32_ACCUMULATION, (
            f"{path.name}: bf16 with accumulation needs {FP32_ACCUMULATION}"
        )
        assert _stage(cfg) in (1, 2, 3), (
            f"{path.name}: DeepSpeed refuses fp32 gradient accumulation with bf16 at ZeRO-0"
        )


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Any]:
    """The worker's report for each accumulating bf16 config, plus a ZeRO-0 variant (which DeepSpeed refuses)."""
    tmp = tmp_path_factory.mktemp("ds_configs")
    paths = shipped_bf16_configs()
    zero0 = json.loads(paths[0].read_text())
    zero0["zero_optimization"] = {"stage": 0}
    (tmp / "zero0-bf16.json").write_text(json.dumps(zero0))
    out = tmp / "report.json"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--out", str(out), *map(str, paths), str(tmp / "zero0-bf16.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # ~10 s; more if shm_comm is JIT-built
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.name for p in shipped_bf16_configs()])
def test_shipped_config_accumulates_gradients_in_an_fp32_buffer(name: str, engines: dict[str, Any]) -> None:
    cfg = json.loads((CONFIGS / name).read_text())
    run = engines[name]["shipped"]
    assert "error" not in run, run.get("error")
    assert run["wrapper"] == WRAPPERS[_stage(cfg)]
    first, second, last = run["micro"]
    for seen in (first, second, last):
        assert seen["declared_dtype"] == "torch.float32" and seen["dtypes"] == ["torch.float32"], seen
        assert seen["numel"] >= run["params"], seen  # one buffer for all the (partitioned) parameters
    # The second micro-batch was added into the same buffer, and the sum keeps more than bf16's 8 bits.
    assert second["sum_sq"] != first["sum_sq"]
    assert first["not_bf16"] == 0 < second["not_bf16"], (first, second)
    # Training goes on: finite losses, one optimizer step, our LAMB sees the flat fp32 partitions it was told about.
    assert all(math.isfinite(x) for x in run["losses"]) and run["global_steps"] == 1
    assert run["finite_after_step"] and run["lamb_flat_layouts"] == run["lamb_tensors"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.name for p in shipped_bf16_configs()])
def test_without_the_setting_deepspeed_would_accumulate_in_bf16(name: str, engines: dict[str, Any]) -> None:
    """The control: the same config without "data_types" sums the micro-batches in bf16, also at ZeRO-2 and 3."""
    run = engines[name]["default"]
    assert "error" not in run, run.get("error")
    for seen in run["micro"]:
        assert seen["declared_dtype"] == "torch.bfloat16" and seen["dtypes"] == ["torch.bfloat16"], seen
        assert seen["not_bf16"] == 0
    assert run["global_steps"] == 1


@pytest.mark.slow
def test_deepspeed_refuses_fp32_accumulation_with_bf16_at_zero0(engines: dict[str, Any]) -> None:
    zero0 = engines["zero0-bf16.json"]
    assert (
        "NotImplementedError" in zero0["shipped"]["error"]
        and "grad_accum_dtype=torch.float32" in zero0["shipped"]["error"]
    )
    assert zero0["default"]["wrapper"] == "FP16_UnfusedOptimizer"  # bf16 sums in param.grad
    assert all(seen["dtypes"] == ["torch.bfloat16"] for seen in zero0["default"]["micro"])
