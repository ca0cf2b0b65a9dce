"""What a run reports: `IntervalSums` (a logging interval's sums, made global on logging steps), `PhaseTimer` (the
seconds of each phase of the steps), `Interval` and `MfuBasis` (time, memory and FLOPs of a logging interval),
`Metrics` (metrics.jsonl, one JSON object per logged step, and the same scalars in TensorBoard; rank 0 writes),
`run_info` (run-info.json: what the run resolved to, written once at start) and `BatchRecorder` (the examples each
step saw, for checking resume and epochs)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.atomic import write_text
from common.jsonl import keep_through_step

log = logging.getLogger(__name__)


class IntervalSums:
    """Sums of a logging interval. What the model computes stays on the device (no host read per micro-batch);
    what the CPU batch already tells (prediction, example and token counts) stays on the host. One all-reduce
    of both makes them global, on logging steps only."""

    DEVICE_KEYS = ("mlm_loss", "sop_loss", "mlm_correct", "sop_correct")
    HOST_KEYS = ("mlm_count", "sop_count", "tokens")

    def __init__(self, comm):
        import torch

        self.comm = comm
        self.device_sums = torch.zeros(len(self.DEVICE_KEYS), dtype=torch.float64, device=comm.device)
        self.host_sums = [0.0] * len(self.HOST_KEYS)

    def add(self, out, batch) -> None:
        """`out`: the model's output for `batch` (the CPU batch, before it went to the device)."""
        import torch

        mlm_count = float((batch["masked_lm_positions"] > 0).sum())
        sop_count = float(batch["next_sentence_labels"].numel())
        with torch.no_grad():
            self.device_sums += torch.stack(
                [
                    out.mlm_loss.double() * mlm_count,
                    out.sop_loss.double() * sop_count,
                    out.mlm_accuracy.double() * mlm_count,
                    out.sop_accuracy.double() * sop_count,
                ]
            )
        for i, v in enumerate((mlm_count, sop_count, float(batch["input_mask"].sum()))):
            self.host_sums[i] += v

    def reduce(self) -> dict[str, float]:
        import torch

        v = self.comm.sum_(torch.cat([self.device_sums, self.comm.tensor(self.host_sums)]))
        s = dict(zip(self.DEVICE_KEYS + self.HOST_KEYS, v.tolist()))
        self.device_sums.zero_()
        self.host_sums = [0.0] * len(self.HOST_KEYS)
        mlm, sop = s["mlm_loss"] / max(s["mlm_count"], 1.0), s["sop_loss"] / max(s["sop_count"], 1.0)
        return {  # losses over all predictions and examples of the interval, as for one large batch
            "loss": mlm + sop,
            "mlm_loss": mlm,
            "sop_loss": sop,
            "mlm_accuracy": s["mlm_correct"] / max(s["mlm_count"], 1.0),
            "sop_accuracy": s["sop_correct"] / max(s["sop_count"], 1.0),
            "samples": s["sop_count"],
            "tokens": s["tokens"],
        }


class BatchRecorder:
    """Which examples each step saw (CRC32 of each example's input_ids): for checking resume and epochs."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # drop what a lost run recorded after the checkpoint we resume from
            keep_through_step(path, resume_step)
        self.file = open(path, "a")

    def rewind(self, step: int) -> None:
        """A rollback to `step`: what was recorded after it is dropped."""
        self.file.close()
        keep_through_step(self.path, step)
        self.file = open(self.path, "a")

    def write(self, step: int, micro_batches: list[dict]) -> None:
        import zlib

        ids = [zlib.crc32(row.numpy().tobytes()) for b in micro_batches for row in b["input_ids"]]
        self.file.write(json.dumps({"step": step, "examples": ids}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class PhaseTimer:
    """Seconds spent in each phase of the optimizer steps ("forward_backward", "optimizer"), summed until `read`.

    CPU: time.perf_counter around the phase (a CPU op has finished when its call returns). CUDA: two CUDA events
    recorded on the stream around the phase at every step, read only by `read`, on logging steps: recording an event
    does not wait for the device, and a logging step waits for it anyway (the metric sums are read). perf_counter
    would time only the kernel launches there, unless the device were synchronised at the end of every phase."""

    PHASES = ("forward_backward", "optimizer")

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.events: list[tuple[str, Any, Any]] = []  # CUDA: (phase, start event, end event)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            began = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - began

    def read(self) -> dict[str, float]:
        """The seconds of each phase since the last read (CUDA: waits for the last event recorded)."""
        if self.events:
            self.events[-1][2].synchronize()
            for name, start, end in self.events:
                self.seconds[name] += start.elapsed_time(end) / 1000.0  # milliseconds
            self.events.clear()
        seconds, self.seconds = self.seconds, dict.fromkeys(self.PHASES, 0.0)
        return seconds


def peak_memory(device) -> tuple[int | None, int]:
    """(the device's peak allocated bytes: torch.cuda.max_memory_allocated, None on CPU; this process's peak resident
    set size in bytes, ru_maxrss). Both since the process started; neither waits for the device."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device)), rss
    return None, rss


