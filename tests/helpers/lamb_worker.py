"""Worker for tests/test_lamb.py: trains a tiny model with our LAMB under DeepSpeed, one process per rank.

Launched by torchrun. Every run sees the same global batches (split across ranks) and the same
initial weights, so runs at different ZeRO stages must end with the same parameters. Rank 0
writes {run name: {"params", "losses", "lrs", ...}} with torch.save to --out.

Runs (comma-separated --runs):
  fp32    per-parameter trust ratios (attach_zero_partitions)
  naive   each flat ZeRO partition treated as one tensor: what a per-tensor LAMB does under ZeRO
  bf16    like fp32 with "bf16": {"enabled": true}
  bf16acc bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer at ZeRO-1)
  resume  half the steps, save_checkpoint, the other half; then a fresh engine loads the
          checkpoint and repeats the second half
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.comm import Comm
from pipeline.distributed import shutdown_distributed
from pipeline.lamb import FlatLayout
from pipeline.lamb_deepspeed import attach_zero_partitions, select_optimizer
from pipeline.metrics import lamb_stats
from pipeline.run_config import engine_config

log = logging.getLogger("lamb_worker")

VOCAB, EMBED, HIDDEN, SEQ = 37, 13, 29, 6  # odd sizes so ZeRO partitions cut parameters mid-tensor
GLOBAL_BATCH = 8
LR = 0.02
# Layout options that make the partitions harder to map: padding between parameters (ZeRO-1),
# parameters reordered across ranks (ZeRO-2), several optimizer sub-groups (ZeRO-3).
ZERO_LAYOUT_OPTIONS: dict[int, dict[str, Any]] = {
    1: {"parameter_alignment": True},
    2: {"round_robin_gradients": True},
    3: {"sub_group_size": 400},
}


class TinyNet(nn.Module):
    """Tied input/output embedding, one layer applied twice (shared), LayerNorms, biases, a bare bias."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.proj = nn.Linear(EMBED, HIDDEN)
        self.norm_in = nn.LayerNorm(HIDDEN)
        self.shared = nn.Linear(HIDDEN, HIDDEN)
        self.norm_shared = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, EMBED)
        self.out_bias = nn.Parameter(torch.zeros(VOCAB))
        with torch.no_grad():  # non-trivial LayerNorm parameters, so their exclusion matters
            for norm in (self.norm_in, self.norm_shared):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.1, 0.1)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(torch.tanh(self.proj(self.embed(ids))))
        for _ in range(2):
            x = self.norm_shared(x + torch.tanh(self.shared(x)))
        logits = self.out(x) @ self.embed.weight.t() + self.out_bias
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return ids, (ids * 7 + 3) % VOCAB  # a learnable mapping, so the loss falls


