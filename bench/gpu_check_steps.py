"""Section 1 of bench/gpu_check.py: training-step time of the shipped configs per batch x seq, precision and optimizer.

A step is forward + backward + optimizer step (bench/harness.py train_step), timed by the harness's step timer (the
median of the timed steps); MFU against the GPU's nominal peak and against a matmul peak measured in the same run; the
attention kernel that ran, from the profiler, and whether flash attention accepts the model's padding mask.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch._dynamo
from gpu_check_common import (
    SHIPPED_DS_CONFIG,
    Budget,
    OptimizerFactory,
    Peaks,
    Report,
    SectionSkipped,
    batches_on,
    our_lamb,
    predictions_for,
    shipped_lamb_params,
)
from harness import DTYPES, autocast, markdown_table, time_step, train_step

from pipeline.flops import step_flops
from pipeline.fused import FusedOptions, apply_fused
from pipeline.lamb_deepspeed import OptimizerKind, build_lamb
from pipeline.model import AlbertConfig, AlbertForPreTraining
from pipeline.run_config import LambSettings

log = logging.getLogger("gpu_check.steps")

SDPA_KERNELS = {  # profiler op name -> what ran
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "fused CPU kernel",
    "aten::_scaled_dot_product_attention_math": "SDPA math fallback",
}


def selected_fused_lamb(params: dict[str, Any]) -> OptimizerFactory:
    """DeepSpeed's FusedLamb as albert-pretrain gets it: build_lamb must pick it for these settings (ZeRO-0)."""

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        choice = build_lamb(model, LambSettings.from_params(params), zero_stage=0, allow_fused=True)
        if choice.kind is not OptimizerKind.FUSED_LAMB or choice.optimizer is None:
            raise TypeError(f"build_lamb did not pick FusedLamb: {choice.description}")
        return choice.optimizer

    return make


