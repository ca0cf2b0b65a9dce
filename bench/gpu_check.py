"""GPU readiness check for one GPU: Markdown tables for docs/performance.md, in under 8 minutes.

Sections (each prints its table as soon as it is done; each is skipped, with the reason printed,
when the time budget is nearly spent):
  1. training-step time (forward + backward + optimizer step) of the shipped configs at each
     batch x seq, in fp16 (autocast + dynamic loss scaling with torch.amp.GradScaler) and bf16
     (autocast), with DeepSpeed's FusedLamb and with our Lamb, both as pipeline.lamb_deepspeed.build_lamb
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
     per optimizer step (bench/pretrain_instrument.py), peak memory, exact resume from an intermediate checkpoint in a
     second process, and `albert-export` loading in transformers. Its shards are made in the background from
     the start; the earlier sections keep the time it needs.

On CPU (--device cpu --smoke) the same code paths run on albert-tiny: fp32 and bf16 only, FusedLamb
replaced in the parity check by a torch restatement of its CUDA kernel (FusedLambReference), fp16
skipped (section 5: two rows, ZeRO-0 bf16 and ZeRO-3 fp16 through albert-pretrain's --allow-fp16-on-cpu,
gloo, no sync counting), memory as the process's RSS growth. Exit code 0: every check passed (skips are
not failures); 1: a check failed or a section raised (a failing section-5 row is named); 2: bad flags.

Modules: this file parses the flags, keeps the budget and prints the report's head; each section lives in its own
module: gpu_check_steps.py (1), gpu_check_parity.py (2), gpu_check_engines.py (3, 4), gpu_check_pretrain.py (5);
what they share is in gpu_check_common.py, the step timer, peaks, batches and FLOP count in harness.py.

Example:
    bash bench/gpu_check.sh | tee gpu-check.md           # one GPU; estimated 5-7 minutes, never over --budget
    bash bench/gpu_check.sh --configs albert-base --budget 240
    python bench/gpu_check.py --device cpu --smoke       # the CPU smoke run (about 1.5 minutes on 2 cores)
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here, imports included

import argparse
import datetime
import importlib.metadata
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import gpu_check_pretrain
import torch
from gpu_check_common import Budget, Report, free_memory, resolve_peaks
from gpu_check_engines import fp16_section, zero_memory_section
from gpu_check_parity import parity_section
from gpu_check_steps import step_time_section
from harness import DTYPES

from pipeline.distributed import shutdown_distributed

log = logging.getLogger("gpu_check")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """ "64x128,16x512" -> [(64, 128), (16, 512)] (batch x seq)."""
    shapes = []
    for part in text.split(","):
        batch, _, seq = part.strip().partition("x")
        if not (batch.isdigit() and seq.isdigit()) or int(batch) < 1 or int(seq) < 8:
            raise argparse.ArgumentTypeError(f"{part!r}: expected BATCHxSEQ such as 64x128 (seq >= 8)")
        shapes.append((int(batch), int(seq)))
    return shapes


# --------------------------------------------------------------------------------------------- environment and FusedLamb


def environment_lines(device: torch.device, args: argparse.Namespace) -> list[str]:
    versions = {name: _version(name) for name in ("torch", "deepspeed")}
    lines = [f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(
            f"- GPU: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
            f"{_driver()}"
        )
    else:
        lines.append(f"- device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", no CUDA build"
    cudnn = (
        f", cuDNN {torch.backends.cudnn.version()}"
        if device.type == "cuda" and torch.backends.cudnn.is_available()
        else ""
    )
    lines.append(
        f"- torch {versions['torch']}{cuda}{cudnn}; deepspeed {versions['deepspeed']}; "
        f"Python {platform.python_version()}"
    )
    lines.append(
        f"- time budget {args.budget:.0f} s{'; smoke settings' if args.smoke else ''}; "
        f"torch.compile {args.compile}; attention {args.attention}"
    )
    return lines


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return f", driver {out.stdout.split()[0]}"
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def try_fused_lamb(device: torch.device, timeout_s: float) -> str | None:
    """None when DeepSpeed's FusedLamb loads here, else why not. Built (JIT) in a child process with a
    timeout, since a stale build lock hangs silently; the build is cached, so loading it later is quick."""
    if device.type != "cuda":
        return "skipped: needs CUDA"
    if timeout_s < 10:
        return f"not tried: budget ({timeout_s:.0f} s left for building it)"
    code = (
        "from deepspeed.ops.op_builder import FusedLambBuilder as B; b = B(); "
        "assert b.is_compatible(verbose=False), 'FusedLambBuilder: not compatible with this machine'; b.load(verbose=False)"
    )
    t = time.monotonic()
    # its own session: on a timeout the compiler processes it started (ninja, nvcc) are killed with it
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cuda"},
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return (
            f"not available: building it took over {timeout_s:.0f} s (a stale 'lock' file under "
            "~/.cache/torch_extensions/*/fused_lamb makes builds hang)"
        )
    if proc.returncode != 0:
        output = output or ""
        log.warning("FusedLamb build/load failed; the end of its output:\n%s", output[-4000:])
        tail = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
        return f"not available: build/load failed ({tail[0][:200]}; more in the log)"
    log.info("FusedLamb builds and loads (%.0f s in a child process)", time.monotonic() - t)
    return None


# --------------------------------------------------------------------------------------------- main


SMOKE: dict[str, Any] = {
    "configs": ["albert-tiny"],
    "shapes": [(8, 32), (4, 64)],
    "warmup": 1,
    "steps": 3,
    "matmul_n": 512,
    "parity_config": "albert-tiny",
    "parity_shape": (4, 32),
    "parity_steps": 8,
    "fp16_config": "albert-tiny",
    "fp16_shape": (4, 32),
    "fp16_steps": 40,
    "loss_scale_window": 10,
    "zero_configs": ["albert-tiny"],
    "zero_shape": (4, 32),
    "zero_steps": 3,
    **gpu_check_pretrain.SMOKE,
}
SECTIONS = {1, 2, 3, 4, 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings (albert-tiny, short sequences, few steps): checks the code paths",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=450.0,
        help="seconds for the whole run; sections that no longer fit are skipped (default 450)",
    )
    p.add_argument(
        "--configs",
        type=lambda s: s.split(","),
        default=["albert-base"],
        help="section 1: shipped config names (e.g. albert-base,albert-large)",
    )
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        default=[(64, 128), (16, 512)],
        help="section 1: BATCHxSEQ list (default 64x128,16x512)",
    )
    p.add_argument(
        "--precisions",
        type=lambda s: s.split(","),
        default=None,
        help="section 1: fp16,bf16 (default; fp32,bf16 on CPU)",
    )
    p.add_argument("--warmup", type=int, default=3, help="section 1: untimed steps per row")
    p.add_argument("--steps", type=int, default=10, help="section 1: timed steps per row (the median is reported)")
    p.add_argument(
        "--attention",
        choices=["auto", "sdpa", "math"],
        default="auto",
        help="the model's attention (auto = SDPA on CUDA)",
    )
    p.add_argument(
        "--compile",
        choices=["off", "on"],
        default="off",
        help="section 1: torch.compile the shared layers (costs budget)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="nominal dense fp16/bf16 peak of this GPU, overriding the table"
    )
    p.add_argument(
        "--matmul-n", type=int, default=None, help="matrix size of the measured matmul peak (default 8192 on CUDA)"
    )
    p.add_argument(
        "--fused-lamb-build-timeout",
        type=float,
        default=240.0,
        help="seconds allowed for building DeepSpeed's FusedLamb",
    )
    p.add_argument("--parity-config", default="albert-base", help="section 2: config")
    p.add_argument("--parity-shape", type=lambda s: parse_shapes(s)[0], default=(16, 128), help="section 2: BATCHxSEQ")
    p.add_argument("--parity-steps", type=int, default=20, help="section 2: optimizer steps")
    p.add_argument(
        "--parity-tol",
        type=float,
        default=1e-5,
        help="section 2: largest rel. diff at which the two optimizers agree (see gpu_check_parity.PARITY_TOL_WHY)",
    )
    p.add_argument("--fp16-config", default="albert-base", help="section 3: config")
    p.add_argument("--fp16-shape", type=lambda s: parse_shapes(s)[0], default=(32, 128), help="section 3: BATCHxSEQ")
    p.add_argument("--fp16-steps", type=int, default=200, help="section 3: steps")
    p.add_argument("--loss-scale-window", type=int, default=50, help="section 3: DeepSpeed's loss_scale_window")
    p.add_argument(
        "--fp16-on-cpu", action="store_true", help="testing only: run section 3 on CPU with DeepSpeed's fp16 override"
    )
    p.add_argument("--zero-configs", type=lambda s: s.split(","), default=["albert-base"], help="section 4: configs")
    p.add_argument(
        "--zero-stages",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 1, 2, 3],
        help="section 4: ZeRO stages",
    )
    p.add_argument("--zero-shape", type=lambda s: parse_shapes(s)[0], default=(32, 128), help="section 4: BATCHxSEQ")
    p.add_argument("--zero-steps", type=int, default=3, help="section 4: steps per stage")
    gpu_check_pretrain.add_arguments(p)
    p.add_argument(
        "--sections",
        type=lambda s: {int(x) for x in s.split(",")},
        default=SECTIONS,
        help="which sections to run (default 1,2,3,4,5)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
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
    args.row_seconds, args.parity_seconds, args.fp16_seconds, args.zero_seconds = (
        6 * scale,
        8 * scale,
        40 * scale,
        15 * scale,
    )
    fp16_runs = device.type == "cuda" or args.fp16_on_cpu
    pretrain_need = gpu_check_pretrain.section_need(args, device.type)
    least = {
        2: args.parity_seconds,
        3: args.fp16_seconds if fp16_runs else 0.0,
        4: 2 * args.zero_seconds,
        5: pretrain_need,
    }
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


def run_sections(
    args: argparse.Namespace,
    device: torch.device,
    budget: Budget,
    reserve: dict[int, float],
    prep: gpu_check_pretrain.ShardPrep | None,
) -> int:
    report = Report()
    report.emit(f"## GPU check: {'smoke run' if args.smoke else 'ALBERT on DeepSpeed'}\n")
    report.emit("\n".join(environment_lines(device, args)))
    peaks = resolve_peaks(device, args.peak_tflops)
    t = time.monotonic()
    fused_reason = try_fused_lamb(
        device, min(args.fused_lamb_build_timeout, budget.left() - reserve[1] - args.row_seconds)
    )
    loaded = f"builds and loads (checked in a child process in {time.monotonic() - t:.0f} s, JIT build included)"
    report.emit(f"- DeepSpeed FusedLamb: {fused_reason or loaded}")

    if 1 in args.sections:
        with report.section("1. Training-step time"):
            step_time_section(args, device, budget, report, peaks, fused_reason, reserve[1])
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
    verdict = (
        "all checks passed"
        if not report.failures
        else f"{len(report.failures)} check(s) FAILED: " + "; ".join(report.failures)
    )
    report.emit(f"\n{verdict} ({spent:.0f} s of the {args.budget:.0f} s budget)")
    shutdown_distributed()  # else torch warns at exit, and can hang or abort there
    return exit_code(report)


def exit_code(report: Report) -> int:
    """0 when every check passed (skips are not failures), 1 when any failed."""
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
