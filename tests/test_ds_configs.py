"""The shipped DeepSpeed configs: all of them one recipe (ALBERT's), and bf16 with gradient accumulation accumulates
the gradients in fp32.

The recipe is written out once below (RECIPE, SCALES, PRECISIONS); every file in ds_configs/ must equal the config
its name and the recipe make, so the configs stay complete JSON files that cannot drift apart.

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

import copy
import json
import math
import os
import re
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

# ALBERT's pretraining recipe (Lan et al., 2020; google-research/albert's run_pretraining.py): LAMB with betas
# (0.9, 0.999), eps 1e-6, weight decay 0.01 and no bias correction, the trust ratio clamped to [0.01, 10]; gradients
# clipped to norm 1.0; the learning rate rising linearly from 0 to its peak, then falling linearly to 0
# (WarmupDecayLR). What every shipped config holds, whatever its scale, ZeRO stage and precision:
RECIPE: dict[str, Any] = {
    "gradient_clipping": 1.0,
    "optimizer": {
        "type": "Lamb",
        "params": {
            "betas": [0.9, 0.999],
            "eps": 1e-06,
            "weight_decay": 0.01,
            "bias_correction": False,
            "max_coeff": 10.0,
            "min_coeff": 0.01,
        },
    },
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_type": "linear"}},
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}
# The scale, by the name's prefix. gpu: ALBERT's own, a batch of 4096 (micro-batches of 64, accumulated over however
# many ranks and steps make it), peak lr 0.00176, 3,125 warmup steps of 125,000; with bf16 the micro-batches'
# gradients are summed in fp32. cpu: the demo's, micro-batch 16 without accumulation, peak lr 0.003, 30 warmup steps,
# total_num_steps left to --max-steps.
SCALES: dict[str, dict[str, Any]] = {
    "gpu": {
        "batch": {"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 64},
        "lr": 0.00176,
        "schedule": {"warmup_num_steps": 3125, "total_num_steps": 125000},
        "bf16_extra": {"data_types": {"grad_accum_dtype": "fp32"}},
        "zero_extra": {"overlap_comm": True, "contiguous_gradients": True},  # at ZeRO-2 and 3
    },
    "cpu": {
        "batch": {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1},
        "lr": 0.003,
        "schedule": {"warmup_num_steps": 30},
        "bf16_extra": {},
        "zero_extra": {},
    },
}
# The precision, by the name: its DeepSpeed section (fp16: dynamic loss scaling from 2^16, floor 1).
PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"bf16": {"enabled": True}},
    "fp16": {
        "fp16": {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    },
}
CONFIG_NAME = re.compile(r"(?P<scale>cpu|gpu)-zero(?P<stage>[0-3])-(?P<precision>fp32|bf16|fp16)-lamb(-4096)?\.json")


def recipe_config(name: str) -> dict[str, Any]:
    """The whole config that a file of this name must hold: RECIPE at the name's scale, ZeRO stage and precision."""
    m = CONFIG_NAME.fullmatch(name)
    assert m, f"{name}: not a <cpu|gpu>-zero<stage>-<precision>-lamb[-4096].json name"
    scale, stage, precision = SCALES[m["scale"]], int(m["stage"]), m["precision"]
    cfg = copy.deepcopy(RECIPE)
    cfg.update(scale["batch"])
    cfg["optimizer"]["params"]["lr"] = scale["lr"]
    cfg["scheduler"]["params"].update(warmup_max_lr=scale["lr"], **scale["schedule"])
    cfg["zero_optimization"] = {"stage": stage, **(scale["zero_extra"] if stage >= 2 else {})}
    cfg.update(copy.deepcopy(PRECISIONS[precision]))
    if precision == "bf16":
        cfg.update(copy.deepcopy(scale["bf16_extra"]))
    return cfg


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


def test_every_shipped_config_is_the_recipe_at_its_scale_stage_and_precision() -> None:
    shipped = sorted(CONFIGS.glob("*.json"))
    assert shipped
    for path in shipped:
        cfg, expected = json.loads(path.read_text()), recipe_config(path.name)
        differ = sorted(k for k in set(cfg) | set(expected) if cfg.get(k) != expected.get(k))
        assert not differ, (
            f"{path.name} departs from the recipe in {differ}: {[(cfg.get(k), expected.get(k)) for k in differ]}"
        )


def test_the_recipe_check_catches_a_drifted_config() -> None:
    cfg = json.loads((CONFIGS / "gpu-zero2-bf16-lamb-4096.json").read_text())
    assert cfg == recipe_config("gpu-zero2-bf16-lamb-4096.json")
    cfg["optimizer"]["params"]["weight_decay"] = 0.02
    assert cfg != recipe_config("gpu-zero2-bf16-lamb-4096.json")


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
    # albert-pretrain refuses it before DeepSpeed would, in one line
    assert "bf16 with data_types.grad_accum_dtype fp32 needs ZeRO 1-3" in zero0["shipped"]["refused"]
    assert zero0["default"]["refused"] is None
    assert zero0["default"]["wrapper"] == "FP16_UnfusedOptimizer"  # bf16 sums in param.grad
    assert all(seen["dtypes"] == ["torch.bfloat16"] for seen in zero0["default"]["micro"])
