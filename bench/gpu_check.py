"""GPU readiness check for one GPU: Markdown tables for the README, in under 8 minutes.

Sections (each prints its table as soon as it is done; each is skipped, with the reason printed,
when the time budget is nearly spent):
  1. training-step time (forward + backward + optimizer step) of the shipped configs at each
     batch x seq, in fp16 (autocast + dynamic loss scaling with torch.amp.GradScaler) and bf16
     (autocast), with DeepSpeed's FusedLamb and with our Lamb, both as pipeline.lamb.select_optimizer
     builds them; ms/step (median of the timed steps), tokens/s, MFU against the GPU's nominal dense
     fp16/bf16 peak and against a matmul peak measured in the same run; which SDPA kernel ran
     (from the profiler) and whether flash attention accepts the model's padding mask;
  2. LAMB parity in fp32: FusedLamb vs our Lamb on two copies of one model, same batches, N steps:
     max |difference| of the parameters, the difference relative to how far training moved them,
     loss curves side by side, PASS/FAIL against --parity-tol;
  3. fp16 dynamic loss scaling over 200 steps of a real deepspeed.initialize engine (ZeRO-2, our
     Lamb): loss-scale trajectory, overflow-skipped steps, the loss going down (FAIL on NaN);
  4. peak GPU memory of deepspeed.initialize engines at ZeRO stages 0-3 (bf16), built as
     albert-pretrain builds them (pipeline.engine.build_engine);
  5. the real `albert-pretrain` command per ZeRO stage and precision (bench/gpu_check_pretrain.py): ZeRO-1/2/3 in
     bf16 and fp16 and ZeRO-0 with FusedLamb, on shards made first with albert-data; samples/s, MFU, host syncs
     per optimizer step (bench/pretrain_probe.py), peak memory, exact resume from an intermediate checkpoint in a
     second process, and `albert-export` loading in transformers. Its shards are made in the background from
     the start; the earlier sections keep the time it needs.

On CPU (--device cpu --smoke) the same code paths run on albert-tiny: fp32 and bf16 only, FusedLamb
replaced in the parity check by a torch restatement of its CUDA kernel (FusedLambReference), fp16
skipped (section 5: two rows, ZeRO-0 bf16 and ZeRO-3 fp16 through albert-pretrain's --allow-fp16-on-cpu,
gloo, no sync counting), memory as the process's RSS growth. Exit code 0: every check passed (skips are
not failures); 1: a check failed or a section raised (a failing section-5 row is named); 2: bad flags.

Example:
    bash bench/gpu_check.sh | tee gpu-check.md           # one GPU; estimated 5-7 minutes, never over --budget
    bash bench/gpu_check.sh --configs albert-base --budget 240
    python bench/gpu_check.py --device cpu --smoke       # the CPU smoke run (about 1.5 minutes on 2 cores)
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here, imports included

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gpu_check_pretrain
import torch
import torch._dynamo
from bench_model import autocast, make_batch, matmul_peak, model_flops, sync, train_step

from pipeline.distributed import shutdown_distributed
from pipeline.fused import PLAIN, FusedOptions, apply_fused
from pipeline.lamb import Lamb
from pipeline.lamb_deepspeed import fused_lamb_param_groups, select_optimizer
from pipeline.model import AlbertConfig, AlbertForPreTraining

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

SDPA_KERNELS = {  # profiler op name -> what ran
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "fused CPU kernel",
    "aten::_scaled_dot_product_attention_math": "SDPA math fallback",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]

# Why --parity-tol defaults to 1e-5 (measured on CPU, 20 fp32 steps, albert-tiny 4 x 32 and albert-base 4 x 64):
PARITY_TOL_WHY = (
    "Tolerance: rounding alone (FusedLamb's rule restated in torch vs our Lamb, same math) gave 1-4e-7; "
    "real differences in the update gave 1e-4 to 4e-4 (weight decay 0.01 vs 0.02), 3e-2 (eps 1e-6 vs 1e-8) and "
    "0.4-0.5 (where the bias correction is applied), so 1e-5 sits 25x above the noise and 10x below the smallest of them."
)


class SectionSkipped(Exception):
    """A section or row that cannot run here (budget, device); the message is printed as the reason."""


# --------------------------------------------------------------------------------------------- small helpers


def nominal_peak_tflops(device_name: str) -> float | None:
    """Nominal dense fp16/bf16 peak of a GPU by its name, or None when the name is not in the table."""
    for pattern, tflops in NOMINAL_PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops
    return None


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
            raise SectionSkipped(f"skipped: budget ({max(left, 0):.0f} s left of {self.total_s:.0f} s{kept}; "
                                 f"needs about {need_s:.0f} s)")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"64x128,16x512" -> [(64, 128), (16, 512)] (batch x seq)."""
    shapes = []
    for part in text.split(","):
        batch, _, seq = part.strip().partition("x")
        if not (batch.isdigit() and seq.isdigit()) or int(batch) < 1 or int(seq) < 8:
            raise argparse.ArgumentTypeError(f"{part!r}: expected BATCHxSEQ such as 64x128 (seq >= 8)")
        shapes.append((int(batch), int(seq)))
    return shapes


