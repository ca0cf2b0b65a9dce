"""Settings of a run: albert-pretrain's command line, and the checks made before any work (batch sizes from the
DeepSpeed config, the schedule, data vs model).

Each problem is a `TrainError` with a one-line message that says what to change.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLE = (
    "torchrun --nproc_per_node 2 -m pipeline.pretrain --deepspeed_config ds_configs/cpu-zero2-bf16-lamb.json "
    "--model-config albert-tiny --data data/shards --eval-data data/eval --output runs/tiny --max-steps 200"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="albert-pretrain",
        description="Pretrain ALBERT (MLM + sentence-order prediction) on shards from `albert-data`, with DeepSpeed.",
        epilog=f"example:\n  {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # slurm/pretrain.sbatch reads --data/--output from the arguments: no abbreviations
    )
    a = p.add_argument
    a(
        "--deepspeed_config",
        "--deepspeed-config",
        required=True,
        type=Path,
        help="DeepSpeed JSON config (batch, precision, ZeRO, optimizer, scheduler)",
    )
    a(
        "--model-config",
        required=True,
        help="model config JSON (Hugging Face AlbertConfig keys) or a shipped name: albert-tiny, albert-base, ...",
    )
    a("--data", required=True, type=Path, help="shard folder with manifest.json (from `albert-data shard`)")
    a("--eval-data", type=Path, default=None, help="shard folder for evaluation")
    a("--output", required=True, type=Path, help="checkpoints/, tensorboard/, metrics.jsonl go here")
    a(
        "--max-steps",
        type=int,
        required=True,
        help="optimizer steps to train in all (a resumed run continues to this step)",
    )
    a("--save-interval", type=int, default=1000, help="save a checkpoint every N steps (and at the end)")
    a("--eval-interval", type=int, default=1000, help="evaluate every N steps (and at the end)")
    a("--eval-batches", type=int, default=100, help="micro-batches per rank in an evaluation")
    a("--log-interval", type=int, default=10, help="write a metrics line every N steps")
    a("--seed", type=int, default=42, help="model initialisation and data order")
    a(
        "--resume",
        default="auto",
        help="auto (newest complete checkpoint in OUTPUT), never, or a checkpoint folder; one written with other ranks, "
        "ZeRO stage or precision is converted (same global batch and model)",
    )
    a("--keep-checkpoints", type=int, default=3, help="complete checkpoints to keep")
    a(
        "--init-from",
        type=Path,
        default=None,
        help="start from the weights of a Hugging Face ALBERT folder (albert-export output)",
    )
    a(
        "--activation-checkpointing",
        action="store_true",
        help="recompute layer activations in backward (long sequences)",
    )
    a(
        "--attention",
        choices=["auto", "sdpa", "math"],
        default="auto",
        help="sdpa: scaled_dot_product_attention (fused kernels); math: explicit form; auto: sdpa, except explicit on CPU in bf16",
    )
    a(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the shared layers and MLM head: auto = on CUDA only (no faster on CPU, measured)",
    )
    a("--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off")
    a(
        "--no-fused-lamb",
        action="store_true",
        help="use our multi-tensor LAMB also where DeepSpeed's FusedLamb applies (CUDA, ZeRO-0)",
    )
    a("--no-malloc-tuning", action="store_true", help="CPU: keep glibc's malloc defaults (see pipeline/malloc.py)")
    a(
        "--no-tf32",
        action="store_true",
        help="GPU: fp32 matmuls in full IEEE precision instead of TF32 (Ampere and newer)",
    )
    a("--skip-bad-shards", action="store_true", help="skip unreadable shards with a warning instead of stopping")
    a("--dist-timeout", type=float, default=600.0, help="seconds to wait for the other ranks")
    a(
        "--allow-fp16-on-cpu",
        action="store_true",
        help="testing only: run DeepSpeed's fp16 path on a CPU that lacks fp16 support",
    )
    a(
        "--record-batches",
        action="store_true",
        help="write each rank's examples (CRC32 of input_ids) per step to OUTPUT/batches-rank<r>.jsonl",
    )
    a(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # the deepspeed launcher passes it
    a("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


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
    tb, mb, ga = (
        ds.get("train_batch_size"),
        ds.get("train_micro_batch_size_per_gpu"),
        ds.get("gradient_accumulation_steps"),
    )
    if mb is None and tb is None:
        raise TrainError(
            "DeepSpeed config: set train_micro_batch_size_per_gpu (and train_batch_size or gradient_accumulation_steps)"
        )
    if mb is None:
        ga = ga or 1
        if tb % (ga * world):
            raise TrainError(
                f"train_batch_size {tb} is not divisible by gradient_accumulation_steps {ga} x {world} rank(s)"
            )
        mb = tb // (ga * world)
    elif ga is None:
        ga = 1 if tb is None else tb // (mb * world)
        if tb is not None and (ga < 1 or tb != mb * ga * world):
            raise TrainError(
                f"train_batch_size {tb} != micro batch {mb} x {world} rank(s) x some accumulation: choose a multiple of {mb * world}"
            )
    if tb is not None and tb != mb * ga * world:
        raise TrainError(
            f"train_batch_size {tb} != train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps {ga} x {world} rank(s) = {mb * ga * world}"
        )
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
        raise TrainError(
            f"{source}: sentence task {data.sentence_task!r}; this model trains sentence-order prediction (sop)"
        )
    if data.vocab_size != cfg.vocab_size:
        raise TrainError(
            f"{source}: the shards' vocabulary has {data.vocab_size} pieces but the model config says vocab_size {cfg.vocab_size}"
        )
    if data.seq_len > cfg.max_position_embeddings:
        raise TrainError(
            f"{source}: sequences of {data.seq_len} tokens exceed the model's max_position_embeddings {cfg.max_position_embeddings}"
        )


def fill_scheduler(ds: dict[str, Any], max_steps: int) -> None:
    """WarmupDecayLR needs total_num_steps: default it to --max-steps (ALBERT: linear warmup, then linear decay to 0)."""
    sched = ds.get("scheduler")
    if sched and sched.get("type") == "WarmupDecayLR":
        params = sched.setdefault("params", {})
        if "total_num_steps" not in params:
            params["total_num_steps"] = max_steps
        if params.get("warmup_num_steps", 0) >= params["total_num_steps"]:
            raise TrainError(
                f"scheduler: warmup_num_steps {params['warmup_num_steps']} >= total_num_steps {params['total_num_steps']}"
            )
