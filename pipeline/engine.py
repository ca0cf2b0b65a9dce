"""The model and the DeepSpeed engine around it, built as every run builds them (albert-pretrain, the benchmarks,
the GPU check): ALBERT initialised also under ZeRO-3, optional Hugging Face weights, the fused paths, LAMB."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .precision import allow_fp16_on_cpu
from .run_config import EngineConfig, Precision

if TYPE_CHECKING:
    from .lamb_deepspeed import OptimizerChoice

log = logging.getLogger("albert-pretrain")


def build_model(cfg, config: EngineConfig, activation_checkpointing: bool):
    """The model, initialised the ALBERT way also under ZeRO-3 (where __init__'s initialisation is lost)."""
    import deepspeed

    from .model import AlbertForPreTraining, init_albert_weights

    if config.zero_stage != 3:
        return AlbertForPreTraining(cfg, gradient_checkpointing=activation_checkpointing)
    with deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(config.deepspeed)):
        model = AlbertForPreTraining(cfg, gradient_checkpointing=activation_checkpointing)
    for m in model.modules():
        with deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False)), modifier_rank=0):
            init_albert_weights(m, cfg.initializer_range)
    return model


def build_engine(
    cfg,
    config: EngineConfig,
    fused,
    device,
    activation_checkpointing: bool = False,
    init_from: Path | None = None,
) -> tuple[Any, OptimizerChoice]:
    """Model (from `init_from`'s Hugging Face weights if given), its fused paths, our LAMB or FusedLamb, and the
    DeepSpeed engine; returns (engine, the optimizer chosen, agreed by every rank). Seed torch first."""
    import deepspeed

    from .comm import Comm
    from .fused import apply_fused
    from .lamb_deepspeed import OptimizerKind, attach_zero_partitions, select_optimizer

    if config.fp16_on_cpu:
        allow_fp16_on_cpu()  # before DeepSpeed reads the config (zero.Init at ZeRO-3, then initialize)
    model = build_model(cfg, config, activation_checkpointing)
    if init_from:
        load_initial_weights(model, init_from, config.zero_stage)
    for line in apply_fused(model, fused, device, config.zero_stage, config.precision.dtype):
        log.info("%s", line)
    choice = select_optimizer(model, config, allow_fused=fused.fused_lamb)
    # A rank whose FusedLamb build failed falls back to our LAMB; all ranks must then run the same optimizer.
    uses_fused = choice.kind is OptimizerKind.FUSED_LAMB
    comm = Comm(device)
    if comm.min_(comm.tensor([float(uses_fused)])).item() < float(uses_fused):
        fallback = select_optimizer(model, config, allow_fused=False)
        choice = replace(fallback, description=fallback.description + " (FusedLamb could not be built on every rank)")
    log.info("%s", choice.description)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=choice.optimizer,
        model_parameters=None if choice.optimizer else model.parameters(),
        config=copy.deepcopy(config.deepspeed),
    )
    attach_zero_partitions(engine, choice.optimizer)
    return engine, choice


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


def loss_scale(engine, precision: Precision) -> float:
    if precision is not Precision.FP16:
        return 1.0
    opt = engine.optimizer
    scale: Any = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", 1.0)
    return float(scale)