def predictions_for(seq: int) -> int:
    """max_predictions_per_seq: 15% of the sequence, rounded up (20 at 128, 77 at 512)."""
    return math.ceil(0.15 * seq)


def batches_on(device: torch.device, cfg: AlbertConfig, batch: int, seq: int, count: int = 1) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in make_batch(cfg, batch, seq, predictions_for(seq), seed=i).items()} for i in range(count)]


def markdown_table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i in numeric else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def shipped_lamb_params() -> dict[str, Any]:
    params = dict(json.loads(SHIPPED_DS_CONFIG.read_text())["optimizer"]["params"])
    params.pop("max_grad_norm", None)  # DeepSpeed's gradient_clipping does this in the engine
    return params


def lamb_ds_config(params: dict[str, Any]) -> dict[str, Any]:
    return {"optimizer": {"type": "Lamb", "params": dict(params)}, "zero_optimization": {"stage": 0}}


def fmt_mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


# --------------------------------------------------------------------------------------------- the report


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


# --------------------------------------------------------------------------------------------- environment


def environment_lines(device: torch.device, args: argparse.Namespace) -> list[str]:
    versions = {name: _version(name) for name in ("torch", "deepspeed")}
    lines = [f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"- GPU: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
                     f"{_driver()}")
    else:
        lines.append(f"- device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", no CUDA build"
    cudnn = f", cuDNN {torch.backends.cudnn.version()}" if device.type == "cuda" and torch.backends.cudnn.is_available() else ""
    lines.append(f"- torch {versions['torch']}{cuda}{cudnn}; deepspeed {versions['deepspeed']}; "
                 f"Python {platform.python_version()}")
    lines.append(f"- time budget {args.budget:.0f} s{'; smoke settings' if args.smoke else ''}; "
                 f"torch.compile {args.compile}; attention {args.attention}")
    return lines


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return f", driver {out.stdout.split()[0]}"
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


@dataclass
class Peaks:
    """fp16/bf16 nominal peak (FLOP/s) and the matmul peaks measured here, per precision name."""

    nominal: float | None
    nominal_source: str
    measured: dict[str, float] = field(default_factory=dict)

    def measure(self, precisions: list[str], device: torch.device, n: int) -> None:
        for name in precisions:
            reps = 20 if device.type == "cuda" else 3
            value = matmul_peak(DTYPES[name], n=n, reps=reps, device=device)
            self.measured[name] = max(self.measured.get(name, 0.0), value)  # best of the measurements

    def nominal_for(self, precision: str) -> float | None:
        return self.nominal if precision in ("fp16", "bf16") else None

    def describe(self) -> str:
        nominal = (f"{self.nominal / 1e12:.0f} TFLOP/s ({self.nominal_source})" if self.nominal
                   else f"unknown ({self.nominal_source})")
        measured = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in self.measured.items()) or "not measured"
        return f"- nominal dense fp16/bf16 peak: {nominal}; measured matmul peak: {measured}"


def resolve_peaks(device: torch.device, override: float | None) -> Peaks:
    if override:
        return Peaks(override * 1e12, "--peak-tflops")
    if device.type != "cuda":
        return Peaks(None, "CPU: no nominal table")
    name = torch.cuda.get_device_name(device)
    tflops = nominal_peak_tflops(name)
    return Peaks(tflops * 1e12 if tflops else None, f"table entry for {name!r}" if tflops else f"{name!r} not in the table; pass --peak-tflops")


# --------------------------------------------------------------------------------------------- FusedLamb


def probe_fused_lamb(device: torch.device, timeout_s: float) -> str | None:
    """None when DeepSpeed's FusedLamb loads here, else why not. Built (JIT) in a child process with a
    timeout, since a stale build lock hangs silently; the build is cached, so loading it later is quick."""
    if device.type != "cuda":
        return "skipped: needs CUDA"
    if timeout_s < 10:
        return f"not tried: budget ({timeout_s:.0f} s left for building it)"
    code = ("from deepspeed.ops.op_builder import FusedLambBuilder as B; b = B(); "
            "assert b.is_compatible(verbose=False), 'FusedLambBuilder: not compatible with this machine'; b.load(verbose=False)")
    t = time.monotonic()
    # its own session: on a timeout the compiler processes it started (ninja, nvcc) are killed with it
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cuda"}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return (f"not available: building it took over {timeout_s:.0f} s (a stale 'lock' file under "
                "~/.cache/torch_extensions/*/fused_lamb makes builds hang)")
    if proc.returncode != 0:
        output = output or ""
        log.warning("FusedLamb build/load failed; the end of its output:\n%s", output[-4000:])
        tail = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
        return f"not available: build/load failed ({tail[0][:200]}; more in the log)"
    log.info("FusedLamb builds and loads (%.0f s in a child process)", time.monotonic() - t)
    return None


