"""Section 5 of bench/gpu_check.py: the real `albert-pretrain` command, end to end, per ZeRO stage and precision.

For each row (ZeRO stage x precision; on CUDA ZeRO-1, -2, -3 in bf16 and fp16 and ZeRO-0 with DeepSpeed's
FusedLamb in bf16; ZeRO-0 in fp16 is refused by albert-pretrain's own checks), on one device, world size 1:

1. shards first, with the project's own tools: `albert-data corpus`, `vocab`, `shard`, `verify` on the Wikipedia
   excerpt (data_prep.sample_corpora), in the background while sections 1-4 run (or --pretrain-data);
2. a DeepSpeed config derived from the shipped ds_configs/gpu-zero{1,2,3}-{bf16,fp16}-lamb-4096.json (ZeRO-0:
   the ZeRO-1 config at stage 0): train_batch_size = micro-batch x accumulation for one rank, warmup shortened,
   total_num_steps = the run's steps; the model config is the shipped one with the shards' vocabulary size;
3. the straight run: `albert-pretrain` under bench/pretrain_instrument.py (host syncs per optimizer step, step times,
   peak memory, every step's loss), saving at an intermediate step (--save-interval) and logging only at the
   final step, `--compile off`;
4. `albert-export` of its final checkpoint, then `transformers.AlbertForPreTraining.from_pretrained` of the export
   (no missing or unexpected weights, finite logits on shard examples), in the background;
5. after all straight runs (they are timed, so nothing else shares the device then), the resumed runs, several at
   a time: a second process from the intermediate checkpoint to the same final step; its per-step losses must
   equal the straight run's bit for bit. Both processes switch torch's deterministic algorithms on from the
   save step (pretrain_instrument --deterministic-from): without them, kernels that sum with atomics (attention
   backward, scatter-add) give the two processes different roundings after the first resumed step.

A row fails (non-zero exit, the row named) when a process fails or times out, the run did not choose the expected
optimizer (FusedLamb at ZeRO-0 on CUDA), a clean optimizer step has more than one host sync (CUDA only), the
resumed losses differ, or the export does not load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_check_common import Budget, Peaks, Report, SectionSkipped
from harness import markdown_table

from pipeline.flops import step_flops
from pipeline.lamb_deepspeed import OptimizerKind

REPO = Path(__file__).resolve().parents[1]
INSTRUMENT = Path(__file__).resolve().parent / "pretrain_instrument.py"
DS_CONFIGS = REPO / "ds_configs"
log = logging.getLogger("gpu_check.pretrain")

ALL_ROWS = ("z0-bf16", "z1-bf16", "z1-fp16", "z2-bf16", "z2-fp16", "z3-bf16", "z3-fp16")
SMOKE_ROWS = ("z0-bf16", "z3-fp16")
PRECISIONS = ("bf16", "fp16", "fp32")
# Host syncs our code may make in one optimizer step outside logging, saving and evaluation: the loop's flag read.
# DeepSpeed's own (its ZeRO optimizers' overflow and gradient-norm checks, the ZeRO-2 epilogue with overlap_comm,
# fp16's loss scaler) are counted and listed, not judged: they are DeepSpeed's, per stage and config.
MAX_SYNCS = 1


HEADERS = [
    "ZeRO stage",
    "precision",
    "optimizer",
    "samples/s",
    "MFU (nominal peak)",
    "host syncs / step",
    "peak GPU memory (MiB)",
    "resume exact",
    "export loads",
    "result",
]
CPU_HEADERS = [h if h != "peak GPU memory (MiB)" else "peak RSS (MiB)" for h in HEADERS]

# Settings on CUDA (the defaults) and in the CPU smoke run (gpu_check.py --smoke), per argument.
DEFAULTS: dict[str, Any] = {
    "pretrain_config": "albert-base",
    "pretrain_steps": 30,
    "pretrain_save_step": 20,
    "pretrain_micro": 64,
    "pretrain_accum": 2,
    "pretrain_warmup": 10,
    "pretrain_vocab": 8000,
    "pretrain_dupe": 2,
    "pretrain_parallel": 4,
    "pretrain_timeout": 240.0,
}
SMOKE: dict[str, Any] = {
    "pretrain_config": "albert-tiny",
    "pretrain_steps": 8,
    "pretrain_save_step": 5,
    "pretrain_micro": 4,
    "pretrain_accum": 2,
    "pretrain_warmup": 2,
    "pretrain_vocab": 4000,
    "pretrain_dupe": 1,
    "pretrain_parallel": 2,
    "pretrain_timeout": 180.0,
}
# Rough seconds, for the time budget: one straight run (process start, DeepSpeed set-up, the steps, two saves), one
# wave of resumed runs (several processes at a time).
ESTIMATES = {"cuda": {"straight": 25.0, "resume_wave": 25.0}, "cpu": {"straight": 20.0, "resume_wave": 25.0}}


# --------------------------------------------------------------------------------------------- rows and configs


@dataclass(frozen=True)
class PretrainRow:
    stage: int
    precision: str
    expect_optimizer: OptimizerKind  # what albert-pretrain must choose (its Run.optimizer, recorded by the instrument)

    @property
    def key(self) -> str:
        return f"z{self.stage}-{self.precision}"

    @property
    def name(self) -> str:
        return f"ZeRO-{self.stage} {self.precision}"

    def shipped_config(self) -> Path:
        """The shipped GPU config this row's config is derived from (ZeRO-0: the ZeRO-1 one; fp32: the bf16 one)."""
        precision = "bf16" if self.precision == "fp32" else self.precision
        return DS_CONFIGS / f"gpu-zero{max(self.stage, 1)}-{precision}-lamb-4096.json"


