"""The model FLOP count (pipeline/flops.py) against torch's own FLOP counter, the peak table, the phase timer."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
from conftest import REPO
from helpers.model_fixtures import make_batch, small_config
from torch.utils.flop_counter import FlopCounterMode

from pipeline.flops import PeakSource, matmul_kind, resolve_peak, step_flops, table_peak
from pipeline.metrics import MfuBasis, PhaseTimer, peak_memory
from pipeline.model import AlbertForPreTraining

CPU = torch.device("cpu")

# Shared layers in two groups of two (8 layer applications from 4 parameter sets), a factorized embedding (E < H),
# padded sequences and padded prediction slots.
CONFIG = dict(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2, embedding_size=16, hidden_size=64)
EXAMPLES, SEQ, PREDICTIONS = 3, 24, 6


def counted_by_torch(model: torch.nn.Module, batch: dict) -> int:
    """torch.utils.flop_counter's count of one forward + backward: 2 x m x n x k for every mm, addmm and bmm, the
    backward's matmuls included."""
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


def test_step_flops_equal_torchs_flop_counter():
    # The explicit attention: its matmuls are plain bmm's, which torch counts as computed. (The counter does not count
    # CPU's fused SDPA kernel at all, and counts a fused SDPA backward as 5 matmuls instead of 4: it recomputes the
    # scores. Those are hardware FLOPs; MFU counts model FLOPs.)
    cfg = small_config(**CONFIG)
    model = AlbertForPreTraining(cfg)
    model.set_attention("math")
    batch = make_batch(cfg, EXAMPLES, SEQ, PREDICTIONS)
    assert (batch["input_mask"] == 0).any() and (batch["masked_lm_positions"] == 0).any()  # padding is computed too
    flops = step_flops(cfg, EXAMPLES, SEQ, PREDICTIONS)
    # Exactly equal: both count 2 FLOPs per multiply-add of every matmul, and the backward's two matmuls per forward
    # matmul (every input of every matmul needs its gradient, down to the embeddings' LayerNorm).
    assert counted_by_torch(model, batch) == flops.training == 3 * flops.forward
    assert min(flops.embedding_projection, flops.layers, flops.attention, flops.mlm_head, flops.sop_head) > 0

    # Activation checkpointing runs the layers' forward again in the backward: hardware FLOPs, not model FLOPs.
    model.gradient_checkpointing = True
    assert counted_by_torch(model, batch) == flops.training + flops.layers + flops.attention


def test_step_flops_of_transformers_model_equal_torchs_flop_counter():
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "bench"))
    from bench_model import hf_inputs  # the benchmark's conversion of our batch to transformers' inputs

    cfg = small_config(**CONFIG)
    hf_config = transformers.AlbertConfig(**cfg.to_hf_dict(), attn_implementation="eager")
    batch = make_batch(cfg, EXAMPLES, SEQ, PREDICTIONS)
    counted = counted_by_torch(transformers.AlbertForPreTraining(hf_config), hf_inputs(batch))
    full = step_flops(cfg, EXAMPLES, SEQ, PREDICTIONS, gathered=False)
    assert counted == full.training
    # our model computes the last layer and the MLM head for the [CLS] and prediction rows only
    assert step_flops(cfg, EXAMPLES, SEQ, PREDICTIONS).training < full.training


def test_step_flops_scale_with_the_batch_and_count_every_shared_pass():
    cfg = small_config(**CONFIG)
    one, four = step_flops(cfg, 1, SEQ, PREDICTIONS), step_flops(cfg, 4, SEQ, PREDICTIONS)
    assert four.training == 4 * one.training
    fewer_passes = step_flops(small_config(**{**CONFIG, "num_hidden_layers": 2}), 1, SEQ, PREDICTIONS)
    assert fewer_passes.layers < one.layers and fewer_passes.mlm_head == one.mlm_head


@pytest.mark.parametrize(
    "name, matmul, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),  # H100 SXM
        ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
        ("NVIDIA H100 80GB HBM3", "fp32", 67.0),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H100 PCIe", "fp16", 756.5),
        ("NVIDIA H100 NVL", "bf16", 835.5),
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA H200 NVL", "tf32", 417.5),
        ("NVIDIA A100-SXM4-40GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
        ("NVIDIA A100-PCIE-40GB", "fp16", 312.0),
        ("Tesla V100-SXM2-16GB", "fp16", None),  # not in the table: measured at start-up
        ("NVIDIA GH200 480GB", "bf16", None),  # 'GH200' is not 'H200'
    ],
)
def test_peak_table_by_device_name(name, matmul, tflops):
    assert table_peak(name, matmul) == tflops


def test_peak_on_cpu_is_measured_unless_the_flag_gives_it():
    assert matmul_kind(CPU, torch.float32) == "fp32" and matmul_kind(CPU, torch.bfloat16) == "bf16"
    flag = resolve_peak(CPU, torch.bfloat16, 123.0)
    assert (flag.tflops, flag.source, flag.matmul) == (123.0, PeakSource.FLAG, "bf16")
    measured = resolve_peak(CPU, torch.float32, None)
    assert measured.source is PeakSource.MEASURED and measured.matmul == "fp32" and 0 < measured.tflops < 100
    assert measured.device


def test_phase_timer_sums_each_phase_until_read():
    timer = PhaseTimer(CPU)
    for _ in range(2):
        with timer.phase("forward_backward"):
            time.sleep(0.02)
        with timer.phase("optimizer"):
            pass
    seconds = timer.read()
    assert seconds["forward_backward"] >= 0.04 and seconds["optimizer"] < seconds["forward_backward"]
    assert timer.read() == {"forward_backward": 0.0, "optimizer": 0.0}  # read resets


def test_mfu_basis_and_peak_memory():
    basis = MfuBasis(model_flops_per_step=6 * 10**12, ranks=2, peak_tflops=10.0)
    assert basis.tflops_per_sec(steps=4, seconds=2.0) == 6.0  # 24 TFLOP in 2 s over 2 ranks
    device_bytes, rss = peak_memory(CPU)
    assert device_bytes is None and rss > 10 * 2**20 and os.name == "posix"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_peak_tflops_flag_is_a_positive_number(value, capsys):
    from pipeline.run_config import parse_args

    required = ["--deepspeed_config", "x.json", "--model-config", "albert-tiny", "--data", "d", "--output", "o"]
    assert parse_args([*required, "--max-steps", "1", "--peak-tflops", "989.5"]).peak_tflops == 989.5
    with pytest.raises(SystemExit) as stop:
        parse_args([*required, "--max-steps", "1", "--peak-tflops", value])
    assert stop.value.code == 2 and "argument --peak-tflops: must be" in capsys.readouterr().err
