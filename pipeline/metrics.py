"""What a run reports: `IntervalSums` (a logging interval's sums, made global on logging steps), `Metrics`
(metrics.jsonl, one JSON object per logged step, and the same scalars in TensorBoard; rank 0 writes) and
`BatchRecorder` (the examples each step saw, for checking resume and epochs)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

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
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # drop what a lost run recorded after the checkpoint we resume from
            keep_through_step(path, resume_step)
        self.file = open(path, "a")

    def write(self, step: int, micro_batches: list[dict]) -> None:
        import zlib

        ids = [zlib.crc32(row.numpy().tobytes()) for b in micro_batches for row in b["input_ids"]]
        self.file.write(json.dumps({"step": step, "examples": ids}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train_record(
    engine, sums: dict[str, float], seconds: float, data_wait: float, epoch: int, loss_scale: float
) -> dict[str, Any]:
    """The metrics line of a logged training step, logged too: `sums` from IntervalSums.reduce over `seconds`."""
    grad_norm = engine.get_global_grad_norm()
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
        "tokens_per_sec": sums["tokens"] / seconds,
        "data_wait_sec": data_wait,
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),  # overflow steps DeepSpeed skipped, in all
        "epoch": epoch,
    }
    log.info(
        "step %d: loss %.4f (MLM %.4f, SOP %.4f), MLM acc %.3f, SOP acc %.3f, lr %.2e, %.1f samples/s, data wait %.2f s",
        record["step"],
        record["loss"],
        record["mlm_loss"],
        record["sop_loss"],
        record["mlm_accuracy"],
        record["sop_accuracy"],
        record["lr"],
        record["samples_per_sec"],
        record["data_wait_sec"],
    )
    return record


class Metrics:
    def __init__(self, output: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # lines logged after the checkpoint we resume from belong to a run that was lost
            keep_through_step(self.path, resume_step or 0)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(
            log_dir=str(output / "tensorboard"), purge_step=(resume_step + 1) if resume_step else None
        )
        self.file = open(self.path, "a")

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
