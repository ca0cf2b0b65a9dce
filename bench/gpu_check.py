"""GPU check: the real `albert-pretrain`, one process per row, read back from what each run writes.

Every row runs `python -m pipeline.pretrain` (under torchrun with --ranks N > 1) on shards made first with
`albert-data`, then reads the run's OUTPUT/metrics.jsonl (throughput, MFU, phase times, peak memory, losses) and
OUTPUT/run-info.json (optimizer and DeepSpeed wrapper, attention kernel, compile, device, peak, versions). Nothing is
measured from outside the run: MFU is the run's own (pipeline.flops: model FLOPs against the device's peak).

Rows (on CUDA; --pretrain-rows picks):
- parity (ZeRO-0, fp32, TF32 off, losses at every step): `parity-eager` (explicit attention, compile off, our LAMB)
  against `parity-fused` (SDPA, DeepSpeed's FusedLamb) and `parity-compiled` (the same, torch.compile on; it also
  reports torch._dynamo's graph-break and fallback counters when the run records them in run-info.json). A row
  fails when its loss at some step differs from eager's by more than --parity-tol (relative);
- engine layouts: z0-bf16 (FusedLamb under DeepSpeed's FP16_UnfusedOptimizer), z1/z2/z3 in bf16 and fp16, and
  z2-bf16-compile: samples/s, TFLOP/s and MFU of the intervals after the first (start-up and compile left out),
  phase times per step, peak device memory, loss scale and skipped steps. A row fails when the process fails, a loss
  is not finite, or a ZeRO-0 row did not get FusedLamb where it builds;
- after the table: which of ZeRO-1 and ZeRO-2 the shipped bf16 default should be (ZEROS_RULE).

Where DeepSpeed's FusedLamb does not build within --fused-lamb-build-timeout, the rows that need it are skipped with
the reason (not failed). Without CUDA the check stops with one line; `--device cpu --smoke` is the CPU smoke mode
(albert-tiny, few steps; tests/test_gpu_check.py). Exit code 0: no row failed (skips are not failures); 1: a row
failed; 2: the check could not start (missing modules, no CUDA, bad flags).

    bash bench/gpu_check.sh | tee gpu-check.md                      # one GPU, under 8 minutes
    python bench/gpu_check.py --device cpu --smoke --pretrain-data DIR  # the CPU smoke run
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here

import argparse
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"
log = logging.getLogger("gpu_check")

# What DeepSpeed's import needs beyond torch, and what albert-pretrain needs (all found before anything runs).
DEEPSPEED_MODULES = ("deepspeed", "packaging", "einops", "msgpack", "tqdm", "psutil", "numpy")
RUN_MODULES = ("torch", "tensorboard", "h5py", "safetensors")
SHARD_MODULES = ("sentencepiece", "blingfire", "mwparserfromhell")  # albert-data, when the shards are made here

ENGINE_ROWS = ("z0-bf16", "z1-bf16", "z2-bf16", "z3-bf16", "z1-fp16", "z2-fp16", "z3-fp16", "z2-bf16-compile")
PARITY_ROWS = ("parity-eager", "parity-fused", "parity-compiled")
ALL_ROWS = PARITY_ROWS + ENGINE_ROWS
SMOKE_ROWS = ("parity-eager", "parity-fused", "z0-bf16", "z2-bf16")
ZEROS_RULE = (
    "ZeRO-1 only if its samples/s beat ZeRO-2's by more than 5%: ZeRO-2 also partitions the gradients, which saves "
    "memory per rank at any world size above 1 (a one-GPU run cannot show that), so it wins ties"
)

DEFAULTS: dict[str, Any] = {
    "pretrain_config": "albert-base",
    "pretrain_steps": 30,
    "pretrain_log_interval": 10,
    "pretrain_parity_steps": 20,
    "pretrain_micro": 64,
    "pretrain_accum": 2,
    "pretrain_warmup": 10,
    "pretrain_vocab": 8000,
    "pretrain_timeout": 180.0,
}
SMOKE: dict[str, Any] = {
    "pretrain_config": "albert-tiny",
    "pretrain_steps": 6,
    "pretrain_log_interval": 2,
    "pretrain_parity_steps": 4,
    "pretrain_micro": 4,
    "pretrain_accum": 2,
    "pretrain_warmup": 2,
    "pretrain_vocab": 4000,
    "pretrain_timeout": 300.0,
    "budget": 1200.0,  # four runs of albert-pretrain on a CPU that other work may share
}
MIN_PROCESS_S = 20.0  # a row is not started with less of the budget left


# --------------------------------------------------------------------------------------------- preflight


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """Those of `names` that this Python cannot import (found without importing them)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def preflight(args: argparse.Namespace) -> str | None:
    """Why the check cannot start here (one line), or None."""
    missing = missing_modules(
        (*RUN_MODULES, *DEEPSPEED_MODULES, *(SHARD_MODULES if args.pretrain_data is None else ()))
    )
    if missing:
        return (
            f"gpu_check: this Python lacks {', '.join(missing)} (DeepSpeed needs {', '.join(DEEPSPEED_MODULES[1:])}; "
            f"albert-pretrain {', '.join(RUN_MODULES[1:])}; making shards {', '.join(SHARD_MODULES)}): carry their "
            "wheels (bench/gpu_wheels.sh)"
        )
    import torch

    if args.device == "cpu" and not args.smoke:
        return "gpu_check: --device cpu is the smoke mode only: add --smoke (the CPU is not what this check measures)"
    if args.device != "cpu" and not torch.cuda.is_available():
        cuda = (
            f"torch {torch.__version__} built for CUDA {torch.version.cuda}"
            if torch.version.cuda
            else "a CPU-only torch"
        )
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        return (
            f"gpu_check: no CUDA device visible ({cuda}, CUDA_VISIBLE_DEVICES={visible}); nothing measured "
            "(--device cpu --smoke runs the CPU smoke mode)"
        )
    return None


