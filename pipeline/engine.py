"""The model and the DeepSpeed engine around it, built as every run builds them (albert-pretrain, the benchmarks,
the GPU check): ALBERT initialised also under ZeRO-3, optional Hugging Face weights, the fused paths, LAMB."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("albert-pretrain")


def build_model(cfg, ds: dict[str, Any], activation_checkpointing: bool):
    """The model, initialised the ALBERT way also under ZeRO-3 (where __init__'s initialisation is lost)."""
    import deepspeed

    from .model import AlbertForPreTraining, init_albert_weights

    if ds.get("zero_optimization", {}).get("stage", 0) != 3:
        return AlbertForPreTraining(cfg, gradient_checkpointing=activation_checkpointing)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = AlbertForPreTraining(cfg, gradient_checkpointing=activation_checkpointing)
    for m in model.modules():
        with deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False)), modifier_rank=0):
            init_albert_weights(m, cfg.initializer_range)
    return model


def build_engine(
    cfg, ds: dict[str, Any], fused, device, activation_checkpointing: bool = False, init_from: Path | None = None
):
    """Model (from `init_from`'s Hugging Face weights if given), its fused paths, our LAMB or FusedLamb, and the
    DeepSpeed engine; returns (engine, the config DeepSpeed got, the optimizer's log line). Seed torch first."""
    import deepspeed
    import torch

    from .comm import Comm
    from .fused import apply_fused
    from .lamb_deepspeed import attach_zero_partitions, select_optimizer

    stage = ds.get("zero_optimization", {}).get("stage", 0)
    model = build_model(cfg, ds, activation_checkpointing)
    if init_from:
        load_initial_weights(model, init_from, stage)
    dtype = (
        torch.bfloat16
        if ds.get("bf16", {}).get("enabled")
        else torch.float16
        if ds.get("fp16", {}).get("enabled")
        else torch.float32
    )
    for line in apply_fused(model, fused, device, stage, dtype):
        log.info("%s", line)
    optimizer, ds_out, description = select_optimizer(model, ds, allow_fused=fused.fused_lamb)
    # A rank whose FusedLamb build failed falls back to our LAMB; all ranks must then run the same optimizer.
    uses_fused = description.startswith("optimizer: DeepSpeed FusedLamb")
    comm = Comm(device)
    if comm.min_(comm.tensor([float(uses_fused)])).item() < float(uses_fused):
        optimizer, ds_out, description = select_optimizer(model, ds, allow_fused=False)
        description += " (FusedLamb could not be built on every rank)"
    log.info("%s", description)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=None if optimizer else model.parameters(), config=ds_out
    )
    attach_zero_partitions(engine, optimizer)
    return engine, ds_out, description


def load_initial_weights(model, folder: Path, stage: int) -> None:
    """Copy a Hugging Face ALBERT folder's weights into the model. Under ZeRO-3 the parameters are already
    partitioned (shape 0 on every rank): gather them, let rank 0 copy, and DeepSpeed re-partitions what rank 0 wrote."""
    import deepspeed
    import torch.distributed as dist

    from .hf import load_hf

    state = load_hf(folder)[1].state_dict()
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if dist.get_rank() == 0:
                model.load_state_dict(state)
    else:
        model.load_state_dict(state)
    log.info("initialised from %s", folder)


def loss_scale(engine, precision: str) -> float:
    if precision != "fp16":
        return 1.0
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", 1.0))