def ds_config(stage: int, world: int, precision: str, steps: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "optimizer": {
            "type": "Lamb",
            "params": {
                "lr": LR,
                "betas": [0.9, 0.999],
                "eps": 1e-6,
                "weight_decay": 0.01,
                "bias_correction": True,
                "max_grad_norm": 1.0,
                "max_coeff": 10.0,
                "min_coeff": 0.01,
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": LR,
                "warmup_num_steps": 3,
                "total_num_steps": steps,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": {"stage": stage, **ZERO_LAYOUT_OPTIONS.get(stage, {})},
        "steps_per_print": 10**9,
    }
    if precision in ("bf16", "bf16acc"):
        config["bf16"] = {"enabled": True}
    if precision == "bf16acc":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def make_engine(stage: int, precision: str, steps: int, naive: bool) -> tuple[Any, Any, str]:
    torch.manual_seed(0)
    model = TinyNet()
    world = torch.distributed.get_world_size()
    config = engine_config(ds_config(stage, world, precision, steps), world)
    choice = select_optimizer(model, config)
    optimizer, description = choice.optimizer, choice.description
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config.deepspeed)
    attach_zero_partitions(engine, optimizer)
    if naive:
        for flat in flat_partitions(engine):  # one segment, one "parameter", no cross-rank sum
            optimizer.register_flat(flat, FlatLayout.from_segments([(flat.numel(), 0)], num_params=1))
    return engine, optimizer, description


def flat_partitions(engine: Any) -> list[torch.Tensor]:
    """The flat fp32 tensors DeepSpeed hands the optimizer (none at ZeRO-0 fp32)."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if hasattr(engine.optimizer, name):
            return list(getattr(engine.optimizer, name))
    return []


def train(engine: Any, first: int, last: int, lamb: Any = None) -> tuple[list[float], list[float], list[dict]]:
    """Steps [first, last): the mean losses, the learning rates and (with `lamb`) per step the metrics' per-group
    statistics, given the norm before clipping ("given") and not ("applied")."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    micro = GLOBAL_BATCH // world
    losses, lrs, stats = [], [], []
    for step in range(first, last):
        ids, targets = global_batch(step)
        loss = engine(ids[rank * micro : (rank + 1) * micro], targets[rank * micro : (rank + 1) * micro])
        engine.backward(loss)
        lrs.append(float(engine.optimizer.param_groups[0]["lr"]))
        engine.step()
        if lamb is not None:
            norm = engine.get_global_grad_norm()
            stats.append(
                {
                    "grad_norm": None if norm is None else float(norm),  # (None at ZeRO-0 fp32: DeepSpeed keeps none)
                    "given": lamb_stats(lamb, Comm("cpu"), None if norm is None else float(norm)),
                    "applied": lamb_stats(lamb, Comm("cpu"), None),
                }
            )
        mean = loss.detach().float().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses, lrs, stats


def gathered_params(engine: Any) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def run(name: str, stage: int, steps: int, checkpoint_dir: Path) -> dict[str, Any]:
    precision = name if name.startswith("bf16") else "fp32"
    engine, optimizer, description = make_engine(stage, precision, steps, naive=name == "naive")
    result: dict[str, Any] = {"description": description, "wrapper": type(engine.optimizer).__name__}
    layouts = [optimizer.layout_of(flat) for flat in flat_partitions(engine)]
    result["layouts"] = [(lay.lengths.tolist(), lay.slots.tolist(), lay.num_params) for lay in layouts if lay]
    if name != "resume":
        result["losses"], result["lrs"], result["stats"] = train(
            engine, 0, steps, optimizer if name == "fp32" else None
        )
        result["params"] = gathered_params(engine)
        return result
    half = steps // 2
    train(engine, 0, half)
    engine.save_checkpoint(str(checkpoint_dir), tag="half")
    result["losses"], _, _ = train(engine, half, steps)
    result["params"] = gathered_params(engine)
    engine, optimizer, _ = make_engine(stage, precision, steps, naive=False)
    engine.load_checkpoint(str(checkpoint_dir), tag="half")
    result["resumed_losses"], _, _ = train(engine, half, steps)
    result["resumed_params"] = gathered_params(engine)
    result["resumed_state"] = [
        {k: (v if isinstance(v, int) else tuple(v.shape)) for k, v in s.items()} for s in optimizer.state.values()
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--runs", default="fp32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read lazily, at DeepSpeed's first get_accelerator()
    warnings.filterwarnings("ignore", category=FutureWarning)  # ZeRO's deprecated torch collectives
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pipeline.lamb").setLevel(logging.INFO)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    results = {
        name: run(name, args.stage, args.steps, args.out.parent / f"ckpt-{args.stage}") for name in args.runs.split(",")
    }
    if torch.distributed.get_rank() == 0:
        torch.save(results, args.out)
    torch.distributed.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
    # The results are saved: skip interpreter teardown, where a communication thread of gloo or DeepSpeed's CPU ops
    # can still abort the process ("terminate called without an active exception", seen in a test run) and
    # the launcher would report a finished worker as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