def fused_lamb_build_problem(timeout_s: float) -> str | None:
    """None when DeepSpeed's FusedLamb builds and loads here, else why not. Built (JIT) in a child process of its own
    session under a timeout (a stale build lock hangs silently); the build is cached for the runs."""
    code = (
        "from deepspeed.ops.op_builder import FusedLambBuilder as B; b = B(); "
        "assert b.is_compatible(verbose=False), 'not compatible with this machine'; b.load(verbose=False)"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"its build took over {timeout_s:.0f} s (a stale lock under ~/.cache/torch_extensions/*/fused_lamb hangs it)"
    if proc.returncode != 0:
        log.warning("FusedLamb build/load failed; the end of its output:\n%s", (output or "")[-3000:])
        tail = [line for line in (output or "").splitlines() if line.strip()][-1:] or ["no output"]
        return f"its build failed ({tail[0][:200]})"
    return None


# --------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    key: str
    stage: int
    precision: str  # bf16 | fp16 | fp32
    attention: str = "auto"
    compile: str = "off"
    fused_lamb: bool = True  # allowed (albert-pretrain picks it at ZeRO-0 on CUDA)
    parity: bool = False  # losses at every step, compared with parity-eager

    @property
    def needs_fused_lamb(self) -> bool:
        return self.fused_lamb and self.stage == 0


def make_row(key: str) -> Row:
    if key == "parity-eager":
        return Row(key, 0, "fp32", attention="math", fused_lamb=False, parity=True)
    if key in ("parity-fused", "parity-compiled"):
        return Row(key, 0, "fp32", attention="sdpa", compile="on" if key.endswith("compiled") else "off", parity=True)
    stage, precision, *rest = key.split("-")
    return Row(key, int(stage[1]), precision, compile="on" if rest else "off")


def parse_rows(text: str) -> list[str]:
    keys = list(ALL_ROWS) if text.strip() == "all" else [k.strip() for k in text.split(",") if k.strip()]
    wrong = [k for k in keys if k not in ALL_ROWS]
    if wrong or not keys or len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(f"{text!r}: name each row once, from {', '.join(ALL_ROWS)} (or all)")
    return keys


def derive_ds_config(row: Row, micro: int, accum: int, ranks: int, steps: int, warmup: int) -> dict[str, Any]:
    """The shipped GPU config of the row's stage and precision (ZeRO-0: the ZeRO-1 one; fp32: the bf16 one) with the
    row's batch, a short warmup and the run's length."""
    precision = "bf16" if row.precision == "fp32" else row.precision
    ds = json.loads((DS_CONFIGS / f"gpu-zero{max(row.stage, 1)}-{precision}-lamb-4096.json").read_text())
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": row.stage}
    if row.stage == 0:
        ds["zero_optimization"] = {"stage": 0}
        ds.pop("data_types", None)  # DeepSpeed refuses fp32 gradient accumulation of bf16 weights without ZeRO
    if row.precision == "fp32":
        ds.pop("bf16", None)
        ds.pop("data_types", None)
    ds.pop("gradient_accumulation_steps", None)
    ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"] = micro, micro * accum * ranks
    sched = ds.get("scheduler", {}).get("params")
    if sched is not None:
        sched["warmup_num_steps"], sched["total_num_steps"] = warmup, steps
    return ds


def pretrain_args(row: Row, folder: Path, shards: Path, args: argparse.Namespace, cuda: bool) -> list[str]:
    steps = args.pretrain_parity_steps if row.parity else args.pretrain_steps
    cmd = ["--deepspeed_config", str(folder / "ds_config.json"), "--model-config", str(folder.parent / "model.json")]
    cmd += ["--data", str(shards), "--output", str(folder / "run"), "--max-steps", str(steps), "--resume", "never"]
    cmd += ["--log-interval", str(1 if row.parity else args.pretrain_log_interval), "--save-interval", str(steps)]
    cmd += ["--eval-interval", "0", "--attention", row.attention, "--compile", row.compile]
    if not row.fused_lamb:
        cmd.append("--no-fused-lamb")
    if row.precision == "fp32":
        cmd.append("--no-tf32")  # fp32 means fp32 in the parity rows
    if row.precision == "fp16" and not cuda:
        cmd.append("--allow-fp16-on-cpu")
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    return cmd


def child_env(cuda: bool) -> dict[str, str]:
    """A launch of its own: no launcher variables of ours (RANK, SLURM_*, ...) leak into the run."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_LAUNCHER")
    prefixes = ("SLURM_", "OMPI_", "PMIX_", "PMI_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(prefixes)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if not cuda:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


# --------------------------------------------------------------------------------------------- what a run wrote


class RunUnreadable(Exception):
    """A run's metrics.jsonl or run-info.json is missing or not what albert-pretrain writes."""


@dataclass
class RunRead:
    """A finished run as it recorded itself: its training lines of metrics.jsonl and its run-info.json."""

    records: list[dict[str, Any]]
    info: dict[str, Any]

    @classmethod
    def of(cls, output: Path) -> RunRead:
        try:
            lines = (output / "metrics.jsonl").read_text().splitlines()
            records = [r for r in map(json.loads, filter(str.strip, lines)) if r.get("split", "train") == "train"]
            info = json.loads((output / "run-info.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunUnreadable(f"{output}: {type(e).__name__}: {e}") from None
        if not records:
            raise RunUnreadable(f"{output / 'metrics.jsonl'}: no training line")
        return cls(records, info)

    @property
    def clean(self) -> list[dict[str, Any]]:
        """The logging intervals after the first (which holds start-up, the first steps and compiling)."""
        return self.records[1:] or self.records

    def mean(self, key: str) -> float | None:
        values = [r[key] for r in self.clean if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    def per_step_ms(self, key: str, interval: int) -> float | None:
        value = self.mean(key)
        return None if value is None else 1000 * value / interval

    def losses(self) -> dict[int, float | None]:
        return {r["step"]: r["loss"] for r in self.records}

    def finite(self) -> bool:
        return all(r["loss"] is not None and math.isfinite(r["loss"]) for r in self.records)


@dataclass
class Result:
    row: Row
    run: RunRead | None = None
    seconds: float = 0.0
    failure: str | None = None
    skip: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return f"SKIP: {self.skip}" if self.skip else f"FAIL: {self.failure}" if self.failure else "PASS"


def run_row(row: Row, work: Path, shards: Path, args: argparse.Namespace, cuda: bool, timeout_s: float) -> Result:
    from pipeline.distributed import torchrun_pretrain

    folder = work / row.key
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    steps = args.pretrain_parity_steps if row.parity else args.pretrain_steps
    ds = derive_ds_config(row, args.pretrain_micro, args.pretrain_accum, args.ranks, steps, args.pretrain_warmup)
    (folder / "ds_config.json").write_text(json.dumps(ds, indent=1))
    argv = pretrain_args(row, folder, shards, args, cuda)
    cmd = torchrun_pretrain(args.ranks, argv) if args.ranks > 1 else [sys.executable, "-m", "pipeline.pretrain", *argv]
    logfile = folder / "pretrain.log"
    log.info("%s: albert-pretrain (log %s)", row.key, logfile)
    began = time.monotonic()
    with open(logfile, "w") as out:
        # in our process group: gpu_check.sh's timeout signals the run too (which then saves and stops)
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(cuda), stdout=out, stderr=subprocess.STDOUT)
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # SIGTERM first: albert-pretrain stops cleanly (a kill mid JIT build
            proc.terminate()  # of a DeepSpeed op leaves its lock file, on which every later build waits)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = None
    result = Result(row, seconds=time.monotonic() - began)
    if code != 0:
        lines = [line for line in logfile.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if " ERROR " in line or "Error" in line] or lines or ["no output"]
        why = f"timed out after {timeout_s:.0f} s" if code is None else f"exit {code}"
        result.failure = f"{why}: {errors[-1][:240]} (log {logfile})"
        return result
    try:
        result.run = RunRead.of(folder / "run")
    except RunUnreadable as e:
        result.failure = str(e)
        return result
    judge(result, cuda)
    return result


def judge(result: Result, cuda: bool) -> None:
    """A finished run's own failures: a loss that is not finite, or no FusedLamb where it was due."""
    assert result.run is not None
    if not result.run.finite():
        result.failure = "a logged loss is not finite"
    kind = result.run.info["optimizer"]["kind"]
    if cuda and result.row.needs_fused_lamb and kind != "FusedLamb":
        result.failure = f"the run chose {kind}, not FusedLamb ({result.run.info['optimizer']['description']})"


def compare_parity(eager: Result, other: Result, tol: float) -> None:
    """`other` fails when its loss at some step differs from eager's by more than `tol` (relative)."""
    if eager.run is None or other.run is None or other.failure:
        return
    base, losses = eager.run.losses(), other.run.losses()
    steps = sorted(set(base) & set(losses))
    diffs = [abs(losses[s] - base[s]) / max(abs(base[s]), 1e-12) for s in steps if None not in (base[s], losses[s])]
    if not diffs:
        other.failure = "no step to compare with parity-eager"
        return
    worst = max(diffs)
    other.notes.append(f"loss vs eager: step 1 {diffs[0]:.1e}, max {worst:.1e} over {len(diffs)} steps (tol {tol:g})")
    if worst > tol:
        other.failure = f"loss differs from parity-eager by {worst:.2e} (relative) > --parity-tol {tol:g}"


def compile_counters(result: Result) -> str | None:
    """torch._dynamo's counters as the run recorded them in run-info.json (pipeline.fused.compile_counters)."""
    if result.run is None or result.row.compile != "on":
        return None
    counters = result.run.info.get("compile", {}).get("counters")
    if counters is None:
        return "counters: not in run-info.json (this albert-pretrain does not record them)"
    reasons = counters.get("graph_break_reasons") or {}
    numbers = ", ".join(f"{k} {v}" for k, v in sorted(counters.items()) if not isinstance(v, dict))
    return f"counters: {numbers}" + "".join(f"; graph break x{n}: {why[:160]}" for why, n in reasons.items())


# --------------------------------------------------------------------------------------------- report


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def row_cells(r: Result, interval: int) -> list[str]:
    head = [r.row.key]
    if r.run is None:
        return head + [""] * 12 + [r.status]
    run, info = r.run, r.run.info
    last = run.records[-1]
    device_peak = last.get("peak_device_memory_bytes")
    memory = device_peak if device_peak is not None else last.get("peak_rss_bytes")
    scale = f"{last['loss_scale']:g} / {last['skipped_steps']}" if info["layout"]["precision"] == "fp16" else ""
    syncs = run.mean("host_syncs_per_step")
    kernels = f" ({info['attention']['sdpa_kernels']})" if info["attention"].get("sdpa_kernels") else ""
    return head + [
        f"{info['optimizer']['kind']} ({info['optimizer']['deepspeed_wrapper']})",
        f"{info['attention']['implementation']}{kernels}; compile {'on' if info['compile']['enabled'] else 'off'}",
        fmt(run.mean("samples_per_sec"), ",.1f"),
        fmt(run.mean("tflops_per_sec"), ".3g"),
        fmt(run.mean("mfu"), ".1%"),
        fmt(run.per_step_ms("forward_backward_sec", interval), ".1f"),
        fmt(run.per_step_ms("optimizer_sec", interval), ".1f"),
        fmt(run.per_step_ms("data_wait_sec", interval), ".1f"),
        fmt(syncs, ".1f") if syncs is not None else "not recorded",
        fmt(memory / 2**20 if memory is not None else None, ",.0f"),
        f"{run.records[0]['loss']:.4f} -> {last['loss']:.4f}" if run.finite() else "not finite",
        scale,
        r.status,
    ]


HEADERS = [
    "row",
    "optimizer (DeepSpeed wrapper)",
    "attention; compile",
    "samples/s",
    "TFLOP/s per rank",
    "MFU",
    "fwd+bwd ms/step",
    "optimizer ms/step",
    "data wait ms/step",
    "host syncs/step",
    "peak memory (MiB)",
    "loss first -> last",
    "loss scale / skipped (fp16)",
    "result",
]


def zero_default(results: dict[str, Result]) -> str:
    """Which of ZeRO-1 and ZeRO-2 the shipped bf16 default should be, by ZEROS_RULE."""
    z1, z2 = results.get("z1-bf16"), results.get("z2-bf16")
    rates = [r.run.mean("samples_per_sec") if r and r.run and not r.failure else None for r in (z1, z2)]
    if rates[0] is None or rates[1] is None:
        return "- ZeRO-1 vs ZeRO-2 (bf16): not decided: needs both rows z1-bf16 and z2-bf16 to pass"
    stage = 1 if rates[0] > 1.05 * rates[1] else 2
    return (
        f"- ZeRO-1 vs ZeRO-2 (bf16): {rates[0]:,.1f} vs {rates[1]:,.1f} samples/s ({rates[0] / rates[1]:.3f}x); "
        f"rule: {ZEROS_RULE}. The shipped default (slurm/pretrain.sbatch, docs) should be "
        f"ds_configs/gpu-zero{stage}-bf16-lamb-4096.json"
    )


def environment_lines(results: list[Result], args: argparse.Namespace, fused_reason: str | None) -> list[str]:
    """The device, peak and versions, as the first run that finished recorded them."""
    info = next((r.run.info for r in results if r.run is not None), None)
    lines = [f"- budget {args.budget:.0f} s; {args.ranks} rank(s) per run; model {args.pretrain_config}"]
    if info is not None:
        device, peak, versions = info["device"], info["peak"], info["versions"]
        lines.append(f"- device: {device['name']} ({device['type']}); versions: " + ", ".join(
            f"{k} {v}" for k, v in versions.items()))  # fmt: skip
        lines.append(
            f"- MFU against {peak['tflops_per_rank']:.4g} TFLOP/s per rank ({peak['matmul']}: {peak['source']})"
        )
    lines.append(f"- DeepSpeed FusedLamb: {'builds and loads' if fused_reason is None else fused_reason}")
    return lines


# --------------------------------------------------------------------------------------------- main


def make_shards(folder: Path, vocab_size: int, timeout_s: float) -> Path:
    """albert-data corpus / vocab / shard on the Wikipedia excerpt (the project's own tools, as a user runs them)."""
    from data_prep.sample_corpora import wikipedia_excerpt

    folder.mkdir(parents=True, exist_ok=True)
    corpus, vocab, shards = folder / "corpus", folder / "vocab" / "spiece", folder / "shards"
    steps = [
        ["corpus", "--input", str(wikipedia_excerpt()), "--output", str(corpus), "--num-files", "4"],
        ["vocab", "--input", str(corpus), "--output-prefix", str(vocab), "--vocab-size", str(vocab_size)],
        [
            "shard",
            "--input",
            str(corpus),
            "--spm-model",
            f"{vocab}.model",
            "--output",
            str(shards),
            "--no-progress",
            "--dupe-factor",
            "1",
            "--num-shards",
            "2",
        ],
    ]
    deadline = time.monotonic() + timeout_s
    with open(folder / "prep.log", "w") as out:
        for step in steps:
            cmd = [sys.executable, "-m", "data_prep", *step]
            subprocess.run(cmd, cwd=REPO, env=child_env(False), stdout=out, stderr=subprocess.STDOUT, check=True,
                           timeout=max(deadline - time.monotonic(), 1.0))  # fmt: skip
    return shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="cpu: with --smoke only")
    p.add_argument("--smoke", action="store_true", help="CPU smoke mode: albert-tiny, few steps, the smoke rows")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    p.add_argument("--ranks", type=int, default=1, help="ranks per run (torchrun when above 1)")
    p.add_argument("--pretrain-rows", type=parse_rows, default=None, help=f"rows, or all: {', '.join(ALL_ROWS)}")
    p.add_argument("--pretrain-config", default=DEFAULTS["pretrain_config"], help="shipped model config")
    p.add_argument("--pretrain-steps", type=int, default=DEFAULTS["pretrain_steps"], help="steps of an engine row")
    p.add_argument("--pretrain-log-interval", type=int, default=DEFAULTS["pretrain_log_interval"])
    p.add_argument("--pretrain-parity-steps", type=int, default=DEFAULTS["pretrain_parity_steps"])
    p.add_argument("--pretrain-micro", type=int, default=DEFAULTS["pretrain_micro"], help="micro-batch per rank")
    p.add_argument("--pretrain-accum", type=int, default=DEFAULTS["pretrain_accum"], help="accumulation steps")
    p.add_argument("--pretrain-warmup", type=int, default=DEFAULTS["pretrain_warmup"], help="schedule warmup steps")
    p.add_argument("--pretrain-vocab", type=int, default=DEFAULTS["pretrain_vocab"], help="vocabulary made here")
    p.add_argument("--pretrain-data", type=Path, default=None, help="shards to use instead of making them")
    p.add_argument("--pretrain-work", type=Path, default=None, help="keep runs and logs here (default: temporary)")
    p.add_argument("--pretrain-timeout", type=float, default=DEFAULTS["pretrain_timeout"], help="seconds per run")
    p.add_argument("--parity-tol", type=float, default=1e-3, help="largest relative loss difference from eager")
    p.add_argument("--peak-tflops", type=float, default=None, help="passed to albert-pretrain (its MFU's peak)")
    p.add_argument("--fused-lamb-build-timeout", type=float, default=240.0, help="seconds for building FusedLamb")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:  # the smoke values replace the defaults, not what was given
        defaults = p.parse_args([])
        for key, value in SMOKE.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    if min(args.ranks, args.pretrain_micro, args.pretrain_accum, args.pretrain_log_interval) < 1:
        p.error("--ranks, --pretrain-micro, --pretrain-accum, --pretrain-log-interval: at least 1")
    if not 0 <= args.pretrain_warmup < min(args.pretrain_steps, args.pretrain_parity_steps):
        p.error("--pretrain-warmup: at least 0 and below --pretrain-steps and --pretrain-parity-steps")
    if args.pretrain_steps < 2 * args.pretrain_log_interval:
        p.error("--pretrain-steps: at least two logging intervals (the first holds start-up)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    why = preflight(args)
    if why:
        print(why, file=sys.stderr)
        return 2
    import torch

    cuda = args.device != "cpu" and torch.cuda.is_available()
    keys = args.pretrain_rows or list(ALL_ROWS if cuda else SMOKE_ROWS)
    rows = [make_row(k) for k in keys]
    fused_reason = fused_lamb_build_problem(min(args.fused_lamb_build_timeout, args.budget / 2)) if cuda else "no CUDA"
    work_ctx = tempfile.TemporaryDirectory(prefix="gpu-check-") if args.pretrain_work is None else None
    work = Path(work_ctx.name) if work_ctx else args.pretrain_work
    try:
        return check(args, rows, work, cuda, fused_reason)
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()


def check(args: argparse.Namespace, rows: list[Row], work: Path, cuda: bool, fused_reason: str | None) -> int:
    from pipeline.model import AlbertConfig

    def left() -> float:
        return args.budget - (time.monotonic() - STARTED)

    work.mkdir(parents=True, exist_ok=True)
    shards = args.pretrain_data or make_shards(work / "data", args.pretrain_vocab, left())
    attrs = json.loads((shards / "manifest.json").read_text())["attributes"]
    cfg = AlbertConfig.from_name_or_path(args.pretrain_config)
    cfg.vocab_size = int(attrs["vocab_size"])  # the shards' vocabulary
    cfg.to_json(work / "model.json")
    results: dict[str, Result] = {}
    for row in rows:
        if cuda and row.needs_fused_lamb and fused_reason is not None:
            results[row.key] = Result(row, skip=f"needs DeepSpeed's FusedLamb: {fused_reason}")
        elif left() < MIN_PROCESS_S:
            results[row.key] = Result(row, skip=f"budget ({max(left(), 0):.0f} s left of {args.budget:.0f} s)")
        else:
            results[row.key] = run_row(row, work, shards, args, cuda, min(args.pretrain_timeout, left()))
        log.info("%s: %s", row.key, results[row.key].status)
    eager = results.get("parity-eager")
    for r in results.values():
        if r.row.parity and r.row.key != "parity-eager" and eager is not None:
            compare_parity(eager, r, args.parity_tol)
    print(f"## GPU check: {'CPU smoke run' if args.smoke else 'albert-pretrain on DeepSpeed'}\n")
    print("\n".join(environment_lines(list(results.values()), args, fused_reason)) + "\n")
    print(
        f"Each row is one `albert-pretrain` run on {shards} ({attrs['max_seq_length']} tokens, micro-batch "
        f"{args.pretrain_micro} x {args.pretrain_accum} accumulation x {args.ranks} rank(s)); the numbers are the "
        f"run's own metrics.jsonl (means over the logging intervals after the first, every "
        f"{args.pretrain_log_interval} steps) and run-info.json. Parity rows: ZeRO-0 fp32, TF32 off, "
        f"{args.pretrain_parity_steps} steps.\n"
    )
    print(markdown_table(HEADERS, [row_cells(r, args.pretrain_log_interval) for r in results.values()]))
    notes = [f"- {r.row.key}: {'; '.join(r.notes)}" for r in results.values() if r.notes]
    notes += [f"- {r.row.key}: {c}" for r in results.values() if (c := compile_counters(r))]
    print("\n" + "\n".join([*notes, zero_default(results)]))
    failed = [r.row.key for r in results.values() if r.failure]
    spent = args.budget - left()
    print(f"\n{'every row passed' if not failed else 'FAILED: ' + ', '.join(failed)} ({spent:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
