"""Sections 3 and 4 of bench/gpu_check.py: real deepspeed.initialize engines, built as albert-pretrain builds them.

3. fp16 dynamic loss scaling over the steps of a ZeRO-2 engine (our Lamb; 200 by default): the loss-scale trajectory,
   overflow-skipped steps, the loss going down (FAIL on NaN);
4. peak memory of bf16 engines at ZeRO stages 0-3, with the time of each engine step (the harness's step timer).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import statistics
import sys
import time
from functools import partial
from typing import Any

import torch
from gpu_check_common import SHIPPED_DS_CONFIG, Budget, Report, SectionSkipped, batches_on, free_memory
from harness import markdown_table, timed

from pipeline.fused import FusedOptions
from pipeline.model import AlbertConfig
from pipeline.run_config import EngineConfig, Precision, engine_config

log = logging.getLogger("gpu_check.engines")


def fmt_mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def ensure_distributed() -> None:
    """One process, world size 1, through the same launcher logic as albert-pretrain (sets RANK=0, WORLD_SIZE=1, ...)."""
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed logs to stdout, which carries only the tables here.
    for handler in ds_logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    if dist.is_initialized():
        return
    from pipeline.distributed import detect_launch, init_distributed

    with contextlib.redirect_stdout(sys.stderr):  # "... built successfully" of a JIT-built op
        init_distributed(detect_launch(), timeout_s=120.0)


def make_engine(cfg: AlbertConfig, config: EngineConfig, fused: FusedOptions, device: torch.device) -> tuple[Any, Any]:
    """An engine built as albert-pretrain builds it (pipeline.engine.build_engine); returns (engine, the optimizer
    chosen: pipeline.lamb_deepspeed.OptimizerChoice)."""
    from pipeline.engine import build_engine

    torch.manual_seed(0)
    return build_engine(cfg, config, fused, device)


def engine_ds_config(micro: int, stage: int, precision: str, **extra: Any) -> dict[str, Any]:
    shipped = json.loads(SHIPPED_DS_CONFIG.read_text())
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": shipped["optimizer"],
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    ds.update(extra)
    return ds


def engine_step(engine: Any, batch: dict[str, torch.Tensor]) -> Any:
    """One training step through a DeepSpeed engine (forward, backward, step), as albert-pretrain's loop makes it;
    returns the model's output."""
    out = engine(**batch)
    engine.backward(out.loss)
    engine.step()
    return out


