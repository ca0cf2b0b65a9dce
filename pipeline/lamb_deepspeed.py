"""Our LAMB inside DeepSpeed: the one module that knows DeepSpeed's optimizer wrappers (revisit it on a DeepSpeed
upgrade).

- `select_optimizer` builds the optimizer a run's `EngineConfig` asks for: for `"optimizer": {"type": "Lamb"}`
  DeepSpeed's FusedLamb where it computes LAMB (CUDA, ZeRO-0, no bias correction) and its CUDA kernel builds, our
  `pipeline.lamb.Lamb` everywhere else (`build_lamb`); for other types none (DeepSpeed builds the config's own).
  It returns an `OptimizerChoice`: the optimizer, its `OptimizerKind` and the line the log gets.
- `attach_zero_partitions` tells our Lamb where each parameter lies inside the flat partitions DeepSpeed's
  wrapper hands it (ZeRO 1/2, ZeRO-3, BF16_Optimizer, FP16_UnfusedOptimizer).

Usage (the engine's side; `config` from pipeline.run_config.engine_config):

    choice = select_optimizer(model, config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=choice.optimizer, config=config.deepspeed, ...)
    attach_zero_partitions(engine, choice.optimizer)

FusedLamb and bias correction: DeepSpeed's CUDA FusedLamb, with bias_correction true, does not correct the moments
but multiplies the step by sqrt(1 - b2^t) / (1 - b1^t) after the trust ratio (0.15-0.98 over the first ~3,000
steps: a hidden learning-rate ramp, since the trust ratio cancels a correction of the moments); without bias
correction the two agree to rounding (bench/gpu_check.py checks it). So FusedLamb is only chosen where it computes
the same update as ours.
"""

from __future__ import annotations

import enum
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .lamb import FlatLayout, Lamb, lamb_param_groups
from .run_config import EngineConfig, LambSettings

log = logging.getLogger(__name__)


class OptimizerKind(enum.StrEnum):
    """Which optimizer a run steps with; the values are the names reports give them."""

    FUSED_LAMB = "FusedLamb"  # DeepSpeed's FusedLamb (CUDA kernel, ZeRO-0)
    OUR_LAMB = "our Lamb"  # pipeline.lamb.Lamb
    FROM_CONFIG = "DeepSpeed's own"  # not LAMB: DeepSpeed builds the config's optimizer section (or none)


@dataclass(frozen=True)
class OptimizerChoice:
    optimizer: torch.optim.Optimizer | None  # None: DeepSpeed builds it from its config
    kind: OptimizerKind
    description: str  # the log line ("optimizer: ...")


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


class SkipsConstructionStep:
    """An optimizer mixin: the zero-gradient step() that DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 at ZeRO-0) makes
    inside deepspeed.initialize to create the optimizer state (initialize_optimizer_states) is skipped.

    FusedLamb would apply it: weights decayed once and a step count of 1 before training. Our Lamb creates only its
    state there; with this mixin FusedLamb starts as ours does (its state is created, all zeros, at the first real
    step). The call is recognised by what it is: no state yet and every gradient zero (one host read, once)."""

    state: Any  # torch.optim.Optimizer's

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if not self.state and _all_gradients_zero(self.param_groups):  # type: ignore[attr-defined]
            return None
        return super().step(*args, **kwargs)  # type: ignore[misc]


def _all_gradients_zero(groups: list[dict[str, Any]]) -> bool:
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    return bool(grads) and not bool(torch.stack([g.detach().abs().amax().float() for g in grads]).any())


@functools.cache
def fused_lamb_class() -> Any:
    """DeepSpeed's FusedLamb with SkipsConstructionStep, under FusedLamb's own name (checkpoints record the
    optimizer's class name at ZeRO-0 fp32, where DeepSpeed adds no wrapper)."""
    from deepspeed.ops.lamb import FusedLamb

    return type("FusedLamb", (SkipsConstructionStep, FusedLamb), {"__module__": __name__})