def parse_rows(text: str) -> list[str]:
    """ "z1-bf16,z3-fp16" -> the keys, checked; "all" -> every CUDA row."""
    if text.strip() == "all":
        return list(ALL_ROWS)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    for key in keys:
        stage, _, precision = key.partition("-")
        if not (len(stage) == 2 and stage[0] == "z" and stage[1] in "0123" and precision in PRECISIONS):
            raise argparse.ArgumentTypeError(
                f"{key!r}: expected z<stage>-<precision> such as z2-bf16 (stages 0-3; {', '.join(PRECISIONS)})"
            )
        if key == "z0-fp16":
            raise argparse.ArgumentTypeError(
                "z0-fp16: albert-pretrain refuses fp16 at ZeRO-0 (DeepSpeed 0.19 never scales the "
                "loss there); the ZeRO-0 row is bf16 or fp32"
            )
    if len(set(keys)) != len(keys) or not keys:
        raise argparse.ArgumentTypeError(f"{text!r}: name each row once")
    return keys


def plan_rows(keys: list[str], device_type: str) -> list[PretrainRow]:
    """The rows to run, in order. FusedLamb is what albert-pretrain picks at ZeRO-0 on CUDA (the shipped configs have no
    bias correction; pipeline's fused_lamb_unavailable); everywhere else it runs our LAMB."""
    rows = []
    for key in keys:
        stage, precision = int(key[1]), key.split("-", 1)[1]
        expect = OptimizerKind.FUSED_LAMB if device_type == "cuda" and stage == 0 else OptimizerKind.OUR_LAMB
        rows.append(PretrainRow(stage, precision, expect))
    return rows


def derive_ds_config(row: PretrainRow, micro: int, accum: int, steps: int, warmup: int) -> dict[str, Any]:
    """The shipped config with one rank's batch (micro x accumulation), a short warmup and the run's length."""
    ds = json.loads(row.shipped_config().read_text())
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": row.stage}
    if row.stage == 0:
        ds["zero_optimization"] = {"stage": 0}
        # DeepSpeed refuses fp32 gradient accumulation for bf16 weights without ZeRO ("unsupported mix of
        # model_dtype=torch.bfloat16 and grad_accum_dtype=torch.float32"): the ZeRO-0 row accumulates in bf16.
        ds.pop("data_types", None)
    if row.precision == "fp32":
        ds.pop("bf16", None)
        ds.pop("data_types", None)
    ds.pop("gradient_accumulation_steps", None)
    ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"] = micro, micro * accum
    sched = ds.get("scheduler", {}).get("params")
    if sched is not None:
        sched["warmup_num_steps"], sched["total_num_steps"] = warmup, steps
    return ds


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    config: str
    steps: int
    save_step: int
    micro: int
    accum: int
    warmup: int
    vocab: int
    dupe: int
    parallel: int
    timeout_s: float
    deterministic: bool
    attention: str
    data: Path | None
    work: Path | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            args.pretrain_config,
            args.pretrain_steps,
            args.pretrain_save_step,
            args.pretrain_micro,
            args.pretrain_accum,
            args.pretrain_warmup,
            args.pretrain_vocab,
            args.pretrain_dupe,
            args.pretrain_parallel,
            args.pretrain_timeout,
            args.pretrain_deterministic == "on",
            args.attention,
            args.pretrain_data,
            args.pretrain_work,
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pretrain-rows",
        type=parse_rows,
        default=None,
        help=f"section 5: rows z<stage>-<precision>, or all (default on CUDA: {','.join(ALL_ROWS)}; CPU: {','.join(SMOKE_ROWS)})",
    )
    p.add_argument(
        "--pretrain-config",
        default=DEFAULTS["pretrain_config"],
        help="section 5: shipped model config (its vocabulary becomes the shards')",
    )
    p.add_argument(
        "--pretrain-steps", type=int, default=DEFAULTS["pretrain_steps"], help="section 5: optimizer steps per run"
    )
    p.add_argument(
        "--pretrain-save-step",
        type=int,
        default=DEFAULTS["pretrain_save_step"],
        help="section 5: the checkpoint the second process resumes from",
    )
    p.add_argument("--pretrain-micro", type=int, default=DEFAULTS["pretrain_micro"], help="section 5: micro-batch")
    p.add_argument(
        "--pretrain-accum", type=int, default=DEFAULTS["pretrain_accum"], help="section 5: gradient accumulation steps"
    )
    p.add_argument(
        "--pretrain-warmup",
        type=int,
        default=DEFAULTS["pretrain_warmup"],
        help="section 5: the schedule's warmup steps",
    )
    p.add_argument(
        "--pretrain-vocab",
        type=int,
        default=DEFAULTS["pretrain_vocab"],
        help="section 5: vocabulary trained on the excerpt",
    )
    p.add_argument(
        "--pretrain-dupe",
        type=int,
        default=DEFAULTS["pretrain_dupe"],
        help="section 5: albert-data shard --dupe-factor",
    )
    p.add_argument(
        "--pretrain-data",
        type=Path,
        default=None,
        help="section 5: shards to use (albert-data shard output) instead of making them",
    )
    p.add_argument(
        "--pretrain-work",
        type=Path,
        default=None,
        help="section 5: keep runs, logs and instrument JSON here (default: a temporary folder)",
    )
    p.add_argument(
        "--pretrain-parallel", type=int, default=DEFAULTS["pretrain_parallel"], help="section 5: resumed runs at a time"
    )
    p.add_argument(
        "--pretrain-timeout",
        type=float,
        default=DEFAULTS["pretrain_timeout"],
        help="section 5: seconds per albert-pretrain process",
    )
    p.add_argument(
        "--pretrain-deterministic",
        choices=["on", "off"],
        default="on",
        help="section 5: deterministic kernels from the save step on in both processes (off: compare as they run)",
    )