class FusedLambReference(torch.optim.Optimizer):
    """DeepSpeed FusedLamb's CUDA kernel (csrc/lamb/fused_lamb_cuda_kernel.cu, eps outside the square
    root, the default) restated per tensor in torch, so that the parity check runs on CPU too:

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2              (moments never bias-corrected)
        u = m / (sqrt(v) + eps) + wd * w;  r = clamp(||w|| / ||u||, min_coeff, max_coeff), 1 if a norm is 0
        w -= s_t * r * u,  s_t = lr * sqrt(1 - b2^t) / (1 - b1^t) with bias_correction, else lr

    The bias correction scales the step after the trust ratio. Our Lamb corrects the moments before
    eps, weight decay and the ratio instead: the ratio cancels the correction's overall scale but not
    its weight against eps and weight decay, so no FusedLamb setting reproduces it.
    """

    def __init__(self, params: Any, lr: float = 1e-3, bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_coeff: float = 10.0, min_coeff: float = 0.01) -> None:
        defaults = {"lr": lr, "bias_correction": bias_correction, "betas": tuple(betas), "eps": eps,
                    "weight_decay": weight_decay, "max_coeff": max_coeff, "min_coeff": min_coeff}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = m / (v.sqrt() + group["eps"]) + group["weight_decay"] * p
                w_norm, u_norm = p.norm(), u.norm()
                ratio = (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"]) if w_norm > 0 and u_norm > 0 else 1.0
                step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t) if group["bias_correction"] else group["lr"]
                p.sub_(step_size * ratio * u)


def our_lamb(params: dict[str, Any]) -> OptimizerFactory:
    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        opt = select_optimizer(model, lamb_ds_config(params), allow_fused=False)[0]
        assert isinstance(opt, Lamb)
        return opt
    return make


def selected_fused_lamb(params: dict[str, Any]) -> OptimizerFactory:
    """DeepSpeed's FusedLamb as albert-pretrain gets it: select_optimizer must pick it for these settings."""
    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        opt, _, description = select_optimizer(model, lamb_ds_config(params), allow_fused=True)
        if isinstance(opt, Lamb):
            raise TypeError(f"select_optimizer did not pick FusedLamb: {description}")
        return opt
    return make


def fused_lamb_factory(params: dict[str, Any], cls: type | None = None) -> OptimizerFactory:
    """FusedLamb (or `cls`, e.g. FusedLambReference) on select_optimizer's groups, built directly: the parity
    check also compares settings (bias correction on) that select_optimizer would not give it."""
    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        from deepspeed.ops.lamb import FusedLamb

        rest = {k: v for k, v in params.items() if k != "weight_decay"}
        return (cls or FusedLamb)(fused_lamb_param_groups(model, float(params.get("weight_decay", 0.0))), **rest)
    return make


# --------------------------------------------------------------------------------------------- 1. step times


def time_steps(model: AlbertForPreTraining, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], device: torch.device,
               dtype: torch.dtype, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds per step over the timed steps, last loss); fp16 runs under a dynamic loss scale."""
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16) if dtype == torch.float16 else None
    times = []
    loss = torch.tensor(float("nan"))
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        loss = train_step(model, opt, batch, device, dtype, scaler)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times), float(loss)


def attention_kernels(model: AlbertForPreTraining, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> str:
    """Which attention kernel one forward + backward really ran, read from the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with autocast(device, dtype):
            loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    names = {e.name for e in prof.events()}
    found = [label for op, label in SDPA_KERNELS.items() if op in names]
    if found:
        return "SDPA " + " + ".join(found)
    return "SDPA (kernel not identified)" if "aten::scaled_dot_product_attention" in names else "explicit matmul + softmax"