@dataclass(frozen=True)
class Interval:
    """A logging interval's time and memory, made global: the slowest rank's phases and the largest rank's peaks."""

    steps: int  # optimizer steps in the interval
    seconds: float  # its wall time, checkpoint saves and evaluations left out
    data_wait_sec: float  # time blocked on the loader
    forward_backward_sec: float  # forward and backward passes of all micro-batches
    optimizer_sec: float  # DeepSpeed's step at the boundary (gradient reduction under ZeRO 1-2, clipping, LAMB)
    peak_device_memory_bytes: int | None  # CUDA: torch.cuda.max_memory_allocated; None on CPU
    peak_rss_bytes: int  # the process's peak resident set size


@dataclass(frozen=True)
class MfuBasis:
    """What MFU is computed from: the model FLOPs of one optimizer step (the global batch, pipeline.flops), the
    ranks that share them and one device's peak for the run's matmuls."""

    model_flops_per_step: int
    ranks: int
    peak_tflops: float

    def tflops_per_sec(self, steps: int, seconds: float) -> float:
        """Achieved model TFLOP/s per rank (per device: the unit of the peak)."""
        return self.model_flops_per_step * steps / seconds / self.ranks / 1e12


def train_record(
    engine,
    sums: dict[str, float],
    interval: Interval,
    mfu_basis: MfuBasis,
    epoch: int,
    loss_scale: float,
) -> dict[str, Any]:
    """The metrics line of a logged training step, logged too: `sums` from IntervalSums.reduce over `interval`."""
    grad_norm = engine.get_global_grad_norm()
    seconds = interval.seconds
    tflops = mfu_basis.tflops_per_sec(interval.steps, seconds)
    record = {
        "step": engine.global_steps,
        "samples": int(engine.global_samples),
        "loss": sums["loss"],
        "mlm_loss": sums["mlm_loss"],
        "sop_loss": sums["sop_loss"],
        "mlm_accuracy": sums["mlm_accuracy"],
        "sop_accuracy": sums["sop_accuracy"],
        "lr": float(engine.get_lr()[0]),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "loss_scale": loss_scale,
        "samples_per_sec": sums["samples"] / seconds,
        "tokens_per_sec": sums["tokens"] / seconds,  # real tokens: padding is not counted
        "model_flops_per_step": mfu_basis.model_flops_per_step,
        "tflops_per_sec": tflops,
        "mfu": tflops / mfu_basis.peak_tflops,
        "data_wait_sec": interval.data_wait_sec,
        "forward_backward_sec": interval.forward_backward_sec,
        "optimizer_sec": interval.optimizer_sec,
        "peak_device_memory_bytes": interval.peak_device_memory_bytes,
        "peak_rss_bytes": interval.peak_rss_bytes,
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),  # overflow steps DeepSpeed skipped, in all
        "epoch": epoch,
    }
    log.info(
        "step %d: loss %.4f (MLM %.4f, SOP %.4f), MLM acc %.3f, SOP acc %.3f, lr %.2e, %.1f samples/s, "
        "%.3g TFLOP/s per rank, MFU %.1f%%, data wait %.2f s",
        record["step"],
        record["loss"],
        record["mlm_loss"],
        record["sop_loss"],
        record["mlm_accuracy"],
        record["sop_accuracy"],
        record["lr"],
        record["samples_per_sec"],
        record["tflops_per_sec"],
        100 * record["mfu"],
        record["data_wait_sec"],
    )
    return record