def select_optimizer(model: nn.Module, config: EngineConfig, allow_fused: bool = True) -> OptimizerChoice:
    """The optimizer for `config`: LAMB (`build_lamb`) for type Lamb; else none, DeepSpeed builds the config's own
    from `config.deepspeed`."""
    if config.lamb is not None:
        return build_lamb(model, config.lamb, config.zero_stage, allow_fused)
    if config.optimizer_type is None:
        return OptimizerChoice(None, OptimizerKind.FROM_CONFIG, "optimizer: none in the DeepSpeed config")
    return OptimizerChoice(
        None, OptimizerKind.FROM_CONFIG, f"optimizer: DeepSpeed's {config.optimizer_type} from the config"
    )


def build_lamb(model: nn.Module, lamb: LambSettings, zero_stage: int, allow_fused: bool = True) -> OptimizerChoice:
    """LAMB on `lamb_param_groups` (LayerNorms and biases excluded from decay and adaptation): DeepSpeed's FusedLamb on
    CUDA at ZeRO-0 without bias correction (with min_coeff = max_coeff = 1 in the no-decay group, which turns
    adaptation off there), unless `allow_fused` is False, and our `Lamb` everywhere else; the log line says why
    FusedLamb is not used (fused_lamb_unavailable)."""
    why = fused_lamb_unavailable(zero_stage, lamb, allow_fused)
    if why is None:
        # FusedLamb JIT-builds its CUDA kernel in __init__; without a matching CUDA toolkit (nvcc, headers) on the
        # node the build fails. That must not stop a run that our LAMB can do as well: fall back and say why.
        try:
            return OptimizerChoice(
                fused_lamb_class()(
                    fused_lamb_param_groups(model, lamb.weight_decay), weight_decay=lamb.weight_decay, **lamb.params
                ),
                OptimizerKind.FUSED_LAMB,
                "optimizer: DeepSpeed FusedLamb (CUDA, ZeRO-0, per-parameter trust ratios)",
            )
        except Exception as e:  # noqa: BLE001 - any build or load failure (MissingCUDAException, compiler errors, ...)
            why = f"its JIT build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else 'no message'})"
            log.warning("DeepSpeed FusedLamb could not be built, using our LAMB: %s", why)

    where = f"ZeRO-{zero_stage} partitions" if zero_stage > 0 else "ZeRO-0, whole tensors"
    return OptimizerChoice(
        Lamb(lamb_param_groups(model, lamb.weight_decay), weight_decay=lamb.weight_decay, **lamb.params),
        OptimizerKind.OUR_LAMB,
        f"optimizer: our multi-tensor LAMB ({where}, per-parameter trust ratios); DeepSpeed FusedLamb off: {why}",
    )


def fused_lamb_unavailable(zero_stage: int, lamb: LambSettings, allow_fused: bool) -> str | None:
    """Why DeepSpeed's FusedLamb is not used for these settings, or None when it is."""
    if not allow_fused:
        return "switched off"
    if not _cuda_fused_lamb_available():
        return "no CUDA"
    if zero_stage != 0:  # DeepSpeed hands a client optimizer flat partitions at ZeRO 1-3
        return f"it would see ZeRO-{zero_stage} flat partitions, not whole parameters"
    if lamb.bias_correction:
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
    lamb: Lamb = optimizer
    wrapper = engine.optimizer
    if wrapper is lamb:
        return
    if getattr(wrapper, "optimizer", None) is not lamb:
        raise TypeError(f"{type(wrapper).__name__} does not wrap this Lamb")

    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        described = _attach_stage3(wrapper, lamb)
    elif isinstance(wrapper, DeepSpeedZeroOptimizer):
        described = _attach_stage_1_2(wrapper, lamb)
    elif isinstance(wrapper, BF16_Optimizer):
        described = _attach_bf16(wrapper, lamb)
    elif isinstance(wrapper, FP16_UnfusedOptimizer):
        for fp32_group in wrapper.fp32_groups:
            lamb.register_whole(fp32_group)
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
