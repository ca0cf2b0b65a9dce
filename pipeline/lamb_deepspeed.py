"""Our LAMB inside DeepSpeed: the one module that knows DeepSpeed's optimizer wrappers (revisit it on a DeepSpeed
upgrade).

- `select_optimizer` builds the LAMB a config's `"optimizer": {"type": "Lamb"}` asks for: DeepSpeed's FusedLamb
  where it computes LAMB (CUDA, ZeRO-0, no bias correction) and its CUDA kernel builds, our `pipeline.lamb.Lamb`
  everywhere else.
- `attach_zero_partitions` tells our Lamb where each parameter lies inside the flat partitions DeepSpeed's
  wrapper hands it (ZeRO 1/2, ZeRO-3, BF16_Optimizer, FP16_UnfusedOptimizer).

Usage (the engine's side):

    optimizer, ds_config, description = select_optimizer(model, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, ...)
    attach_zero_partitions(engine, optimizer)

FusedLamb and bias correction: DeepSpeed's CUDA FusedLamb, with bias_correction true, does not correct the moments
but multiplies the step by sqrt(1 - b2^t) / (1 - b1^t) after the trust ratio (0.15-0.98 over the first ~3,000
steps: a hidden learning-rate ramp, since the trust ratio cancels a correction of the moments); without bias
correction the two agree to rounding (bench/gpu_check.py checks it). So FusedLamb is only chosen where it computes
the same update as ours.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .lamb import FlatLayout, Lamb, lamb_param_groups

log = logging.getLogger(__name__)

# FusedLamb's keyword arguments that a DeepSpeed config may carry under "optimizer.params".
FUSED_LAMB_PARAMS = frozenset(
    {"lr", "bias_correction", "betas", "eps", "weight_decay", "max_grad_norm", "max_coeff", "min_coeff"}
)


def _zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _cuda_fused_lamb_available() -> bool:
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cuda":
        return False
    from deepspeed.ops.op_builder import FusedLambBuilder

    return bool(FusedLambBuilder().is_compatible(verbose=False))


def fused_lamb_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """lamb_param_groups for DeepSpeed's FusedLamb, which has no per-group switch for adaptation:
    min_coeff = max_coeff = 1 pins the trust ratio to 1 in the no-decay group."""
    groups = lamb_param_groups(model, weight_decay)
    for g in groups:
        if not g.pop("adapt"):
            g.update(min_coeff=1.0, max_coeff=1.0)
    return groups


def select_optimizer(
    model: nn.Module, ds_config: dict[str, Any], allow_fused: bool = True
) -> tuple[torch.optim.Optimizer | None, dict[str, Any], str]:
    """Build the LAMB a config's `"optimizer": {"type": "Lamb"}` asks for.

    Returns (optimizer, config to pass to deepspeed.initialize, one line for the log). For type
    Lamb the optimizer is built here on `lamb_param_groups` (so LayerNorms and biases are excluded
    from decay and adaptation), the "optimizer" section is dropped, FusedLamb's `max_grad_norm`
    becomes DeepSpeed's `gradient_clipping` (DeepSpeed clips before step and refuses
    max_grad_norm itself), and ZeRO 1-3 get `zero_allow_untested_optimizer`. It is DeepSpeed's
    FusedLamb on CUDA at ZeRO-0 without bias correction (with min_coeff = max_coeff = 1 in the
    no-decay group, which turns adaptation off there, unless `allow_fused` is False) and our `Lamb`
    everywhere else; the log line says why FusedLamb is not used (fused_lamb_unavailable). Other optimizer types: (None, the
    config unchanged, a description).
    """
    section = ds_config.get("optimizer")
    if not section:
        return None, ds_config, "optimizer: none in the DeepSpeed config"
    kind = str(section.get("type", ""))
    if kind.lower() != "lamb":
        return None, ds_config, f"optimizer: DeepSpeed's {kind} from the config"
    params = dict(section.get("params") or {})
    unknown = set(params) - FUSED_LAMB_PARAMS
    if unknown:
        raise ValueError(f"unsupported Lamb params {sorted(unknown)}; allowed: {sorted(FUSED_LAMB_PARAMS)}")
    config = copy.deepcopy(ds_config)
    del config["optimizer"]
    max_grad_norm = float(params.pop("max_grad_norm", 0.0))
    if max_grad_norm > 0:
        clipping = float(config.get("gradient_clipping", 0.0))
        if clipping > 0 and clipping != max_grad_norm:
            raise ValueError(f"optimizer max_grad_norm {max_grad_norm} contradicts gradient_clipping {clipping}")
        config["gradient_clipping"] = max_grad_norm
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    weight_decay = float(params.pop("weight_decay", 0.0))
    stage = _zero_stage(config)

    why = fused_lamb_unavailable(config, params, allow_fused)
    if why is None:
        from deepspeed.ops.lamb import FusedLamb

        # FusedLamb JIT-builds its CUDA kernel in __init__; without a matching CUDA toolkit (nvcc, headers) on the
        # node the build fails. That must not stop a run that our LAMB can do as well: fall back and say why.
        try:
            return (
                FusedLamb(fused_lamb_param_groups(model, weight_decay), weight_decay=weight_decay, **params),
                config,
                "optimizer: DeepSpeed FusedLamb (CUDA, ZeRO-0, per-parameter trust ratios)",
            )
        except Exception as e:  # noqa: BLE001 - any build or load failure (MissingCUDAException, compiler errors, ...)
            why = f"its JIT build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else 'no message'})"
            log.warning("DeepSpeed FusedLamb could not be built, using our LAMB: %s", why)

    if stage > 0:
        config["zero_allow_untested_optimizer"] = True
        where = f"ZeRO-{stage} partitions"
    else:
        where = "ZeRO-0, whole tensors"
    return (
        Lamb(lamb_param_groups(model, weight_decay), weight_decay=weight_decay, **params),
        config,
        f"optimizer: our multi-tensor LAMB ({where}, per-parameter trust ratios); DeepSpeed FusedLamb off: {why}",
    )


def fused_lamb_unavailable(config: dict[str, Any], params: dict[str, Any], allow_fused: bool) -> str | None:
    """Why DeepSpeed's FusedLamb is not used for this config, or None when it is."""
    if not allow_fused:
        return "switched off"
    if not _cuda_fused_lamb_available():
        return "no CUDA"
    if _zero_stage(config) != 0:  # DeepSpeed hands a client optimizer flat partitions at ZeRO 1-3
        return f"it would see ZeRO-{_zero_stage(config)} flat partitions, not whole parameters"
    if params.get("bias_correction", True):  # FusedLamb's own default is True
        return (
            "its bias correction is a step-size factor, not LAMB's corrected moments (set bias_correction false, "
            "as ALBERT and the shipped configs do, to use it)"
        )
    return None


