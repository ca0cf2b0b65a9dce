"""Worker for tests/test_ds_configs.py: where DeepSpeed accumulates bf16 gradients for the shipped GPU configs.

Run as rank 0 of a 1-process gloo group (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test). For each
config given, the engine is built as `albert-pretrain` builds it (pipeline.run_config.engine_config, then
pipeline.engine.build_engine: our LAMB, attach_zero_partitions) from the config's own optimizer / ZeRO / precision /
data_types sections, with a tiny model, micro-batches of 2 and 3 micro-batches per step. A config albert-pretrain
refuses (bf16 with fp32 accumulation at ZeRO-0) is recorded as refused and handed to DeepSpeed all the same, so that
the test sees DeepSpeed's own answer to it. After each backward the gradient accumulation buffer of
DeepSpeed's optimizer wrapper is described (dtype, size, how many values are not representable in bf16); then
the step is applied. Each config runs twice: as shipped, and without its "data_types" section (DeepSpeed's
default, which accumulates in the model dtype), so that the test can see the setting is what makes the
difference. Writes {config name: {"shipped": run, "default": run}} as JSON to --out.

Where the accumulated gradients live (DeepSpeed 0.19.8, bf16):
  ZeRO-1 + grad_accum_dtype fp32: BF16_Optimizer.fp32_groups_gradients_flat (backward_epilogue adds each
    micro-batch's bf16 gradients into it); without the setting DeepSpeedZeroOptimizer, param.grad in bf16.
  ZeRO-2 + fp32: DeepSpeedZeroOptimizer's compact partition buffers, averaged_gradients[i].flat_partition
    (each micro-batch's reduced gradient is added to them); without: all_grad_tensors / averaged_gradients in bf16.
  ZeRO-3: DeepSpeedZeroOptimizer_Stage3.grad_partitions_flat_buffer, in gradient_accumulation_dtype.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

from pipeline.run_config import EngineConfig, TrainError, engine_config

MICRO, ACCUM = 2, 3
# The flat fp32 master partitions each wrapper hands the client optimizer (ZeRO 1/2, ZeRO-3, BF16_Optimizer).
FLAT_PARTITIONS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def accumulation_buffers(optimizer: Any) -> tuple[str, str, list[Any]]:
    """(where, the wrapper's declared accumulation dtype, the tensors holding the accumulated gradients)."""
    name = type(optimizer).__name__
    if name == "BF16_Optimizer":
        return "fp32_groups_gradients_flat", str(optimizer.grad_acc_dtype), list(optimizer.fp32_groups_gradients_flat)
    if name == "DeepSpeedZeroOptimizer_Stage3":
        return (
            "grad_partitions_flat_buffer",
            str(optimizer.gradient_accumulation_dtype),
            [optimizer.grad_partitions_flat_buffer],
        )
    if name == "DeepSpeedZeroOptimizer":
        declared = str(optimizer.gradient_accumulation_dtype)
        groups = range(len(optimizer.bit16_groups))
        if all(optimizer._use_compact_grad_partition_buffer(i) for i in groups):  # fp32 accumulation at ZeRO-2
            flats = [g.flat_partition for g in optimizer.averaged_gradients.values() if g is not None]
            return "averaged_gradients[i].flat_partition", declared, flats
        if optimizer.partition_gradients:  # ZeRO-2 in the model dtype: gradients of the partition, summed per backward
            held = [t for ts in optimizer.all_grad_tensors.values() if ts is not None for t in ts]
            held += [t for ts in optimizer.averaged_gradients.values() if ts is not None for t in ts]
            return "all_grad_tensors / averaged_gradients", declared, held
        # ZeRO-1 in the model dtype: autograd sums into param.grad; at the boundary they go to averaged_gradients
        params = [p for g in optimizer.bit16_groups for p in g]
        held = [p.grad_accum if optimizer.use_grad_accum_attribute else p.grad for p in params]
        held = [t for t in held if t is not None]
        held += [t for ts in optimizer.averaged_gradients.values() if ts is not None for t in ts]
        return "param.grad / averaged_gradients", declared, held
    if name == "FP16_UnfusedOptimizer":  # ZeRO-0 with bf16: autograd sums into the bf16 param.grad
        return "param.grad", "torch.bfloat16", [p.grad for g in optimizer.fp16_groups for p in g if p.grad is not None]
    raise TypeError(f"unknown DeepSpeed optimizer wrapper {name}")


def describe(optimizer: Any) -> dict[str, Any]:

    where, declared, tensors = accumulation_buffers(optimizer)
    return {
        "where": where,
        "declared_dtype": declared,
        "dtypes": sorted({str(t.dtype) for t in tensors}),
        "numel": sum(t.numel() for t in tensors),
        "sum_sq": sum(float(t.detach().double().square().sum()) for t in tensors),
        # values a bf16 buffer could not hold: the sum of several bf16 gradients kept at fp32 precision
        "not_bf16": sum(int((t.detach().float() != t.detach().bfloat16().float()).sum()) for t in tensors),
    }


def engine_dict(shipped: dict[str, Any], keep_data_types: bool) -> dict[str, Any]:
    ds = copy.deepcopy(shipped)
    ds.pop("train_batch_size", None)  # a 1-rank batch of MICRO x ACCUM instead of the cluster's 4096
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = MICRO, ACCUM
    if not keep_data_types:
        ds.pop("data_types", None)
    return ds


def settings(ds: dict[str, Any]) -> tuple[EngineConfig, str | None]:
    """The config as albert-pretrain decodes it, and albert-pretrain's refusal of it (None: accepted). A refused
    config's data_types is put back into the dict DeepSpeed gets, so that DeepSpeed answers for itself."""
    try:
        return engine_config(ds, world=1), None
    except TrainError as e:
        if "data_types" not in ds:
            raise
        accepted = engine_config({k: v for k, v in ds.items() if k != "data_types"}, world=1)
        return dataclasses.replace(accepted, deepspeed={**accepted.deepspeed, "data_types": ds["data_types"]}), str(e)


def run(shipped: dict[str, Any], keep_data_types: bool) -> dict[str, Any]:
    import torch
    from model_fixtures import make_batch, small_config

    from pipeline.engine import build_engine
    from pipeline.fused import PLAIN

    cfg = small_config()
    torch.manual_seed(0)
    config, refused = settings(engine_dict(shipped, keep_data_types))
    try:
        engine, _ = build_engine(cfg, config, PLAIN, torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - reported to the test (e.g. DeepSpeed refusing a dtype mix)
        return {"error": f"{type(e).__name__}: {e}", "refused": refused}
    result: dict[str, Any] = {"wrapper": type(engine.optimizer).__name__, "micro": [], "losses": []}
    result["refused"] = refused
    result["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    for micro in range(ACCUM):
        out = engine(**make_batch(cfg, batch=MICRO, seed=micro))
        loss = out.mlm_loss + out.sop_loss
        engine.backward(loss)
        result["micro"].append(describe(engine.optimizer))
        result["losses"].append(float(loss))
        engine.step()  # applies the update after the last micro-batch only
    result["global_steps"] = engine.global_steps
    lamb = engine.basic_optimizer
    flats = [t for name in FLAT_PARTITIONS for t in getattr(engine.optimizer, name, [])]
    result["lamb_flat_layouts"] = sum(lamb.layout_of(p) is not None for p in flats)
    result["lamb_tensors"] = len(flats)
    result["finite_after_step"] = all(math.isfinite(float(p.detach().float().sum())) for p in flats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("configs", nargs="+", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")  # ZeRO's deprecated torch collectives
    logging.basicConfig(level=logging.ERROR)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    results = {}
    for path in args.configs:
        shipped = json.loads(path.read_text())
        results[path.name] = {"shipped": run(shipped, True), "default": run(shipped, False)}
    args.out.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