def check_arguments(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    if not 4 <= args.pretrain_save_step < args.pretrain_steps:
        error(
            "--pretrain-save-step: at least 4 (steps 3 .. save step - 1 are the clean steps timed and counted) "
            "and below --pretrain-steps"
        )
    if min(args.pretrain_micro, args.pretrain_accum, args.pretrain_parallel) < 1 or args.pretrain_warmup < 0:
        error("--pretrain-micro, --pretrain-accum, --pretrain-parallel: at least 1; --pretrain-warmup: at least 0")
    if args.pretrain_warmup >= args.pretrain_steps:
        error("--pretrain-warmup must be below --pretrain-steps")


def section_need(args: argparse.Namespace, device_type: str, rows: int | None = None) -> float:
    """Seconds section 5 needs at least (for the budget of the earlier sections)."""
    est = ESTIMATES["cuda" if device_type == "cuda" else "cpu"]
    n = rows if rows is not None else len(args.pretrain_rows or (ALL_ROWS if device_type == "cuda" else SMOKE_ROWS))
    return n * est["straight"] + math.ceil(n / max(args.pretrain_parallel, 1)) * est["resume_wave"]


# --------------------------------------------------------------------------------------------- shards


class PrepError(Exception):
    """The shards could not be made (or the given ones are not usable)."""


class ShardPrep:
    """albert-data corpus / vocab / shard / verify on the Wikipedia excerpt, in a background thread (subprocesses)."""

    def __init__(self, folder: Path, vocab_size: int, dupe_factor: int, workers: int = 2):
        self.folder, self.vocab_size, self.dupe_factor, self.workers = folder, vocab_size, dupe_factor, workers
        self.shards: Path | None = None
        self.error: str | None = None
        self.seconds = 0.0
        self._proc: subprocess.Popen | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="shard-prep", daemon=True)

    def start(self) -> ShardPrep:
        self._thread.start()
        return self

    def _run(self) -> None:
        t = time.monotonic()
        try:
            from data_prep.sample_corpora import wikipedia_excerpt

            shutil.rmtree(self.folder, ignore_errors=True)  # albert-data refuses non-empty output folders
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                excerpt = wikipedia_excerpt()
            except Exception as e:  # noqa: BLE001 - e.g. no network and no cached copy
                raise PrepError(
                    f"the Wikipedia excerpt is not available ({type(e).__name__}: {e}); carry .cache/corpora "
                    "(made by `make demo` or the tests) or pass --pretrain-data"
                ) from None
            corpus, vocab, shards = self.folder / "corpus", self.folder / "vocab" / "spiece", self.folder / "shards"
            steps = [
                [
                    "corpus",
                    "--input",
                    str(excerpt),
                    "--output",
                    str(corpus),
                    "--num-files",
                    "4",
                    "--workers",
                    str(self.workers),
                ],
                ["vocab", "--input", str(corpus), "--output-prefix", str(vocab), "--vocab-size", str(self.vocab_size)],
                [
                    "shard",
                    "--input",
                    str(corpus),
                    "--spm-model",
                    f"{vocab}.model",
                    "--output",
                    str(shards),
                    "--dupe-factor",
                    str(self.dupe_factor),
                    "--num-shards",
                    "2",
                    "--workers",
                    str(self.workers),
                    "--no-progress",
                ],
                ["verify", "--no-progress", str(shards)],
            ]
            for step in steps:
                self._command(step)
            self.shards = shards
        except PrepError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - reported by wait()
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.seconds = time.monotonic() - t

    def _command(self, args: list[str]) -> None:
        if self._cancelled:
            raise PrepError("cancelled")
        logfile = self.folder / "prep.log"
        with open(logfile, "a") as out:
            out.write(f"$ albert-data {' '.join(args)}\n")
            out.flush()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "data_prep", *args],
                cwd=REPO,
                env=child_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            rc = self._proc.wait()
        if rc != 0:
            tail = [line for line in logfile.read_text(errors="replace").splitlines() if line.strip()][-3:]
            hint = ""
            if any("No module named" in line for line in tail):
                hint = (
                    " (a package albert-data needs is missing here: carry its wheels, e.g. blingfire and mwparserfromhell, "
                    "or make the shards elsewhere and pass --pretrain-data)"
                )
            raise PrepError(f"albert-data {args[0]} failed (exit {rc}): {' | '.join(tail)[-400:]}{hint}")

    def wait(self, timeout: float) -> Path:
        self._thread.join(max(timeout, 0.0))
        if self._thread.is_alive():
            self.cancel()
            raise PrepError(f"the shards were not ready within the time budget ({timeout:.0f} s left for them)")
        if self.error or self.shards is None:
            raise PrepError(self.error or "no shards")
        return self.shards

    def cancel(self) -> None:
        self._cancelled = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()


