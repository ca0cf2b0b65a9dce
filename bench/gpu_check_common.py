"""What the sections of bench/gpu_check.py share: the time budget, the report, the peaks MFU is measured against,
synthetic batches, the shipped LAMB settings. The sections import this module, never gpu_check.py (the entry point
imports them)."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from harness import make_batch, matmul_peaks

from pipeline.lamb import Lamb
from pipeline.lamb_deepspeed import build_lamb
from pipeline.model import AlbertConfig
from pipeline.run_config import LambSettings

log = logging.getLogger("gpu_check")

REPO = Path(__file__).resolve().parents[1]
# The LAMB hyper-parameters of the shipped GPU configs (ALBERT's recipe); all sections use them.
SHIPPED_DS_CONFIG = REPO / "ds_configs" / "gpu-zero2-fp16-lamb-4096.json"


# Nominal dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets,
# matched against torch.cuda.get_device_name() in this order (the first match wins).
NOMINAL_PEAKS: tuple[tuple[str, float | None], ...] = (
    (r"H[12]00.*NVL", None),  # clocks differ from SXM and PCIe: give --peak-tflops
    (r"H[18]00.*PCIe", 756.0),
    (r"GH200|H100|H200|H800", 989.0),  # SXM parts; H200 has the H100 SXM's compute
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"V100", 125.0),  # fp16 only: V100 has no bf16 tensor cores
    (r"MI300X", 1307.0),
)


OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


class SectionSkipped(Exception):
    """A section or row that cannot run here (budget, device); the message is printed as the reason."""


# --------------------------------------------------------------------------------------------- budget and report


@dataclass
class Budget:
    """Wall-clock budget of the whole run; sections ask before they start."""

    total_s: float
    start: float = field(default_factory=time.monotonic)  # main() passes STARTED

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def check(self, need_s: float, reserve_s: float = 0.0) -> None:
        """Raise SectionSkipped unless `need_s` fits in what is left after keeping `reserve_s` for later sections."""
        left = self.left()
        if left - reserve_s < need_s:
            kept = f", {reserve_s:.0f} s kept for later sections" if reserve_s > 0 else ""
            raise SectionSkipped(
                f"skipped: budget ({max(left, 0):.0f} s left of {self.total_s:.0f} s{kept}; needs about {need_s:.0f} s)"
            )


class Report:
    """Prints Markdown to stdout as sections finish; remembers what failed."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def emit(self, text: str = "") -> None:
        print(text, flush=True)

    def fail(self, what: str) -> None:
        self.failures.append(what)
        log.error("FAILED: %s", what)

    @contextlib.contextmanager
    def section(self, title: str) -> Iterator[None]:
        self.emit(f"\n### {title}\n")
        log.info("section: %s", title)
        t = time.monotonic()
        try:
            yield
        except SectionSkipped as e:
            self.emit(str(e))
        except Exception as e:  # report and go on: one broken section must not hide the others
            log.exception("section %r raised", title)
            self.emit(f"ERROR: {type(e).__name__}: {e}")
            self.fail(f"{title}: {type(e).__name__}: {e}")
        log.info("section %r took %.1f s", title, time.monotonic() - t)


# --------------------------------------------------------------------------------------------- peaks


def nominal_peak_tflops(device_name: str) -> float | None:
    """Nominal dense fp16/bf16 peak of a GPU by its name, or None when the name is not in the table."""
    for pattern, tflops in NOMINAL_PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops
    return None


@dataclass
class Peaks:
    """fp16/bf16 nominal peak (FLOP/s) and the matmul peaks measured here, per precision name."""

    nominal: float | None
    nominal_source: str
    measured: dict[str, float] = field(default_factory=dict)

    def measure(self, precisions: list[str], device: torch.device, n: int) -> None:
        """Measure (again): each precision keeps the best of its measurements."""
        self.measured.update(
            matmul_peaks(precisions, device, before=self.measured, n=n, reps=20 if device.type == "cuda" else 3)
        )

    def nominal_for(self, precision: str) -> float | None:
        return self.nominal if precision in ("fp16", "bf16") else None

    def describe(self) -> str:
        nominal = (
            f"{self.nominal / 1e12:.0f} TFLOP/s ({self.nominal_source})"
            if self.nominal
            else f"unknown ({self.nominal_source})"
        )
        measured = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in self.measured.items()) or "not measured"
        return f"- nominal dense fp16/bf16 peak: {nominal}; measured matmul peak: {measured}"


def resolve_peaks(device: torch.device, override: float | None) -> Peaks:
    if override:
        return Peaks(override * 1e12, "--peak-tflops")
    if device.type != "cuda":
        return Peaks(None, "CPU: no nominal table")
    name = torch.cuda.get_device_name(device)
    tflops = nominal_peak_tflops(name)
    return Peaks(
        tflops * 1e12 if tflops else None,
        f"table entry for {name!r}" if tflops else f"{name!r} not in the table; pass --peak-tflops",
    )


# --------------------------------------------------------------------------------------------- batches, LAMB, memory


def predictions_for(seq: int) -> int:
    """max_predictions_per_seq: 15% of the sequence, rounded up (20 at 128, 77 at 512)."""
    return math.ceil(0.15 * seq)


def batches_on(
    device: torch.device, cfg: AlbertConfig, batch: int, seq: int, count: int = 1
) -> list[dict[str, torch.Tensor]]:
    """`count` different synthetic batches (seeds 0, 1, ...) on `device`."""
    return [make_batch(cfg, batch, seq, predictions_for(seq), seed=i, device=device) for i in range(count)]


def shipped_lamb_params() -> dict[str, Any]:
    params = dict(json.loads(SHIPPED_DS_CONFIG.read_text())["optimizer"]["params"])
    params.pop("max_grad_norm", None)  # DeepSpeed's gradient_clipping does this in the engine
    return params


def our_lamb(params: dict[str, Any]) -> OptimizerFactory:
    """Our Lamb as albert-pretrain gets it (build_lamb at ZeRO-0 with FusedLamb not allowed)."""

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        opt = build_lamb(model, LambSettings.from_params(params), zero_stage=0, allow_fused=False).optimizer
        assert isinstance(opt, Lamb)
        return opt

    return make


def free_memory(device: torch.device) -> None:
    """Collect what was dropped (engines hold reference cycles) and return cached GPU blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