def attach_zero_partitions(engine: Any, optimizer: torch.optim.Optimizer | None) -> None:
    """Tell our Lamb how DeepSpeed's optimizer wrapper laid the parameters out.

    A no-op when DeepSpeed hands Lamb the parameters themselves (ZeRO-0, fp32) or when the
    optimizer is not our Lamb. Relies on these DeepSpeed 0.19 attributes:
      ZeRO 1/2 (DeepSpeedZeroOptimizer): round_robin_bit16_groups, round_robin_bit16_offsets,
        round_robin_bit16_meta, bit16_groups_flat, single_partition_of_fp32_groups, real_dp_process_group;
      ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): fp16_groups (sub groups), fp32_partitioned_groups_flat,
        sub_group_process_groups, param.ds_numel, param.partition_numel();
      BF16_Optimizer (bf16 at ZeRO-1 with fp32 gradient accumulation): bf16_groups,
        bf16_groups_flat, fp32_groups_flat_partition, real_dp_process_group;
      FP16_UnfusedOptimizer (fp16/bf16 at ZeRO-0): fp32_groups (one fp32 copy per parameter).
    """
    if not isinstance(optimizer, Lamb):
        return
    wrapper = engine.optimizer
    if wrapper is optimizer:
        return
    if getattr(wrapper, "optimizer", None) is not optimizer:
        raise TypeError(f"{type(wrapper).__name__} does not wrap this Lamb")

    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        described = _attach_stage3(wrapper, optimizer)
    elif isinstance(wrapper, DeepSpeedZeroOptimizer):
        described = _attach_stage_1_2(wrapper, optimizer)
    elif isinstance(wrapper, BF16_Optimizer):
        described = _attach_bf16(wrapper, optimizer)
    elif isinstance(wrapper, FP16_UnfusedOptimizer):
        for fp32_group in wrapper.fp32_groups:
            optimizer.register_whole(fp32_group)
        described = f"{sum(len(g) for g in wrapper.fp32_groups)} fp32 master tensors"
    else:
        raise TypeError(f"LAMB does not know the layout of DeepSpeed's {type(wrapper).__name__}")
    log.info("LAMB: per-parameter trust ratios over %s (%s)", described, type(wrapper).__name__)


def _dp_group(group: Any) -> Any:
    """DeepSpeed's None means the world group; in a FlatLayout None means nothing is held elsewhere."""
    return dist.group.WORLD if group is None else group


def _attach_stage_1_2(zero: Any, lamb: Lamb) -> str:
    parts = 0
    for i, flat_partition in enumerate(zero.single_partition_of_fp32_groups):
        group = _dp_group(zero.real_dp_process_group[i])
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        size = zero.bit16_groups_flat[i].numel() // world  # the flat buffer is aligned to a multiple of world
        numels = [meta.numel() for meta in zero.round_robin_bit16_meta[i]]
        layout = FlatLayout.contiguous(numels, zero.round_robin_bit16_offsets[i], rank * size, size, group)
        lamb.register_flat(flat_partition, layout)
        parts += len(numels)
    stage = 2 if zero.partition_gradients else 1
    return f"{parts} parameters in {len(zero.single_partition_of_fp32_groups)} ZeRO-{stage} partitions"


def _attach_stage3(zero: Any, lamb: Lamb) -> str:
    parts = 0
    for i, flat_partition in enumerate(zero.fp32_partitioned_groups_flat):
        group = _dp_group(zero.sub_group_process_groups[i])
        params = zero.fp16_groups[i]
        layout = FlatLayout.per_parameter_shards(
            [p.ds_numel for p in params], [p.partition_numel() for p in params], dist.get_rank(group=group), group
        )
        lamb.register_flat(flat_partition, layout)
        parts += len(params)
    return f"{parts} parameters in {len(zero.fp32_partitioned_groups_flat)} ZeRO-3 sub-group partitions"


def _attach_bf16(bf16: Any, lamb: Lamb) -> str:
    parts = 0
    for i, flat_partition in enumerate(bf16.fp32_groups_flat_partition):
        group = _dp_group(bf16.real_dp_process_group[i])
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        size = bf16.bf16_groups_flat[i].numel() // world
        numels = [p.numel() for p in bf16.bf16_groups[i]]
        offsets = [sum(numels[:j]) for j in range(len(numels))]  # packed back to back, padding at the end
        lamb.register_flat(flat_partition, FlatLayout.contiguous(numels, offsets, rank * size, size, group))
        parts += len(numels)
    return f"{parts} parameters in {len(bf16.fp32_groups_flat_partition)} BF16-optimizer partitions"