def shard_attributes(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PrepError(f"{folder}: no readable manifest.json ({e})") from None
    attrs = dict(manifest["attributes"])
    attrs["num_examples"] = manifest.get("num_examples")
    return attrs


# --------------------------------------------------------------------------------------------- processes


def child_env(device_type: str = "cpu") -> dict[str, str]:
    """The environment of a child process: a single plain process on its own rendezvous port (this process has its
    own process group, whose RANK / WORLD_SIZE / MASTER_PORT must not leak into a child's)."""
    from pipeline.distributed import free_port

    drop = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "ROLE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CROSS_RANK",
        "DS_LAUNCHER",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("SLURM_", "OMPI_", "PMIX_", "PMI_", "TORCHELASTIC_"))
    }
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    if device_type == "cpu":
        # one thread in every albert-pretrain process: a run and its resumed copy must sum in the same order (CPU
        # reductions split by thread count), and resumed runs share the cores; no GPU, also on a machine with one
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


@dataclass
class ProcessResult:
    returncode: int | None  # None: timed out
    seconds: float
    log: Path
    instrument: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.instrument is not None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def failure(self) -> str:
        """Why this process failed, in one line (the last error line of its log)."""
        if self.returncode is None:
            return f"timed out after {self.seconds:.0f} s (log: {self.log})"
        lines = [line.strip() for line in self.log_text().splitlines() if line.strip()]
        errors = [line for line in lines if " ERROR " in line or "Error" in line or "Exception" in line]
        tail = (errors or lines or ["no output"])[-1]
        if self.returncode == 0 and self.instrument is None:
            return f"exited 0 but wrote no instrument output ({tail[:300]})"
        if self.returncode < 0:
            return f"killed by signal {-self.returncode}: {tail[:300]}"
        return f"exited {self.returncode}: {tail[:300]}"