def flash_with_padding_mask(model: AlbertForPreTraining, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> str:
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
        return head + [self.attention, f"{1000 * self.seconds:.1f}", f"{self.batch * self.seq / self.seconds:,.0f}",
                       f"{achieved / 1e12:.3g}", f"{achieved / nominal:.1%}" if nominal else "unknown",
                       f"{achieved / measured:.1%}" if measured else "not measured"]


STEP_HEADERS = ["config", "batch x seq", "precision", "optimizer", "attention kernel", "ms/step", "tokens/s", "TFLOP/s",
                "MFU (nominal peak)", "MFU (measured matmul peak)"]


def step_times(args: argparse.Namespace, device: torch.device, budget: Budget, report: Report, peaks: Peaks,
               fused_reason: str | None, reserve_s: float) -> None:
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
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.shapes) * len(precisions))
        torch.manual_seed(0)
        model = AlbertForPreTraining(cfg).to(device).train()
        for line in apply_fused(model, FusedOptions(attention=args.attention, compile=args.compile), device):
            log.info("%s: %s", name, line)
        for batch_size, seq in args.shapes:
            batch = batches_on(device, cfg, batch_size, seq)[0]
            flops = model_flops(cfg, batch_size, seq, predictions_for(seq))
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
                            if name == args.configs[0] and (batch_size, seq) == args.shapes[0] and kernels.startswith("SDPA"):
                                flash_lines.append(f"- {precision}, {name}: forcing the flash backend with the model's padding mask: "
                                                   f"{flash_with_padding_mask(model, batch, device, dtype)}")
                        row.attention = kernels
                        opt = make(model)
                        row.seconds, row.loss = time_steps(model, opt, batch, device, dtype, args.warmup, args.steps)
                        del opt
                        if not math.isfinite(row.loss):
                            row.note = "loss not finite"
                            report.fail(f"step time {name} {batch_size}x{seq} {precision} {label}: loss {row.loss}")
                        log.info("%s %dx%d %s %s: %.1f ms/step, loss %.3f", name, batch_size, seq, precision, label,
                                 1000 * row.seconds, row.loss)
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
    report.emit(f"Step = forward + backward + optimizer step, one process, fp32 weights; bf16 = autocast, fp16 = autocast + "
                f"dynamic loss scaling (torch.amp.GradScaler, initial scale 2^16). Median of {args.steps} timed steps after "
                f"{args.warmup} warmup; tokens/s counts padded positions; FLOPs = matmul FLOPs of forward x 3 "
                f"(bench/bench_model.py model_flops). Optimizers built by pipeline.lamb.select_optimizer with the LAMB "
                f"parameters of {SHIPPED_DS_CONFIG.name}.\n")
    report.emit(peaks.describe())
    notes = []
    if fused_reason is not None:
        notes.append(f"- FusedLamb: {fused_reason}")
    skipped_precisions = sorted(set(args.precisions) - set(precisions))
    if skipped_precisions:
        notes.append(f"- {', '.join(skipped_precisions)}: skipped: needs CUDA (fp16 autocast and loss scaling are GPU paths)")
    report.emit("\n".join(notes + flash_lines) + "\n")
    report.emit(markdown_table(STEP_HEADERS, [r.cells(peaks) for r in rows], numeric={5, 6, 7, 8, 9}))


# --------------------------------------------------------------------------------------------- 2. LAMB parity


@dataclass
class Parity:
    losses_a: list[float]
    losses_b: list[float]
    max_abs: float  # max over elements of |theta_a - theta_b|
    rel: float  # ||theta_a - theta_b|| / ||theta_a - theta_0||: the difference relative to how far training moved

    def agrees(self, tol: float) -> bool:
        finite = all(math.isfinite(x) for x in self.losses_a + self.losses_b)
        return finite and self.rel <= tol


def lamb_parity(cfg: AlbertConfig, make_a: OptimizerFactory, make_b: OptimizerFactory, batches: list[dict[str, torch.Tensor]],
                steps: int, device: torch.device, lr_factor_b: Callable[[int], float] | None = None, seed: int = 0) -> Parity:
    """Train two copies of one model (fp32, explicit attention: deterministic) on the same batches, cycled,
    with optimizers A and B; `lr_factor_b(t)` multiplies B's learning rate at step t (1-based)."""
    torch.manual_seed(seed)
    model_a = AlbertForPreTraining(cfg).to(device).train()
    apply_fused(model_a, PLAIN, device)
    model_b = copy.deepcopy(model_a)
    theta0 = torch.nn.utils.parameters_to_vector(model_a.parameters()).detach().clone()
    opt_a, opt_b = make_a(model_a), make_b(model_b)
    base_lr_b = [g["lr"] for g in opt_b.param_groups]
    losses: tuple[list[float], list[float]] = ([], [])
    for t in range(1, steps + 1):
        batch = batches[(t - 1) % len(batches)]
        if lr_factor_b is not None:
            for g, lr in zip(opt_b.param_groups, base_lr_b, strict=True):
                g["lr"] = lr * lr_factor_b(t)
        for model, opt, curve in ((model_a, opt_a, losses[0]), (model_b, opt_b, losses[1])):
            curve.append(float(train_step(model, opt, batch, device)))
    theta_a = torch.nn.utils.parameters_to_vector(model_a.parameters()).detach()
    theta_b = torch.nn.utils.parameters_to_vector(model_b.parameters()).detach()
    moved = float((theta_a - theta0).norm())
    diff = theta_a - theta_b
    return Parity(losses[0], losses[1], float(diff.abs().max()), float(diff.norm()) / max(moved, 1e-30))


def bias_correction_factor(betas: tuple[float, float]) -> Callable[[int], float]:
    """FusedLamb's step-size factor sqrt(1 - b2^t) / (1 - b1^t)."""
    b1, b2 = betas
    return lambda t: math.sqrt(1 - b2**t) / (1 - b1**t)


@dataclass
class Comparison:
    name: str
    a: str
    b: str
    make_a: OptimizerFactory
    make_b: OptimizerFactory
    expect_equal: bool
    lr_factor_b: Callable[[int], float] | None = None