def library_versions() -> dict[str, str | None]:
    """The installed versions of the libraries a run depends on (None: not installed), read without importing them."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in ("torch", "deepspeed", "transformers", "numpy", "h5py"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_info(output: Path, info: dict[str, Any]) -> Path:
    """OUTPUT/run-info.json, atomically (rank 0, once at start; a resumed run replaces it with its own)."""
    path = output / "run-info.json"
    write_text(path, json.dumps(info, indent=2, default=_json_value) + "\n")
    return path


def _json_value(value: Any) -> Any:
    """Dataclasses as objects, paths and enums as strings."""
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


ANOMALY = "anomaly"  # the split of metrics.jsonl's records of anomalous steps (and what the run did about them)


class Metrics:
    def __init__(self, output: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.output = output
        self.path = output / "metrics.jsonl"
        self.tb: Any = None  # a SummaryWriter where enabled
        if not enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        self._open(resume_step)

    def _open(self, resume_step: int | None) -> None:
        if self.path.exists():
            # lines logged after the checkpoint we resume from belong to a run that was lost; its anomalies stay
            # (the examples they left out stay left out)
            keep_through_step(self.path, resume_step or 0, always=lambda r: r.get("split") == ANOMALY)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(
            log_dir=str(self.output / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
        )
        self.file = open(self.path, "a")

    def rewind(self, step: int) -> None:
        """A rollback to `step`: the lines and TensorBoard points after it are dropped."""
        if self.tb is not None:
            self.close()
            self._open(step)

    def log(self, record: dict[str, Any]) -> None:
        if self.tb is None:  # not enabled
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        split = record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(f"{split}/{key}", value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:  # enabled
            self.file.close()
            self.tb.close()


def lamb_stats(lamb, comm, grad_norm: float | None) -> dict[str, float]:
    """Per parameter group, from the last step of our LAMB (FusedLamb does not expose them), over all ranks; two
    all-reduces, on logging steps only:
    - "grad_norm_decay", "grad_norm_no_decay": the group's part of the gradient norm (the squares of the two add up to
      grad_norm's). LAMB applies the gradients after DeepSpeed's clipping, which scales every group alike: given the
      global norm before clipping (`grad_norm`), each group's norm is its share of it; without, as applied;
    - "trust_ratio_{min,mean,max}": LAMB's trust ratios in the first adapted group (the weights with decay), with the
      group's index appended for any further one. Under ZeRO, a parameter split across ranks counts once per rank in
      the mean."""
    import torch

    if not hasattr(lamb, "last_step"):
        return {}
    groups = lamb.param_groups  # the same on every rank
    last = [(squares.to(comm.device), ratios) for squares, ratios in lamb.last_step()]
    adapted = [i for i, group in enumerate(groups) if group.get("adapt")]
    none = torch.zeros(0, dtype=torch.float64, device=comm.device)
    ratios = [none if last[i][1] is None else last[i][1].to(comm.device, torch.float64) for i in adapted]
    # maxima: each adapted group's -min and max ratio (-inf on a rank holding none of it), each group's sum of squares
    # over whole parameters (the same on every rank); sums: each adapted group's ratio sum and count, each group's sum
    # of squares over flat partitions (disjoint)
    inf = torch.tensor([-math.inf, -math.inf], dtype=torch.float64, device=comm.device)
    maxima = torch.cat(
        [*(torch.stack([-r.min(), r.max()]) if r.numel() else inf for r in ratios), *(sq[:1] for sq, _ in last)]
    )
    sums = torch.cat(
        [*(torch.stack([r.sum(), r.new_tensor(float(r.numel()))]) for r in ratios), *(sq[1:] for sq, _ in last)]
    )
    maxima, sums = comm.max_(maxima).tolist(), comm.sum_(sums).tolist()
    stats: dict[str, float] = {}
    for n, index in enumerate(adapted):
        count = sums[2 * n + 1]
        if count:
            suffix = f"_{index}" if n else ""
            stats[f"trust_ratio_min{suffix}"] = -maxima[2 * n]
            stats[f"trust_ratio_mean{suffix}"] = sums[2 * n] / count
            stats[f"trust_ratio_max{suffix}"] = maxima[2 * n + 1]
    applied = [w + f for w, f in zip(maxima[2 * len(adapted) :], sums[2 * len(adapted) :], strict=True)]
    total = math.sqrt(sum(applied))
    scale = grad_norm / total if grad_norm is not None and math.isfinite(grad_norm) and total > 0 else 1.0
    names = ["decay" if group.get("adapt") else "no_decay" for group in groups]
    for index, (name, square) in enumerate(zip(names, applied, strict=True)):
        key = f"grad_norm_{name}" if names.count(name) == 1 else f"grad_norm_{name}_{index}"
        stats[key] = math.sqrt(square) * scale
    return stats


# The text of torch's warning under torch.cuda.set_sync_debug_mode("warn") (c10/cuda/CUDAFunctions.cpp,
# warn_or_error_on_sync); torch has no counter of its own, so the warnings are counted.
SYNC_WARNING = "called a synchronizing CUDA operation"


class HostSyncCounter:
    """Host synchronisations per optimizer step on CUDA, counted by torch's sync debug mode: with
    torch.cuda.set_sync_debug_mode("warn") torch warns at every synchronising call (`.item()`, `.tolist()`, a
    blocking copy to the host, `nonzero`, ...); each of those warnings is counted here instead of shown (other
    warnings are shown as before). That mode does not report torch.cuda.synchronize() or Event.synchronize().

    The loop calls `begin_step()` when a step starts (what came between steps, logging, saving and evaluation, is not
    the step's), `end_step()` after its optimizer step, and `read()` on logging steps. Off (None values) unless
    enabled: on CPU there is nothing to count."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.pending = 0
        self.steps: list[int] = []
        self._shown: Any = None
        if enabled:
            import warnings

            warnings.filterwarnings("always", message=".*" + SYNC_WARNING, category=UserWarning)  # each one, not once
            self._shown = warnings.showwarning
            warnings.showwarning = self._show
            self._set_mode("warn")

    @classmethod
    def for_device(cls, device) -> HostSyncCounter:
        return cls(device.type == "cuda")

    @staticmethod
    def _set_mode(mode: str) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(mode)

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, UserWarning) and SYNC_WARNING in str(message):
            self.pending += 1
        else:
            self._shown(message, category, filename, lineno, file, line)

    def begin_step(self) -> None:
        self.pending = 0

    def end_step(self) -> None:
        if self.enabled:
            self.steps.append(self.pending)
        self.pending = 0

    def read(self) -> dict[str, float | int | None]:
        """The steps' syncs since the last read: mean and most in one step (None when not counted)."""
        steps, self.steps = self.steps, []
        if not steps:
            return {"host_syncs_per_step": None, "host_syncs_max_step": None}
        return {"host_syncs_per_step": sum(steps) / len(steps), "host_syncs_max_step": max(steps)}

    def close(self) -> None:
        if self.enabled and self._shown is not None:
            import warnings

            self._set_mode("default")
            warnings.showwarning = self._shown
            self._shown = None