def run_logged(cmd: list[str], logfile: Path, env: dict[str, str], timeout_s: float) -> tuple[int | None, float]:
    """Run `cmd` with its output in `logfile`, killed after `timeout_s`: (returncode, or None on a timeout; seconds).
    The child stays in our process group, so that gpu_check.sh's timeout, which signals the group, ends it too (a
    SIGTERM makes albert-pretrain save and stop)."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    with open(logfile, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc: int | None = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    return rc, time.monotonic() - t


def pretrain_command(
    instrument_out: Path,
    ds: Path,
    model: Path,
    data: Path,
    output: Path,
    s: Settings,
    row: PretrainRow,
    cuda: bool,
    resume: Path | None = None,
) -> list[str]:
    instrument = [sys.executable, str(INSTRUMENT), "--instrument-out", str(instrument_out)]
    if s.deterministic:
        instrument += ["--deterministic-from", str(s.save_step)]
    args = [
        "--deepspeed_config",
        str(ds),
        "--model-config",
        str(model),
        "--data",
        str(data),
        "--output",
        str(output),
        "--max-steps",
        str(s.steps),
        "--log-interval",
        str(s.steps + 1),
        "--save-interval",
        str(s.save_step),
        "--eval-interval",
        "0",
        "--compile",
        "off",
        "--attention",
        s.attention,
    ]
    args += ["--resume", str(resume) if resume is not None else "never"]
    if row.precision == "fp16" and not cuda:
        args.append("--allow-fp16-on-cpu")  # albert-pretrain's switch for testing its fp16 path on a CPU
    return [*instrument, "--", *args]


def read_instrument(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------- what a row measured


@dataclass
class Check:
    ok: bool
    note: str


@dataclass
class RowResult:
    row: PretrainRow
    straight: ProcessResult | None = None
    resumed: ProcessResult | None = None
    resume: Check | None = None
    export: Check | None = None
    error: str | None = None  # the row could not run (shards, FusedLamb, an exception); a failure
    skipped: list[str] = field(default_factory=list)  # parts left out for the time budget; not failures
    flops_per_step: float = 0.0
    samples_per_step: int = 0
    nominal_peak: float | None = None

    @property
    def instrument(self) -> dict[str, Any]:
        return (self.straight.instrument or {}) if self.straight else {}

    def optimizer_seen(self) -> OptimizerKind | None:
        """The optimizer the straight run chose (albert-pretrain's Run.optimizer, from the instrument), or None."""
        kind = self.instrument.get("optimizer_kind")
        return OptimizerKind(kind) if kind else None

    def samples_per_s(self) -> float | None:
        seconds = (self.instrument.get("syncs") or {}).get("seconds_mean")
        return self.samples_per_step / seconds if seconds else None

    def mfu(self) -> float | None:
        rate = self.samples_per_s()
        if rate is None or not self.nominal_peak or not self.samples_per_step:
            return None
        return self.flops_per_step * rate / self.samples_per_step / self.nominal_peak


def sdpa_from_log(text: str) -> str | None:
    """albert-pretrain's line saying which attention kernel runs (the SDPA kernel line if the log has one)."""
    found = None
    for line in text.splitlines():
        for marker in ("SDPA kernel on", "attention: "):
            if marker in line:
                text_ = line[line.index(marker) :].strip()
                if marker == "SDPA kernel on":
                    return text_
                found = found or text_
    return found


def compare_resume(
    straight: dict[str, list[float]],
    resumed: dict[str, list[float]],
    resumed_start: int | None,
    save_step: int,
    final_step: int,
) -> Check:
    """Exact when the resumed process started at `save_step` and every step after it to `final_step` has the same
    micro-batch losses, bit for bit, as the straight run."""
    if resumed_start != save_step:
        return Check(
            False, f"the second process started at step {resumed_start}, not at the checkpoint's step {save_step}"
        )
    steps = range(save_step + 1, final_step + 1)
    missing = [s for s in steps if str(s) not in straight or str(s) not in resumed]
    if missing:
        return Check(False, f"no loss recorded for step(s) {', '.join(map(str, missing[:5]))}")
    for s in steps:
        a, b = straight[str(s)], resumed[str(s)]
        if a != b:
            rel = (
                max((abs(x - y) / max(abs(x), 1e-30) for x, y in zip(a, b)), default=float("inf"))
                if len(a) == len(b)
                else float("inf")
            )
            where = (
                "the first step after the checkpoint: the restored weights, data position or loss scale differ"
                if s == save_step + 1
                else f"step {save_step + 1} matched (weights and data restored), a later step did not: optimizer state, "
                "schedule or kernel nondeterminism"
            )
            return Check(False, f"step {s}: loss {a[-1]!r} straight vs {b[-1]!r} resumed (relative {rel:.1e}); {where}")
    n = sum(len(straight[str(s)]) for s in steps)
    return Check(True, f"steps {save_step + 1}-{final_step}: {n} micro-batch losses identical")


def row_problems(r: RowResult, count_syncs: bool) -> list[str]:
    """Why a row fails (empty: it passed, or parts of it were only skipped)."""
    if r.error:
        return [r.error]
    if r.straight is None:
        return [] if r.skipped else ["not run"]
    if not r.straight.ok:
        return [f"albert-pretrain {r.straight.failure()}"]
    problems = []
    p = r.instrument
    seen, expected = r.optimizer_seen(), r.row.expect_optimizer
    if seen is not expected or (expected is OptimizerKind.FUSED_LAMB and p.get("optimizer") != "FusedLamb"):
        problems.append(
            f"expected {expected} but the run chose {seen or 'no optimizer (none recorded)'}"
            f" (DeepSpeed wraps {p.get('optimizer')})"
        )
    losses = [x for v in p.get("losses", {}).values() for x in v]
    bad = [k for k, v in p.get("losses", {}).items() if not all(math.isfinite(x) for x in v)]
    if not losses:
        problems.append("no loss recorded")
    elif bad:
        problems.append(f"loss not finite at step(s) {', '.join(sorted(bad, key=int)[:5])}")
    if count_syncs:
        syncs = p.get("syncs") or {}
        if syncs.get("max") is None:
            problems.append("no clean optimizer step to count host syncs on (raise --pretrain-save-step)")
        elif syncs.get("ours_max", syncs["max"]) > MAX_SYNCS:
            ours = syncs.get("ours_max", syncs["max"])
            problems.append(
                f"{ours} host syncs of ours in one optimizer step (at most {MAX_SYNCS}): {sync_sources(syncs)}"
            )
    if r.resumed is not None and not r.resumed.ok:
        problems.append(f"resumed albert-pretrain {r.resumed.failure()}")
    elif r.resume is not None and not r.resume.ok:
        problems.append(f"resume not exact: {r.resume.note}")
    if r.export is not None and not r.export.ok:
        problems.append(f"export: {r.export.note}")
    return problems


def sync_sources(syncs: dict[str, Any], top: int = 6) -> str:
    items = list((syncs.get("per_step_by_source") or {}).items())[:top]
    return ", ".join(f"{v:g} x {k}" for k, v in items) or "no source recorded"


def sync_cell(syncs: dict[str, Any] | None, count_syncs: bool) -> str:
    if not count_syncs:
        return "n/a (CPU)"
    if not syncs or syncs.get("max") is None:
        return "-"
    mx, mean, ours = syncs["max"], syncs["mean"], syncs.get("ours_max", "?")
    return f"{mx} (ours {ours})" if mean == mx else f"{mx} (mean {mean:.2f}; ours {ours})"


def row_cells(r: RowResult, count_syncs: bool) -> list[str]:
    problems = row_problems(r, count_syncs)
    head = [str(r.row.stage), r.row.precision]
    if r.straight is None or not r.straight.ok:
        reason = "FAIL: " + "; ".join(problems) if problems else "; ".join(r.skipped) or "skipped"
        return head + [r.row.expect_optimizer + " (expected)", "-", "-", "-", "-", "-", "-", reason]
    rate, mfu = r.samples_per_s(), r.mfu()
    memory = r.instrument.get("peak_memory_bytes")

    def yes_no(check: Check | None, what: str) -> str:
        if check is None:
            return "skipped" if any(what in x for x in r.skipped) else "-"
        return "yes" if check.ok else "no"

    result = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    if not problems and r.skipped:
        result = "PASS (" + "; ".join(r.skipped) + ")"
    return head + [
        r.optimizer_seen() or "?",
        f"{rate:,.0f}" if rate else "-",
        f"{mfu:.1%}" if mfu is not None else ("unknown" if rate else "-"),
        sync_cell(r.instrument.get("syncs"), count_syncs),
        f"{memory / 2**20:,.0f}" if memory else "-",
        yes_no(r.resume, "resume"),
        yes_no(r.export, "export"),
        result,
    ]


def format_table(results: list[RowResult], count_syncs: bool, cuda: bool = True) -> str:
    return markdown_table(
        HEADERS if cuda else CPU_HEADERS, [row_cells(r, count_syncs) for r in results], numeric={3, 4, 6}
    )


def report_rows(results: list[RowResult], count_syncs: bool, report: Report) -> None:
    """One failure per failing row, naming it (gpu_check then exits non-zero)."""
    for r in results:
        problems = row_problems(r, count_syncs)
        if problems:
            report.fail(f"albert-pretrain {r.row.name} ({r.row.key}): " + "; ".join(problems))


# --------------------------------------------------------------------------------------------- export


def export_check(checkpoints: Path, out: Path, shards: Path, timeout: Callable[[], float]) -> Check:
    """albert-export (a plain CPU process), then transformers' AlbertForPreTraining.from_pretrained of its output."""
    timeout_s = timeout()  # the time left when it starts
    if timeout_s < MIN_PROCESS_S:
        return Check(False, f"not run: the time budget ran out ({timeout_s:.0f} s left)")
    env = child_env("cpu")
    env.pop("DS_ACCELERATOR", None)  # albert-export picks the CPU itself
    env["CUDA_VISIBLE_DEVICES"] = ""  # and must need no GPU
    cmd = [
        sys.executable,
        "-m",
        "pipeline.export",
        "--checkpoint",
        str(checkpoints),
        "--output",
        str(out),
        "--spm-model",
        str(shards / "spiece.model"),
    ]
    rc, seconds = run_logged(cmd, out.with_suffix(".log"), env, timeout_s)
    if rc != 0:
        return Check(False, "albert-export " + ProcessResult(rc, seconds, out.with_suffix(".log"), {}).failure())
    try:
        return hf_loads(out, shards)
    except Exception as e:  # noqa: BLE001 - any failure to load is the answer "no"
        log.exception("loading the export failed")
        return Check(False, f"from_pretrained failed: {type(e).__name__}: {str(e)[:300]}")


def hf_loads(folder: Path, shards: Path) -> Check:
    """The export loads in transformers without missing, unexpected or mismatched weights, and gives finite logits on
    real shard examples."""
    import h5py
    import torch
    import transformers
    from transformers import AlbertForPreTraining

    transformers.logging.disable_progress_bar()
    model, info = AlbertForPreTraining.from_pretrained(str(folder), output_loading_info=True)
    wrong = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    }
    if wrong:
        return Check(False, f"from_pretrained reported {wrong}"[:400])
    first = sorted(shards.glob("shard-*.h5"))[0]
    with h5py.File(first, "r") as f:
        batch = {k: torch.from_numpy(f[k][:2].astype("int64")) for k in ("input_ids", "input_mask", "segment_ids")}
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["input_mask"], token_type_ids=batch["segment_ids"]
        )
    if not (torch.isfinite(out.prediction_logits).all() and torch.isfinite(out.sop_logits).all()):
        return Check(False, "the loaded model gives non-finite logits")
    n = sum(p.numel() for p in model.parameters())
    return Check(True, f"AlbertForPreTraining, {n / 1e6:.1f}M parameters, finite logits on 2 shard examples")