def parity_comparisons(params: dict[str, Any], fused_available: bool) -> list[Comparison]:
    """FusedLamb (or, without CUDA, its restatement) against our Lamb, with the settings that should and should not agree."""
    cls, fused_name = (None, "FusedLamb") if fused_available else (FusedLambReference, "FusedLambReference (CPU)")

    def fused(p: dict[str, Any]) -> OptimizerFactory:
        return fused_lamb_factory(p, cls)

    off, on = {**params, "bias_correction": False}, {**params, "bias_correction": True}
    factor = bias_correction_factor(tuple(params.get("betas", (0.9, 0.999))))
    comparisons = [
        Comparison("control: our Lamb vs itself", "our Lamb", "our Lamb", our_lamb(on), our_lamb(on), True),
        Comparison("bias_correction off in both (the shipped configs, ALBERT's LAMB)", f"{fused_name}", "our Lamb", fused(off), our_lamb(off), True),
        Comparison("FusedLamb bias_correction on; ours off, lr x sqrt(1-b2^t)/(1-b1^t)", f"{fused_name}", "our Lamb",
                   fused(on), our_lamb(off), True, factor),
        Comparison("bias_correction on in both (FusedLamb's default; not selected by select_optimizer)", f"{fused_name}", "our Lamb", fused(on), our_lamb(on), False),
    ]
    if fused_available:
        comparisons.append(Comparison("FusedLamb kernel vs its torch restatement (bias_correction on)", "FusedLamb",
                                      "FusedLambReference", fused(on), fused_lamb_factory(on, FusedLambReference), True))
    return comparisons


def parity_section(args: argparse.Namespace, device: torch.device, budget: Budget, report: Report,
                   fused_reason: str | None, reserve_s: float) -> None:
    """Section 2."""
    params = shipped_lamb_params()
    batch_size, seq = args.parity_shape
    cfg = AlbertConfig.from_name_or_path(args.parity_config)
    batches = batches_on(device, cfg, batch_size, seq, count=4)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    rows, curves = [], []
    try:
        for comp in parity_comparisons(params, fused_reason is None):
            budget.check(args.parity_seconds, reserve_s)
            log.info("parity: %s", comp.name)
            try:
                r = lamb_parity(cfg, comp.make_a, comp.make_b, batches, args.parity_steps, device, comp.lr_factor_b)
            except Exception as e:
                log.exception("parity comparison failed")
                rows.append([comp.name, comp.a, comp.b, f"error: {type(e).__name__}: {str(e)[:150]}"] + [""] * 5)
                report.fail(f"LAMB parity: {comp.name}: {type(e).__name__}: {e}")
                continue
            agrees = r.agrees(args.parity_tol)
            ok = agrees == comp.expect_equal
            verdict = ("PASS" if ok else "FAIL") + (" (agree)" if agrees else " (differ)")
            if not ok:
                report.fail(f"LAMB parity: {comp.name}: rel. diff {r.rel:.2e}, expected "
                            f"{'<=' if comp.expect_equal else '>'} {args.parity_tol:g}")
            rows.append([comp.name, comp.a, comp.b, f"{r.max_abs:.2e}", f"{r.rel:.2e}",
                         f"{r.losses_a[0]:.4f} -> {r.losses_a[-1]:.4f}", f"{r.losses_b[0]:.4f} -> {r.losses_b[-1]:.4f}",
                         "agree" if comp.expect_equal else "differ", verdict])
            if comp.name.startswith("bias_correction"):
                curves.append((comp, r))
    except SectionSkipped as e:
        rows.append([str(e)] + [""] * 8)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        report.emit(f"{args.parity_config}, fp32, batch {batch_size} x {seq}, {args.parity_steps} steps over 4 fixed batches, "
                    f"two copies of one model (explicit attention), LAMB parameters of {SHIPPED_DS_CONFIG.name} at a "
                    f"constant lr {params['lr']:g}. rel. diff = ||w_A - w_B|| / ||w_A - w_0||; the two agree when it is at most "
                    f"{args.parity_tol:g}. {PARITY_TOL_WHY}\n")
        if fused_reason is not None:
            report.emit(f"- FusedLamb: {fused_reason}; compared through FusedLambReference, a torch restatement of its CUDA "
                        "kernel (checked against the kernel on a GPU)\n")
        report.emit(markdown_table(["comparison", "A", "B", "max abs diff", "rel. diff", "loss A", "loss B", "expected", "result"],
                                   rows, numeric={3, 4}))
        factor = bias_correction_factor(tuple(params["betas"]))
        report.emit(f"\nWith bias_correction on, FusedLamb multiplies every step by sqrt(1-b2^t)/(1-b1^t) (betas {tuple(params['betas'])}): "
                    + ", ".join(f"t={t} {factor(t):.2f}" for t in (1, 10, 100, 1000, 3125))
                    + ". Our Lamb has no such factor: it corrects the moments before eps, weight decay and the trust ratio.")
    if curves:
        headers = ["step"] + [f"{'A' if i == 0 else 'B'}: {c.a if i == 0 else c.b}, {c.name.split(' (')[0]}"
                              for c, _ in curves for i in (0, 1)]
        lines = [[str(t + 1)] + [f"{x[t]:.5f}" for _, r in curves for x in (r.losses_a, r.losses_b)] for t in range(args.parity_steps)]
        report.emit("\nLoss curves (the loss of each step, before its update):\n")
        report.emit(markdown_table(headers, lines, numeric=set(range(1, len(headers)))))


