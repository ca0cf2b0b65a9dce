"""Settings of a run, checked before any work: batch sizes from the DeepSpeed config, the schedule, data vs model.

Each problem is a `TrainError` with a one-line message that says what to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TrainError(Exception):
    """A setting or input that makes training impossible; reported on one line before any step."""


@dataclass
class BatchSizes:
    """Examples per micro-batch, micro-batches per optimizer step (accumulation), data-parallel ranks."""

    micro: int
    accum: int
    world: int

    @property
    def global_size(self) -> int:
        return self.micro * self.accum * self.world


def resolve_batch(ds: dict[str, Any], world: int) -> BatchSizes:
    """DeepSpeed's rule (any two of the three determine the third), checked with messages a user understands."""
    tb, mb, ga = ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps")
    if mb is None and tb is None:
        raise TrainError("DeepSpeed config: set train_micro_batch_size_per_gpu (and train_batch_size or gradient_accumulation_steps)")
    if mb is None:
        ga = ga or 1
        if tb % (ga * world):
            raise TrainError(f"train_batch_size {tb} is not divisible by gradient_accumulation_steps {ga} x {world} rank(s)")
        mb = tb // (ga * world)
    elif ga is None:
        ga = 1 if tb is None else tb // (mb * world)
        if tb is not None and (ga < 1 or tb != mb * ga * world):
            raise TrainError(f"train_batch_size {tb} != micro batch {mb} x {world} rank(s) x some accumulation: choose a multiple of {mb * world}")
    if tb is not None and tb != mb * ga * world:
        raise TrainError(f"train_batch_size {tb} != train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps {ga} x {world} rank(s) = {mb * ga * world}")
    return BatchSizes(mb, ga, world)


def load_ds_config(path: Path, batch_world: int) -> tuple[dict[str, Any], BatchSizes]:
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"{path}: no such DeepSpeed config") from None
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: not valid JSON ({e})") from None
    batch = resolve_batch(ds, batch_world)
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = batch.micro, batch.accum
    ds["train_batch_size"] = batch.global_size
    # DeepSpeed's throughput timer, on by default, synchronises the GPU at every forward and step (two host syncs per
    # micro-batch); metrics.jsonl reports samples/s and tokens/s without it. A config's own "timers" is kept.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    return ds, batch


def check_data_against_model(data, cfg, source: Path) -> None:
    if data.sentence_task != "sop":
        raise TrainError(f"{source}: sentence task {data.sentence_task!r}; this model trains sentence-order prediction (sop)")
    if data.vocab_size != cfg.vocab_size:
        raise TrainError(f"{source}: the shards' vocabulary has {data.vocab_size} pieces but the model config says vocab_size {cfg.vocab_size}")
    if data.seq_len > cfg.max_position_embeddings:
        raise TrainError(f"{source}: sequences of {data.seq_len} tokens exceed the model's max_position_embeddings {cfg.max_position_embeddings}")


def fill_scheduler(ds: dict[str, Any], max_steps: int) -> None:
    """WarmupDecayLR needs total_num_steps: default it to --max-steps (ALBERT: linear warmup, then linear decay to 0)."""
    sched = ds.get("scheduler")
    if sched and sched.get("type") == "WarmupDecayLR":
        params = sched.setdefault("params", {})
        if "total_num_steps" not in params:
            params["total_num_steps"] = max_steps
        if params.get("warmup_num_steps", 0) >= params["total_num_steps"]:
            raise TrainError(f"scheduler: warmup_num_steps {params['warmup_num_steps']} >= total_num_steps {params['total_num_steps']}")