# --------------------------------------------------------------------------------------------- the section


def pretrain_section(
    args: argparse.Namespace,
    device: Any,
    budget: Budget,
    report: Report,
    peaks: Peaks | None,
    fused_reason: str | None,
    prep: ShardPrep | None,
) -> None:
    """Section 5 (see the module docstring)."""
    import tempfile

    s = Settings.from_args(args)
    cuda = device.type == "cuda"
    keys = args.pretrain_rows or list(ALL_ROWS if cuda else SMOKE_ROWS)
    rows = plan_rows(keys, device.type)
    est = ESTIMATES["cuda" if cuda else "cpu"]
    try:
        budget.check(section_need(args, device.type, len(rows)))
    except Exception:
        if prep is not None:
            prep.cancel()
        raise
    work_ctx = tempfile.TemporaryDirectory(prefix="gpu-check-pretrain-") if s.work is None else None
    work = Path(work_ctx.name) if work_ctx else s.work
    work.mkdir(parents=True, exist_ok=True)
    results = [RowResult(r) for r in rows]
    header_facts: dict[str, Any] = {}
    try:
        try:
            if s.data is not None:
                shards = s.data
            elif prep is not None:
                shards = prep.wait(budget.left() - section_need(args, device.type, 1))  # late shards: fewer rows fit
            else:
                raise PrepError("no shards: none given (--pretrain-data) and none being made")
            attrs = shard_attributes(shards)
            cfg = model_config(s.config, attrs)
        except PrepError as e:
            for r in results:
                r.error = f"not run: no shards ({e})"
            shards, attrs, cfg = None, {}, None
        if cfg is not None:
            header_facts = run_rows(results, s, cfg, attrs, shards, work, device, budget, est, peaks, fused_reason)
    finally:
        emit_section(results, s, device, report, header_facts, prep)
        report_rows(results, cuda, report)
        if work_ctx is not None:
            work_ctx.cleanup()