# --------------------------------------------------------------------------------------------- engines (3, 4)


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


def make_engine(cfg: AlbertConfig, ds: dict[str, Any], fused: FusedOptions, device: torch.device) -> tuple[Any, str]:
    """An engine built as albert-pretrain builds it (pipeline.engine.build_engine); returns (engine, the optimizer's log line)."""
    from pipeline.engine import build_engine

    torch.manual_seed(0)
    engine, _, description = build_engine(cfg, ds, fused, device)
    return engine, description


def free_memory(device: torch.device) -> None:
    """Collect what was dropped (engines hold reference cycles) and return cached GPU blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def engine_ds_config(micro: int, stage: int, precision: str, **extra: Any) -> dict[str, Any]:
    shipped = json.loads(SHIPPED_DS_CONFIG.read_text())
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "optimizer": shipped["optimizer"], "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    ds.update(extra)
    return ds


def short_optimizer(description: str) -> str:
    return "FusedLamb" if "FusedLamb (" in description.split(";")[0] else "our Lamb"


def fp16_section(args: argparse.Namespace, device: torch.device, budget: Budget, report: Report, reserve_s: float) -> None:
    """Section 3."""
    from pipeline.engine import loss_scale
    from pipeline.precision import check_precision

    if device.type != "cuda" and not args.fp16_on_cpu:
        raise SectionSkipped("skipped: needs CUDA (DeepSpeed refuses fp16 on this CPU; --fp16-on-cpu runs it with "
                             "DeepSpeed's documented testing override)")
    budget.check(args.fp16_seconds, reserve_s)
    batch_size, seq = args.fp16_shape
    cfg = AlbertConfig.from_name_or_path(args.fp16_config)
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": args.loss_scale_window,
            "hysteresis": 2, "min_loss_scale": 1}
    ds = engine_ds_config(batch_size, 2, "fp16", fp16=fp16)
    check_precision(ds, allow_fp16_on_cpu=args.fp16_on_cpu)  # albert-pretrain's own check (and the CPU override)
    ensure_distributed()
    engine, description = make_engine(cfg, ds, FusedOptions(attention=args.attention, compile="off"), device)
    batches = batches_on(engine.device, cfg, batch_size, seq, count=4)
    scales, losses, skipped = [loss_scale(engine, "fp16")], [], []
    out = None
    t = time.monotonic()
    try:
        for step in range(args.fp16_steps):
            out = engine(**batches[step % len(batches)])
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss.detach()))
            scales.append(loss_scale(engine, "fp16"))
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
    report.emit(f"{args.fp16_config}, batch {batch_size} x {seq}, {n} steps over 4 fixed batches (cycled, so the loss can fall), "
                f"deepspeed.initialize with ZeRO-2 fp16 and dynamic loss scaling (initial_scale_power 16, loss_scale_window "
                f"{args.loss_scale_window}, hysteresis 2, min_loss_scale 1), gradient clipping 1.0; {description}; "
                f"{seconds:.1f} s.\n")
    trajectory = " -> ".join(f"{s:g} (after step {i})" for i, s in changes[:12]) + (" ..." if len(changes) > 12 else "")
    growth = any(b > a for a, b in itertools.pairwise(scales))
    rows = [
        ["loss scale: first / min / max / final", f"{scales[0]:g} / {min(scales):g} / {max(scales):g} / {scales[-1]:g}"],
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
    report.emit("\n" + markdown_table(["step", "loss", "loss scale after the step", "skipped steps so far"],
                                      [[str(i + 1), f"{losses[i]:.4f}", f"{scales[i + 1]:g}", str(skipped[i])] for i in marks],
                                      numeric={1, 2, 3}))


def memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def zero_memory_section(args: argparse.Namespace, device: torch.device, budget: Budget, report: Report,
                        fused_reason: str | None, reserve_s: float = 0.0) -> None:
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
    what = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, from the model's construction to the last step "
            "(above what was allocated before)" if cuda else
            "CPU: the process's resident memory (psutil RSS) sampled after initialize and after each step, minus before "
            "the model; allocator caching makes it a rough measure")
    report.emit(f"bf16, batch {batch_size} x {seq}, {args.zero_steps} steps per stage, one process (world size 1), engines built "
                f"as albert-pretrain builds them (pipeline.engine.build_engine) with "
                f"the LAMB of {SHIPPED_DS_CONFIG.name}. Memory: {what}. With one rank ZeRO has nothing to partition "
                "across, so the stages show each one's own buffers and overheads, not the savings of a multi-GPU run.\n")
    report.emit(markdown_table(["config", "ZeRO stage", "optimizer", "DeepSpeed wrapper", "after initialize (MiB)",
                                "peak (MiB)", "left after release (MiB)", "ms/step", "loss"], rows, numeric={4, 5, 6, 7, 8}))


def zero_memory_row(cfg: AlbertConfig, stage: int, batch: dict[str, torch.Tensor], args: argparse.Namespace,
                    device: torch.device, fused_ok: bool) -> list[str]:
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = memory_now(device)
    ds = engine_ds_config(int(batch["input_ids"].shape[0]), stage, "bf16")
    engine, description = make_engine(cfg, ds, FusedOptions(attention=args.attention, compile="off", fused_lamb=fused_ok), device)
    wrapper = type(engine.optimizer).__name__
    after_init = memory_now(device) - base
    peak_sampled = after_init
    times, loss, out = [], float("nan"), None
    try:
        for _ in range(args.zero_steps):
            sync(device)
            t = time.perf_counter()
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            sync(device)
            times.append(time.perf_counter() - t)
            loss = float(out.loss.detach())
            peak_sampled = max(peak_sampled, memory_now(device) - base)
    finally:
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else peak_sampled
        engine.destroy()
    del engine, out
    free_memory(device)
    left = memory_now(device) - base
    return [short_optimizer(description), wrapper, fmt_mib(after_init), fmt_mib(peak), fmt_mib(left),
            f"{1000 * statistics.median(times):.1f}", f"{loss:.4f}"]


# --------------------------------------------------------------------------------------------- main


SMOKE: dict[str, Any] = {
    "configs": ["albert-tiny"], "shapes": [(8, 32), (4, 64)], "warmup": 1, "steps": 3, "matmul_n": 512,
    "parity_config": "albert-tiny", "parity_shape": (4, 32), "parity_steps": 8,
    "fp16_config": "albert-tiny", "fp16_shape": (4, 32), "fp16_steps": 40, "loss_scale_window": 10,
    "zero_configs": ["albert-tiny"], "zero_shape": (4, 32), "zero_steps": 3,
    **gpu_check_pretrain.SMOKE,
}
SECTIONS = {1, 2, 3, 4, 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    a("--smoke", action="store_true", help="tiny settings (albert-tiny, short sequences, few steps): checks the code paths")
    a("--budget", type=float, default=450.0, help="seconds for the whole run; sections that no longer fit are skipped (default 450)")
    a("--configs", type=lambda s: s.split(","), default=["albert-base"], help="section 1: shipped config names (e.g. albert-base,albert-large)")
    a("--shapes", type=parse_shapes, default=[(64, 128), (16, 512)], help="section 1: BATCHxSEQ list (default 64x128,16x512)")
    a("--precisions", type=lambda s: s.split(","), default=None, help="section 1: fp16,bf16 (default; fp32,bf16 on CPU)")
    a("--warmup", type=int, default=3, help="section 1: untimed steps per row")
    a("--steps", type=int, default=10, help="section 1: timed steps per row (the median is reported)")
    a("--attention", choices=["auto", "sdpa", "math"], default="auto", help="the model's attention (auto = SDPA on CUDA)")
    a("--compile", choices=["off", "on"], default="off", help="section 1: torch.compile the shared layers (costs budget)")
    a("--peak-tflops", type=float, default=None, help="nominal dense fp16/bf16 peak of this GPU, overriding the table")
    a("--matmul-n", type=int, default=None, help="matrix size of the measured matmul peak (default 8192 on CUDA)")
    a("--fused-lamb-build-timeout", type=float, default=240.0, help="seconds allowed for building DeepSpeed's FusedLamb")
    a("--parity-config", default="albert-base", help="section 2: config")
    a("--parity-shape", type=lambda s: parse_shapes(s)[0], default=(16, 128), help="section 2: BATCHxSEQ")
    a("--parity-steps", type=int, default=20, help="section 2: optimizer steps")
    a("--parity-tol", type=float, default=1e-5, help="section 2: largest rel. diff at which the two optimizers agree (see PARITY_TOL_WHY)")
    a("--fp16-config", default="albert-base", help="section 3: config")
    a("--fp16-shape", type=lambda s: parse_shapes(s)[0], default=(32, 128), help="section 3: BATCHxSEQ")
    a("--fp16-steps", type=int, default=200, help="section 3: steps")
    a("--loss-scale-window", type=int, default=50, help="section 3: DeepSpeed's loss_scale_window")
    a("--fp16-on-cpu", action="store_true", help="testing only: run section 3 on CPU with DeepSpeed's fp16 override")
    a("--zero-configs", type=lambda s: s.split(","), default=["albert-base"], help="section 4: configs")
    a("--zero-stages", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3], help="section 4: ZeRO stages")
    a("--zero-shape", type=lambda s: parse_shapes(s)[0], default=(32, 128), help="section 4: BATCHxSEQ")
    a("--zero-steps", type=int, default=3, help="section 4: steps per stage")
    gpu_check_pretrain.add_arguments(p)
    a("--sections", type=lambda s: {int(x) for x in s.split(",")}, default=SECTIONS, help="which sections to run (default 1,2,3,4,5)")
    a("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:  # the smoke values replace the defaults, not what was given explicitly
        defaults = p.parse_args([])
        for key, value in SMOKE.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    if args.precisions and set(args.precisions) - set(DTYPES):
        p.error(f"--precisions: choose from {', '.join(DTYPES)}")
    if min(args.steps, args.fp16_steps, args.zero_steps) < 1:
        p.error("--steps, --fp16-steps, --zero-steps: at least 1")
    if set(args.zero_stages) - {0, 1, 2, 3} or args.sections - SECTIONS:
        p.error("--zero-stages: 0-3; --sections: 1-5")
    gpu_check_pretrain.check_arguments(args, p.error)
    return args


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())  # with its index: torch.cuda.set_device needs one


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    budget = Budget(args.budget, start=STARTED)
    device = resolve_device(args.device)
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    # DeepSpeed JIT-builds its ops with the first ninja on PATH; use the venv's (as albert-pretrain does).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.precisions = args.precisions or (["fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    args.matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 1024)
    # Rough seconds per unit (a section-1 row, a parity comparison, the fp16 run, a ZeRO stage), and what each
    # later section needs at least, kept back from the earlier ones.
    scale = 0.3 if args.smoke else 1.0
    args.row_seconds, args.parity_seconds, args.fp16_seconds, args.zero_seconds = 6 * scale, 8 * scale, 40 * scale, 15 * scale
    fp16_runs = device.type == "cuda" or args.fp16_on_cpu
    pretrain_need = gpu_check_pretrain.section_need(args, device.type)
    least = {2: args.parity_seconds, 3: args.fp16_seconds if fp16_runs else 0.0, 4: 2 * args.zero_seconds, 5: pretrain_need}
    reserve = {k: sum(least[j] for j in args.sections if j > k) for k in (1, 2, 3, 4)}
    # Section 5's shards are made in the background (albert-data in child processes) while sections 1-4 run.
    prep = None
    if 5 in args.sections and args.pretrain_data is None and budget.left() >= pretrain_need:
        folder = (args.pretrain_work or Path(tempfile.mkdtemp(prefix="gpu-check-shards-"))) / "data"
        prep = gpu_check_pretrain.ShardPrep(folder, args.pretrain_vocab, args.pretrain_dupe).start()
    try:
        return run_sections(args, device, budget, reserve, prep)
    finally:
        if prep is not None:
            prep.cancel()
            if args.pretrain_work is None:
                shutil.rmtree(prep.folder.parent, ignore_errors=True)


def run_sections(args: argparse.Namespace, device: torch.device, budget: Budget, reserve: dict[int, float],
                 prep: gpu_check_pretrain.ShardPrep | None) -> int:
    report = Report()
    report.emit(f"## GPU check: {'smoke run' if args.smoke else 'ALBERT on DeepSpeed'}\n")
    report.emit("\n".join(environment_lines(device, args)))
    peaks = resolve_peaks(device, args.peak_tflops)
    t = time.monotonic()
    fused_reason = probe_fused_lamb(device, min(args.fused_lamb_build_timeout, budget.left() - reserve[1] - args.row_seconds))
    loaded = f"builds and loads (checked in a child process in {time.monotonic() - t:.0f} s, JIT build included)"
    report.emit(f"- DeepSpeed FusedLamb: {fused_reason or loaded}")

    if 1 in args.sections:
        with report.section("1. Training-step time"):
            step_times(args, device, budget, report, peaks, fused_reason, reserve[1])
    if 2 in args.sections:
        with report.section("2. LAMB parity: FusedLamb vs our Lamb (fp32)"):
            parity_section(args, device, budget, report, fused_reason, reserve[2])
    if 3 in args.sections:
        with report.section("3. fp16 dynamic loss scaling (DeepSpeed engine)"):
            fp16_section(args, device, budget, report, reserve[3])
    if 4 in args.sections:
        with report.section("4. Peak memory per ZeRO stage (bf16)"):
            zero_memory_section(args, device, budget, report, fused_reason, reserve[4])
    if 5 in args.sections:
        free_memory(device)  # the albert-pretrain processes share this GPU
        with report.section("5. albert-pretrain end to end: ZeRO stages, exact resume, export"):
            gpu_check_pretrain.pretrain_section(args, device, budget, report, peaks, fused_reason, prep)

    spent = args.budget - budget.left()
    verdict = "all checks passed" if not report.failures else f"{len(report.failures)} check(s) FAILED: " + "; ".join(report.failures)
    report.emit(f"\n{verdict} ({spent:.0f} s of the {args.budget:.0f} s budget)")
    shutdown_distributed()  # else torch warns at exit, and can hang or abort there
    return exit_code(report)


def exit_code(report: Report) -> int:
    """0 when every check passed (skips are not failures), 1 when any failed."""
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