def comm_time() -> dict[str, float | int | None]:
    """Seconds spent in DeepSpeed's collectives since the last call, and how many, from DeepSpeed's comms logger
    (deepspeed.comm: every collective its engine and ZeRO optimizers make through it; not torch.distributed calls
    made directly). None when the logger is off: it is switched on by `"comms_logger": {"enabled": true,
    "prof_all": true}` in the DeepSpeed config, and then synchronises the device after every collective to time
    it, so it is a measurement setting, not a production one."""
    from deepspeed.comm import comm as ds_comm

    logger = ds_comm.comms_logger
    if not logger.enabled:
        return {"comm_sec": None, "comm_ops": None}
    data = logger.get_raw_data()  # {name: {message size: [count, [latencies in ms], [algbw], [busbw]]}}
    logger.reset_data()
    entries = [entry for sizes in data.values() for entry in sizes.values()]
    return {"comm_sec": sum(sum(e[1]) for e in entries) / 1000.0, "comm_ops": sum(e[0] for e in entries)}


def record_compile_counters(output: Path) -> dict[str, Any]:
    """Add torch._dynamo's counters so far (pipeline.fused.compile_counters) to OUTPUT/run-info.json under
    "compile" -> "counters" (rank 0, after the first optimizer step: the compiles have happened then)."""
    from .fused import compile_counters

    path = output / "run-info.json"
    info = json.loads(path.read_text())
    info.setdefault("compile", {})["counters"] = counters = compile_counters()
    write_text(path, json.dumps(info, indent=2, default=_json_value) + "\n")
    return counters