def model_config(name: str, attrs: dict[str, Any]) -> Any:
    from pipeline.model import AlbertConfig

    cfg = AlbertConfig.from_name_or_path(name)
    cfg.vocab_size = int(attrs["vocab_size"])
    if attrs["max_seq_length"] > cfg.max_position_embeddings:
        raise PrepError(f"shards of {attrs['max_seq_length']} tokens exceed {name}'s max_position_embeddings")
    return cfg


def run_rows(
    results: list[RowResult],
    s: Settings,
    cfg: Any,
    attrs: dict[str, Any],
    shards: Path,
    work: Path,
    device: Any,
    budget: Budget,
    est: dict[str, float],
    peaks: Peaks | None,
    fused_reason: str | None,
) -> dict[str, Any]:
    from pipeline.checkpoint import tag_for

    cuda = device.type == "cuda"
    model_path = work / "model.json"
    cfg.to_json(model_path)
    seq, predictions = int(attrs["max_seq_length"]), int(attrs["max_predictions_per_seq"])
    flops = step_flops(cfg, s.accum * s.micro, seq, predictions).training
    pool = ThreadPoolExecutor(max_workers=s.parallel, thread_name_prefix="gpu-check-pretrain")
    exports: dict[int, Future] = {}
    waves = math.ceil(len(results) / s.parallel)

    def timeout() -> float:
        """Seconds a process may take if it starts now: --pretrain-timeout, and never past the budget."""
        return min(s.timeout_s, budget.left() - 5.0)

    try:
        # Phase 1: the straight runs, one at a time (they are timed); each row's export starts in the background.
        for i, r in enumerate(results):
            r.flops_per_step, r.samples_per_step = flops, s.micro * s.accum
            r.nominal_peak = peaks.nominal_for(r.row.precision) if peaks is not None else None
            if r.row.expect_optimizer is OptimizerKind.FUSED_LAMB and fused_reason is not None:
                r.error = f"not run: the row needs DeepSpeed's FusedLamb, which is not available here ({fused_reason})"
                continue
            try:
                budget.check(est["straight"], reserve_s=waves * est["resume_wave"])
            except SectionSkipped as e:  # the rest of the rows do not fit either
                r.skipped.append(str(e))
                continue
            folder = work / r.row.key
            ds_path = folder / "ds_config.json"
            shutil.rmtree(folder, ignore_errors=True)  # a fresh run, also in a reused --pretrain-work
            folder.mkdir(parents=True, exist_ok=True)
            ds_path.write_text(json.dumps(derive_ds_config(r.row, s.micro, s.accum, s.steps, s.warmup), indent=1))
            try:
                log.info("albert-pretrain %s: straight run", r.row.name)
                cmd = pretrain_command(
                    folder / "straight.json", ds_path, model_path, shards, folder / "straight", s, r.row, cuda
                )
                rc, seconds = run_logged(
                    cmd, folder / "straight.log", child_env(device.type), max(timeout(), MIN_PROCESS_S)
                )
                r.straight = ProcessResult(
                    rc, seconds, folder / "straight.log", read_instrument(folder / "straight.json")
                )
                log.info(
                    "albert-pretrain %s: straight run %s in %.0f s",
                    r.row.name,
                    "ok" if r.straight.ok else "FAILED",
                    seconds,
                )
                if r.straight.ok:
                    exports[i] = pool.submit(
                        export_check, folder / "straight" / "checkpoints", folder / "hf", shards, timeout
                    )
            except Exception as e:  # noqa: BLE001 - a row's own error, not the section's
                log.exception("row %s", r.row.name)
                r.error = f"{type(e).__name__}: {e}"

        # Phase 2: the resumed runs, several at a time (not timed).
        resumes: dict[int, Future] = {}
        for i, r in enumerate(results):
            if r.straight is None or not r.straight.ok:
                continue
            if budget.left() < est["resume_wave"] / 2:
                r.skipped.append("resume: skipped for the time budget")
                continue
            folder = work / r.row.key
            checkpoint = folder / "straight" / "checkpoints" / tag_for(s.save_step)
            cmd = pretrain_command(
                folder / "resumed.json",
                folder / "ds_config.json",
                model_path,
                shards,
                folder / "resumed",
                s,
                r.row,
                cuda,
                resume=checkpoint,
            )
            resumes[i] = pool.submit(_resume, cmd, folder, device.type, timeout)
        for i, future in resumes.items():
            r = results[i]
            r.resumed = future.result()
            if r.resumed is None:
                r.skipped.append("resume: skipped for the time budget")
            elif r.resumed.ok:
                r.resume = compare_resume(
                    r.instrument.get("losses", {}),
                    r.resumed.instrument.get("losses", {}),  # type: ignore[union-attr]
                    r.resumed.instrument.get("start_step"),
                    s.save_step,
                    s.steps,
                )  # type: ignore[union-attr]
        for i, future in exports.items():
            results[i].export = future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    from pipeline.model import AlbertConfig

    return {
        "cfg": cfg,
        "base_vocab": AlbertConfig.from_name_or_path(s.config).vocab_size,
        "seq": seq,
        "predictions": predictions,
        "flops": flops,
        "examples": attrs.get("num_examples"),
    }


MIN_PROCESS_S = 10.0  # a process is not started with less time than this left (it would only time out)