def attention_kernels(
    model: AlbertForPreTraining, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> str:
    """Which attention kernel one forward + backward really ran, read from the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, None, batch, device, dtype)
    names = {e.name for e in prof.events()}
    found = [label for op, label in SDPA_KERNELS.items() if op in names]
    if found:
        return "SDPA " + " + ".join(found)
    return (
        "SDPA (kernel not identified)" if "aten::scaled_dot_product_attention" in names else "explicit matmul + softmax"
    )


def flash_with_padding_mask(
    model: AlbertForPreTraining, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> str:
    """Force SDPA's flash backend on the model's forward (which passes a boolean padding mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad(), autocast(device, dtype):
                model(**batch)
        except RuntimeError as e:
            reasons = [str(w.message) for w in caught if "flash" in str(w.message).lower()]
            return "refused: " + " ".join((reasons[0] if reasons else str(e)).split())[:200]
    return "runs"


@dataclass
class StepRow:
    config: str
    batch: int
    seq: int
    precision: str
    optimizer: str
    attention: str = ""
    seconds: float | None = None
    flops: float = 0.0
    loss: float = float("nan")
    note: str = ""

    def cells(self, peaks: Peaks) -> list[str]:
        head = [self.config, f"{self.batch} x {self.seq}", self.precision, self.optimizer]
        if self.seconds is None:
            return head + [self.note or "skipped", "", "", "", "", ""]
        achieved = self.flops / self.seconds
        nominal = peaks.nominal_for(self.precision)
        measured = peaks.measured.get(self.precision)
        return head + [
            self.attention,
            f"{1000 * self.seconds:.1f}",
            f"{self.batch * self.seq / self.seconds:,.0f}",
            f"{achieved / 1e12:.3g}",
            f"{achieved / nominal:.1%}" if nominal else "unknown",
            f"{achieved / measured:.1%}" if measured else "not measured",
        ]


STEP_HEADERS = [
    "config",
    "batch x seq",
    "precision",
    "optimizer",
    "attention kernel",
    "ms/step",
    "tokens/s",
    "TFLOP/s",
    "MFU (nominal peak)",
    "MFU (measured matmul peak)",
]


def step_time_section(
    args: argparse.Namespace,
    device: torch.device,
    budget: Budget,
    report: Report,
    peaks: Peaks,
    fused_reason: str | None,
    reserve_s: float,
) -> None:
    """Section 1."""
    params = shipped_lamb_params()
    optimizers = [("our Lamb", our_lamb(params))]
    if fused_reason is None:
        optimizers.insert(0, ("FusedLamb", selected_fused_lamb(params)))
    precisions = [p for p in args.precisions if not (p == "fp16" and device.type != "cuda")]
    budget.check(args.row_seconds, reserve_s)
    peaks.measure(precisions, device, args.matmul_n)
    rows: list[StepRow] = []
    flash_lines: list[str] = []
    for name in args.configs:
        cfg = AlbertConfig.from_name_or_path(name)
        # One model per config runs every shape and precision: 2 graphs (all rows, the last pass's rows) for each of
        # them. Dynamo counts graphs per code object across models, so reset it per config and allow them all, or
        # later rows would silently run eagerly at its recompile limit (8).
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, 4 * len(args.shapes) * len(precisions)
        )
        torch.manual_seed(0)
        model = AlbertForPreTraining(cfg).to(device).train()
        for line in apply_fused(model, FusedOptions(attention=args.attention, compile=args.compile), device):
            log.info("%s: %s", name, line)
        for batch_size, seq in args.shapes:
            batch = batches_on(device, cfg, batch_size, seq)[0]
            flops = step_flops(cfg, batch_size, seq, predictions_for(seq)).training
            for precision in precisions:
                dtype = DTYPES[precision]
                kernels = ""
                for label, make in optimizers:
                    row = StepRow(name, batch_size, seq, precision, label, flops=flops)
                    rows.append(row)
                    try:
                        budget.check(args.row_seconds, reserve_s)
                        if not kernels:
                            kernels = attention_kernels(model, batch, device, dtype)
                            if (
                                name == args.configs[0]
                                and (batch_size, seq) == args.shapes[0]
                                and kernels.startswith("SDPA")
                            ):
                                flash_lines.append(
                                    f"- {precision}, {name}: forcing the flash backend with the model's padding mask: "
                                    f"{flash_with_padding_mask(model, batch, device, dtype)}"
                                )
                        row.attention = kernels
                        # fp16 runs under a dynamic loss scale, as DeepSpeed's fp16 mode does
                        scaler = (
                            torch.amp.GradScaler(device.type, init_scale=2.0**16) if dtype == torch.float16 else None
                        )
                        step = partial(train_step, model, make(model), batch, device, dtype, scaler)
                        times = time_step(step, args.warmup, args.steps, device)
                        row.seconds, row.loss = times.median, float(times.last)
                        del step  # the optimizer and its state
                        if not math.isfinite(row.loss):
                            row.note = "loss not finite"
                            report.fail(f"step time {name} {batch_size}x{seq} {precision} {label}: loss {row.loss}")
                        log.info(
                            "%s %dx%d %s %s: %.1f ms/step, loss %.3f",
                            name,
                            batch_size,
                            seq,
                            precision,
                            label,
                            1000 * row.seconds,
                            row.loss,
                        )
                    except SectionSkipped as e:
                        row.note = str(e)
                    except Exception as e:
                        log.exception("step time row failed")
                        row.seconds, row.note = None, f"error: {type(e).__name__}: {str(e)[:150]}"
                        report.fail(f"step time {name} {batch_size}x{seq} {precision} {label}: {type(e).__name__}: {e}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        del model
        gc.collect()
    if any(r.seconds is not None for r in rows):
        peaks.measure(precisions, device, args.matmul_n)  # other work may have lowered the first measurement
    report.emit(
        f"Step = forward + backward + optimizer step, one process, fp32 weights; bf16 = autocast, fp16 = autocast + "
        f"dynamic loss scaling (torch.amp.GradScaler, initial scale 2^16). Median of {args.steps} timed steps after "
        f"{args.warmup} warmup; tokens/s counts padded positions; FLOPs = matmul FLOPs of forward x 3 "
        f"(pipeline/flops.py step_flops). Optimizers built by pipeline.lamb_deepspeed.build_lamb with the LAMB "
        f"parameters of {SHIPPED_DS_CONFIG.name}.\n"
    )
    report.emit(peaks.describe())
    notes = []
    if fused_reason is not None:
        notes.append(f"- FusedLamb: {fused_reason}")
    skipped_precisions = sorted(set(args.precisions) - set(precisions))
    if skipped_precisions:
        notes.append(
            f"- {', '.join(skipped_precisions)}: skipped: needs CUDA (fp16 autocast and loss scaling are GPU paths)"
        )
    report.emit("\n".join(notes + flash_lines) + "\n")
    report.emit(markdown_table(STEP_HEADERS, [r.cells(peaks) for r in rows], numeric={5, 6, 7, 8, 9}))