def fp16_section(
    args: argparse.Namespace, device: torch.device, budget: Budget, report: Report, reserve_s: float
) -> None:
    """Section 3."""
    from pipeline.engine import loss_scale

    if device.type != "cuda" and not args.fp16_on_cpu:
        raise SectionSkipped(
            "skipped: needs CUDA (DeepSpeed refuses fp16 on this CPU; --fp16-on-cpu runs it with "
            "DeepSpeed's documented testing override)"
        )
    budget.check(args.fp16_seconds, reserve_s)
    batch_size, seq = args.fp16_shape
    cfg = AlbertConfig.from_name_or_path(args.fp16_config)
    fp16 = {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": args.loss_scale_window,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    # albert-pretrain's own checks; on CPU the engine is built with DeepSpeed's fp16 testing override
    config = engine_config(engine_ds_config(batch_size, 2, "fp16", fp16=fp16), 1, allow_fp16_on_cpu=args.fp16_on_cpu)
    ensure_distributed()
    engine, optimizer = make_engine(cfg, config, FusedOptions(attention=args.attention, compile="off"), device)
    batches = batches_on(engine.device, cfg, batch_size, seq, count=4)
    scales, losses, skipped = [loss_scale(engine, Precision.FP16)], [], []
    out = None
    t = time.monotonic()
    try:
        for step in range(args.fp16_steps):
            out = engine_step(engine, batches[step % len(batches)])
            losses.append(float(out.loss.detach()))
            scales.append(loss_scale(engine, Precision.FP16))
            skipped.append(engine.skipped_steps)
            if not math.isfinite(losses[-1]):
                break
            if step % 50 == 0 and budget.left() < reserve_s:
                log.warning("fp16: stopping at step %d to keep time for the later sections", step + 1)
                break
    finally:
        engine.destroy()
    del engine, out
    free_memory(device)
    seconds = time.monotonic() - t
    n = len(losses)
    window = max(1, min(10, n // 4))
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    nan = not all(math.isfinite(x) for x in losses)
    changes = [(i, scales[i]) for i in range(1, len(scales)) if scales[i] != scales[i - 1]]
    report.emit(
        f"{args.fp16_config}, batch {batch_size} x {seq}, {n} steps over 4 fixed batches (cycled, so the loss can fall), "
        f"deepspeed.initialize with ZeRO-2 fp16 and dynamic loss scaling (initial_scale_power 16, loss_scale_window "
        f"{args.loss_scale_window}, hysteresis 2, min_loss_scale 1), gradient clipping 1.0; {optimizer.description}; "
        f"{seconds:.1f} s.\n"
    )
    trajectory = " -> ".join(f"{s:g} (after step {i})" for i, s in changes[:12]) + (" ..." if len(changes) > 12 else "")
    growth = any(b > a for a, b in itertools.pairwise(scales))
    rows = [
        [
            "loss scale: first / min / max / final",
            f"{scales[0]:g} / {min(scales):g} / {max(scales):g} / {scales[-1]:g}",
        ],
        ["loss scale changes", f"{len(changes)}: {trajectory or 'none'}"],
        ["loss scale grew after a clean window", "yes" if growth else "no"],
        ["overflow-skipped steps", f"{skipped[-1] if skipped else 0} of {n}"],
        [f"loss: mean of the first {window} / last {window} steps", f"{first:.4f} / {last:.4f}"],
        ["NaN/inf loss", "yes" if nan else "no"],
    ]
    verdict = "PASS"
    if nan:
        verdict = "FAIL: the loss became NaN/inf"
    elif not last < first:
        verdict = "FAIL: the loss did not decrease"
    elif skipped and skipped[-1] > n // 2:
        verdict = "FAIL: more than half of the steps overflowed"
    rows.append(["result", verdict])
    if verdict != "PASS":
        report.fail(f"fp16 loss scaling: {verdict}")
    report.emit(markdown_table(["fp16 engine", "value"], rows))
    every = max(1, n // 8)
    marks = sorted({0, *range(every - 1, n, every), n - 1})
    report.emit(
        "\n"
        + markdown_table(
            ["step", "loss", "loss scale after the step", "skipped steps so far"],
            [[str(i + 1), f"{losses[i]:.4f}", f"{scales[i + 1]:g}", str(skipped[i])] for i in marks],
            numeric={1, 2, 3},
        )
    )


def memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def zero_memory_section(
    args: argparse.Namespace,
    device: torch.device,
    budget: Budget,
    report: Report,
    fused_reason: str | None,
    reserve_s: float = 0.0,
) -> None:
    """Section 4."""
    batch_size, seq = args.zero_shape
    cuda = device.type == "cuda"
    budget.check(args.zero_seconds, reserve_s)
    ensure_distributed()
    rows = []
    for name in args.zero_configs:
        cfg = AlbertConfig.from_name_or_path(name)
        batch = batches_on(device, cfg, batch_size, seq)[0]
        for stage in args.zero_stages:
            head = [name, str(stage)]
            try:
                budget.check(args.zero_seconds, reserve_s)
                rows.append(head + zero_memory_row(cfg, stage, batch, args, device, fused_reason is None))
            except SectionSkipped as e:
                rows.append(head + [str(e)] + [""] * 6)
            except Exception as e:
                log.exception("ZeRO-%d row failed", stage)
                rows.append(head + [f"error: {type(e).__name__}: {str(e)[:150]}"] + [""] * 6)
                report.fail(f"ZeRO memory {name} stage {stage}: {type(e).__name__}: {e}")
    what = (
        "torch.cuda.max_memory_allocated after reset_peak_memory_stats, from the model's construction to the last step "
        "(above what was allocated before)"
        if cuda
        else "CPU: the process's resident memory (psutil RSS) sampled after initialize and after each step, minus before "
        "the model; allocator caching makes it a rough measure"
    )
    report.emit(
        f"bf16, batch {batch_size} x {seq}, {args.zero_steps} steps per stage, one process (world size 1), engines built "
        f"as albert-pretrain builds them (pipeline.engine.build_engine) with "
        f"the LAMB of {SHIPPED_DS_CONFIG.name}. Memory: {what}. With one rank ZeRO has nothing to partition "
        "across, so the stages show each one's own buffers and overheads, not the savings of a multi-GPU run.\n"
    )
    report.emit(
        markdown_table(
            [
                "config",
                "ZeRO stage",
                "optimizer",
                "DeepSpeed wrapper",
                "after initialize (MiB)",
                "peak (MiB)",
                "left after release (MiB)",
                "ms/step",
                "loss",
            ],
            rows,
            numeric={4, 5, 6, 7, 8},
        )
    )


def zero_memory_row(
    cfg: AlbertConfig,
    stage: int,
    batch: dict[str, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
    fused_ok: bool,
) -> list[str]:
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = memory_now(device)
    config = engine_config(engine_ds_config(int(batch["input_ids"].shape[0]), stage, "bf16"), 1)
    engine, optimizer = make_engine(
        cfg, config, FusedOptions(attention=args.attention, compile="off", fused_lamb=fused_ok), device
    )
    wrapper = type(engine.optimizer).__name__
    after_init = memory_now(device) - base
    peak_sampled = after_init
    times, loss, out = [], float("nan"), None
    try:
        for _ in range(args.zero_steps):
            seconds, out = timed(partial(engine_step, engine, batch), device)
            times.append(seconds)
            loss = float(out.loss.detach())
            peak_sampled = max(peak_sampled, memory_now(device) - base)
    finally:
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else peak_sampled
        engine.destroy()
    del engine, out
    free_memory(device)
    left = memory_now(device) - base
    return [
        optimizer.kind.value,
        wrapper,
        fmt_mib(after_init),
        fmt_mib(peak),
        fmt_mib(left),
        f"{1000 * statistics.median(times):.1f}",
        f"{loss:.4f}",
    ]