def _resume(cmd: list[str], folder: Path, device_type: str, timeout: Callable[[], float]) -> ProcessResult | None:
    """The resumed run, with the time left when it starts (it may have waited for a free worker); None: no time left."""
    seconds_left = timeout()
    if seconds_left < MIN_PROCESS_S:
        return None
    rc, seconds = run_logged(cmd, folder / "resumed.log", child_env(device_type), seconds_left)
    return ProcessResult(rc, seconds, folder / "resumed.log", read_instrument(folder / "resumed.json"))


def emit_section(
    results: list[RowResult], s: Settings, device: Any, report: Report, facts: dict[str, Any], prep: ShardPrep | None
) -> None:
    cuda = device.type == "cuda"
    cfg = facts.get("cfg")
    model = s.config
    if cfg is not None and cfg.vocab_size != facts["base_vocab"]:
        model = (
            f"{s.config} with the shards' vocabulary of {cfg.vocab_size:,} pieces instead of {facts['base_vocab']:,}"
            + (" (SentencePiece caps a vocabulary trained on the excerpt at about 25,500)" if s.data is None else "")
        )
    data = (
        f"{s.data}"
        if s.data is not None
        else f"made here from the Wikipedia excerpt with albert-data corpus / vocab ({s.vocab:,}) / shard (dupe factor {s.dupe}) / "
        f"verify{f', {prep.seconds:.0f} s in the background' if prep is not None and prep.seconds else ''}"
    )
    examples = f", {facts['examples']:,} examples" if facts.get("examples") else ""
    seq = f" x seq {facts['seq']}, {facts['predictions']} predictions" if facts else ""
    det = (
        f"torch.use_deterministic_algorithms(True) (and CUBLAS_WORKSPACE_CONFIG=:4096:8) from step {s.save_step} on in both "
        "processes, so that their kernels round alike"
        if s.deterministic
        else "kernels as they run (--pretrain-deterministic off)"
    )
    lines = [
        f"`albert-pretrain` itself (bench/pretrain_instrument.py runs its main() and measures from outside), one process, world size 1, "
        f"{'NCCL' if cuda else 'gloo'}; {model}; micro-batch {s.micro} x {s.accum} accumulation steps{seq}; shards: {data}{examples}. "
        f"DeepSpeed configs derived from the shipped ds_configs/gpu-zero{{1,2,3}}-{{bf16,fp16}}-lamb-4096.json: train_batch_size "
        f"{s.micro * s.accum}, warmup {s.warmup} of {s.steps} steps (ZeRO-0: the ZeRO-1 config at stage 0, without data_types: "
        "DeepSpeed refuses fp32 gradient accumulation for bf16 weights without ZeRO). `--compile off` in every process: compiling "
        "costs each process start-up time the 8-minute budget does not have, and these rows check the engine, not the kernels.",
        "",
        f"- each row: a straight run of {s.steps} steps that saves at step {s.save_step} and at the end and logs at the final step "
        f"only (--log-interval {s.steps + 1}, --eval-interval 0); `albert-export` of its final checkpoint, loaded by "
        f"transformers.AlbertForPreTraining.from_pretrained (export loads); a second process resumed from the step-{s.save_step} "
        f"checkpoint to step {s.steps}, whose per-step losses must equal the straight run's bit for bit (resume exact), with {det}.",
        f"- samples/s and MFU: the mean of the clean steps' times (steps 3 to {s.save_step - 1}: not the first two, no logging, "
        "saving or evaluation in or just before them), host clock between optimizer-step boundaries; MFU = model matmul FLOPs "
        "(pipeline/flops.py step_flops) per second against the GPU's nominal dense bf16/fp16 peak.",
        (
            "- host syncs / step: the most in one clean step (torch.cuda.set_sync_debug_mode('warn') warnings, plus calls of "
            "torch.cuda.synchronize and Event.synchronize, which that mode does not report), in all and (ours) those made "
            f"in pipeline/; a row fails when ours exceed {MAX_SYNCS}. DeepSpeed's own (overflow and gradient-norm checks, "
            "the ZeRO-2 epilogue with overlap_comm, fp16's loss scaler) are listed below the table by source line. "
            "Peak memory: torch.cuda.max_memory_allocated of the straight run."
            if cuda
            else "- host syncs: not counted on CPU. Peak memory: the straight run's peak RSS."
        ),
    ]
    report.emit("\n".join(lines) + "\n")
    report.emit(format_table(results, cuda, cuda))
    notes = []
    for r in results:
        line = (
            sdpa_from_log("\n".join(r.instrument.get("log_lines") or []) or r.straight.log_text())
            if r.straight
            else None
        )
        if line:
            notes.append(f"- {r.row.name}: {line} (albert-pretrain's log)")
    if cuda:
        for r in results:
            syncs = r.instrument.get("syncs") if r.straight else None
            if syncs and syncs.get("per_step_by_source"):
                notes.append(f"- {r.row.name}: host syncs per clean step by source: {sync_sources(syncs, top=10)}")
    for r in results:
        if r.resume is not None:
            notes.append(f"- {r.row.name}: resume: {r.resume.note}")
        if r.export is not None and not r.export.ok:
            notes.append(f"- {r.row.name}: export: {r.export.note}")
    if notes:
        report.emit("\n" + "\n".join(notes))
