"""LAMB that stays LAMB under DeepSpeed ZeRO.

LAMB scales each parameter tensor's Adam-style update by its own trust ratio
||w|| / ||update||. Under ZeRO 1-3 (and DeepSpeed's BF16 optimizer) a client optimizer does not
see parameter tensors but flat fp32 partitions: several parameters concatenated, parameters cut
at partition borders, alignment padding in between. A per-tensor LAMB then computes one ratio
per partition. `attach_zero_partitions` tells our `Lamb` where each parameter's pieces lie in
each flat tensor; `Lamb.step` sums squares per piece, adds the pieces of one parameter across
the data-parallel ranks (one small all-reduce per step call) and applies per-parameter ratios.

Usage (the engine's side):

    optimizer, ds_config, description = select_optimizer(model, ds_config)
    log.info(description)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, ...)
    attach_zero_partitions(engine, optimizer)

Math (per parameter tensor; the LAMB paper's algorithm):
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * w     (no correction if bias_correction=False)
    r = clamp(||w|| / ||u||, min_coeff, max_coeff), 1 when either norm is 0; r = 1 where adapt=False
    w -= lr * r * u
ALBERT's own LAMB (google-research/albert lamb_optimizer.py) has no bias correction and no clamp;
the shipped configs set bias_correction false. DeepSpeed's CUDA FusedLamb, with bias_correction
true, does not correct the moments but multiplies the step by sqrt(1 - b2^t) / (1 - b1^t) after
the trust ratio (0.15-0.98 over the first ~3,000 steps: a hidden learning-rate ramp, since the
trust ratio cancels a correction of the moments); without bias correction the two agree to rounding
(bench/gpu_check.py checks it). So FusedLamb is only chosen where it computes this same update.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

# FusedLamb's keyword arguments that a DeepSpeed config may carry under "optimizer.params".
FUSED_LAMB_PARAMS = frozenset(
    {"lr", "bias_correction", "betas", "eps", "weight_decay", "max_grad_norm", "max_coeff", "min_coeff"})


@dataclass(frozen=True)
class FlatLayout:
    """Where the parameters of one group lie inside one flat tensor.

    The flat tensor is cut into consecutive segments; segment k has `lengths[k]` elements and
    belongs to parameter slot `slots[k]` (the parameter's index in its group, the same on every
    rank), or to slot `num_params` for padding. Other pieces of the same parameters live on the
    other ranks of `group`; `group=None` means the flat tensor holds every piece.
    """

    lengths: torch.Tensor  # int64 [segments]
    slots: torch.Tensor  # int64 [segments]
    num_params: int
    group: Any = None  # torch ProcessGroup, or None when nothing is held elsewhere

    @property
    def numel(self) -> int:
        return int(self.lengths.sum())

    @functools.cached_property
    def sizes(self) -> list[int]:
        """Segment lengths as ints, for Tensor.split (computed once per layout)."""
        return self.lengths.tolist()

    @classmethod
    def from_segments(cls, segments: Sequence[tuple[int, int]], num_params: int, group: Any = None) -> FlatLayout:
        """From (length, slot) pairs in flat order; empty segments are dropped, neighbours of one slot merged."""
        merged: list[list[int]] = []
        for length, slot in segments:
            if length <= 0:
                continue
            if merged and merged[-1][1] == slot:
                merged[-1][0] += length
            else:
                merged.append([length, slot])
        if not merged:
            raise ValueError("a flat tensor must have at least one element")
        lengths, slots = zip(*merged)
        return cls(torch.tensor(lengths, dtype=torch.long), torch.tensor(slots, dtype=torch.long), num_params, group)

    @classmethod
    def contiguous(cls, numels: Sequence[int], offsets: Sequence[int], start: int, size: int,
                   group: Any = None) -> FlatLayout:
        """The window [start, start + size) of a buffer where parameter j occupies
        [offsets[j], offsets[j] + numels[j]) and everything else is padding (ZeRO 1/2, BF16 optimizer)."""
        padding = len(numels)
        segments: list[tuple[int, int]] = []
        cursor = start
        for slot, (offset, numel) in enumerate(zip(offsets, numels, strict=True)):
            lo, hi = max(offset, start), min(offset + numel, start + size)
            if lo >= hi:
                continue
            segments += [(lo - cursor, padding), (hi - lo, slot)]
            cursor = hi
        segments.append((start + size - cursor, padding))
        return cls.from_segments(segments, padding, group)

    @classmethod
    def per_parameter_shards(cls, numels: Sequence[int], shard_numels: Sequence[int], rank: int,
                             group: Any = None) -> FlatLayout:
        """ZeRO-3: every parameter is cut into equal shards (the last one zero-padded) and this rank's
        shards are concatenated; shard j holds elements [rank * shard, (rank + 1) * shard) of parameter j."""
        padding = len(numels)
        segments: list[tuple[int, int]] = []
        for slot, (numel, shard) in enumerate(zip(numels, shard_numels, strict=True)):
            real = min(shard, max(0, numel - rank * shard))
            segments += [(real, slot), (shard - real, padding)]
        return cls.from_segments(segments, padding, group)


def _is_no_decay(module: nn.Module, name: str) -> bool:
    """LayerNorm parameters and every bias are excluded from weight decay and adaptation."""
    is_norm = isinstance(module, nn.LayerNorm) or "layernorm" in type(module).__name__.lower()
    return is_norm or name.endswith("bias")


def lamb_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[decay group (adapted), no-decay group: LayerNorm weights and all biases (not adapted)].

    Shared (tied) parameters appear once; frozen parameters and empty groups are left out.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if _is_no_decay(module, name) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "adapt": True},
        {"params": no_decay, "weight_decay": 0.0, "adapt": False},
    ]
    return [g for g in groups if g["params"]]


def _trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, min_coeff: float, max_coeff: float) -> torch.Tensor:
    ratio = (w_norm / u_norm).clamp(min_coeff, max_coeff)
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


class Lamb(torch.optim.Optimizer):
    """Multi-tensor LAMB (torch `_foreach` ops) with per-parameter trust ratios, also on ZeRO flat partitions.

    Param groups may carry "adapt" (default True): False gives ratio 1 (plain Adam-style update).
    State per tensor: exp_avg, exp_avg_sq, step (int), kept in `self.state` so DeepSpeed checkpoints
    save and restore it. The learning rate is read from the param group at every step, so
    DeepSpeed's LR schedulers apply.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 max_coeff: float = 10.0, min_coeff: float = 0.01) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not 0.0 <= min_coeff <= max_coeff:
            raise ValueError(f"need 0 <= min_coeff <= max_coeff, got {min_coeff}, {max_coeff}")
        # Tensors that are whole parameters; any other tensor step() sees needs a FlatLayout.
        # Set before super().__init__, which calls add_param_group.
        self._whole: set[int] = set()
        self._layouts: dict[int, tuple[torch.Tensor, FlatLayout]] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff, adapt=True)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._whole.update(id(p) for p in self.param_groups[-1]["params"])

    def register_whole(self, tensors: Iterable[torch.Tensor]) -> None:
        """Declare tensors that each hold one whole parameter (e.g. fp32 master copies)."""
        self._whole.update(id(t) for t in tensors)

    def register_flat(self, tensor: torch.Tensor, layout: FlatLayout) -> None:
        """Declare a flat tensor the wrapper will hand to step(), with its parameter segments."""
        if layout.numel != tensor.numel():
            raise ValueError(f"layout covers {layout.numel} elements, the flat tensor has {tensor.numel()}")
        on_device = replace(layout, lengths=layout.lengths.to(tensor.device), slots=layout.slots.to(tensor.device))
        self._layouts[id(tensor)] = (tensor, on_device)  # holding the tensor keeps its id unique

    def layout_of(self, tensor: torch.Tensor) -> FlatLayout | None:
        entry = self._layouts.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        whole: list[torch.Tensor] = []
        flat: list[tuple[torch.Tensor, FlatLayout]] = []
        for p in group["params"]:
            layout = self.layout_of(p)
            if layout is not None:
                flat.append((p, layout))
            elif id(p) in self._whole:
                if p.grad is not None:
                    whole.append(p)
            elif not self.state[p] and p.grad is not None and not p.grad.any():
                # DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 at ZeRO-0) calls step() with zero gradients
                # inside deepspeed.initialize to create the state; a real step there would decay the
                # weights and count a step, so only the state is created.
                self._init_state(p)
            else:
                raise RuntimeError(
                    f"LAMB got a tensor of shape {tuple(p.shape)} that is neither one of its parameters nor a "
                    "registered flat partition: call attach_zero_partitions(engine, optimizer) after "
                    "deepspeed.initialize, or the trust ratios would be computed per partition")
        # Flat tensors without gradients still join the all-reduce in _scale_flat, so ranks stay in step.
        flat_with_grad = [p for p, _ in flat if p.grad is not None]
        params = whole + flat_with_grad
        updates = self._adam_updates(group, params) if params else []
        if group["adapt"]:
            n = len(whole)
            if whole:
                torch._foreach_mul_(updates[:n], self._whole_ratios(group, whole, updates[:n]))
            if flat:
                self._scale_flat(group, flat, dict(zip(map(id, flat_with_grad), updates[n:], strict=True)))
        if params:
            torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _adam_updates(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Advance the moments and return the unscaled updates m_hat / (sqrt(v_hat) + eps) + wd * w.

        Each foreach call is a pass over all the optimizer's memory, so the bias correction is folded into
        two per-tensor scalars: m_hat / (sqrt(v_hat) + eps) = (c2 / c1) * m / (sqrt(v) + eps * c2), with
        c1 = 1 - b1^t and c2 = sqrt(1 - b2^t); without it, those passes are skipped."""
        beta1, beta2 = group["betas"]
        corrected = group["bias_correction"]
        grads, exp_avgs, exp_avg_sqs, eps, scale = [], [], [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("LAMB does not support sparse gradients")
            state = self.state[p] or self._init_state(p)
            state["step"] += 1
            step = int(state["step"])
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if corrected:
                c1, c2 = 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5
                eps.append(group["eps"] * c2)
                scale.append(c2 / c1)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m += (1 - b1) (g - m): one pass
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps if corrected else group["eps"])
        updates = torch._foreach_div(exp_avgs, denom)
        if corrected:
            torch._foreach_mul_(updates, scale)
        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        return updates

    @staticmethod
    def _whole_ratios(group: dict[str, Any], params: list[torch.Tensor],
                      updates: list[torch.Tensor]) -> list[torch.Tensor]:
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(updates))
        return list(_trust_ratio(w_norm, u_norm, group["min_coeff"], group["max_coeff"]).unbind())

    def _scale_flat(self, group: dict[str, Any], flat: list[tuple[torch.Tensor, FlatLayout]],
                    updates: dict[int, torch.Tensor]) -> None:
        """Scale each flat update by per-parameter ratios, norms summed over segments and ranks."""
        # Per segment (views into the flat tensors: no full-size temporaries), one pass each for w and u.
        sums = []  # [2, num_params] per flat tensor: squared norms of w and u, this rank's pieces
        for p, layout in flat:
            u = updates.get(id(p))
            w_sq = torch.stack(torch._foreach_norm(p.split(layout.sizes))).square()
            u_sq = torch.stack(torch._foreach_norm(u.split(layout.sizes))).square() if u is not None \
                else torch.zeros_like(w_sq)
            per_slot = torch.zeros(2, layout.num_params + 1, dtype=w_sq.dtype, device=p.device)
            per_slot.index_add_(1, layout.slots, torch.stack([w_sq, u_sq]))
            sums.append(per_slot[:, :layout.num_params])
        self._all_reduce_by_group(sums, [layout.group for _, layout in flat])
        for (p, layout), sq in zip(flat, sums, strict=True):
            u = updates.get(id(p))
            if u is None:
                continue
            ratio = _trust_ratio(sq[0].sqrt(), sq[1].sqrt(), group["min_coeff"], group["max_coeff"])
            ratio = torch.cat([ratio, ratio.new_ones(1)])  # padding slot
            scales = ratio[layout.slots]
            # Python floats are the fast path on the CPU; on a GPU reading them would be a host sync every step,
            # so there the 0-dim tensors go to the kernels as they are.
            torch._foreach_mul_(list(u.split(layout.sizes)), scales.tolist() if scales.is_cpu else list(scales.unbind()))

    @staticmethod
    def _all_reduce_by_group(sums: list[torch.Tensor], groups: list[Any]) -> None:
        """One all-reduce per distinct process group, in first-seen order (identical on every rank)."""
        order: list[Any] = []
        for g in groups:
            if g is not None and not any(g is o for o in order):
                order.append(g)
        for g in order:
            if dist.get_world_size(group=g) == 1:
                continue
            members = [i for i, gi in enumerate(groups) if gi is g]
            packed = torch.cat([sums[i].reshape(-1) for i in members])
            if dist.get_backend(g) == "nccl" and not packed.is_cuda:  # ZeRO-Offload keeps partitions on the CPU
                packed = packed.cuda()
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=g)
            packed = packed.to(sums[members[0]].device)
            for i, chunk in zip(members, packed.split([sums[i].numel() for i in members]), strict=True):
                sums[i].copy_(chunk.view_as(sums[i]))


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


def select_optimizer(model: nn.Module, ds_config: dict[str, Any], allow_fused: bool = True
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
            return FusedLamb(fused_lamb_param_groups(model, weight_decay), weight_decay=weight_decay, **params), config, \
                "optimizer: DeepSpeed FusedLamb (CUDA, ZeRO-0, per-parameter trust ratios)"
        except Exception as e:  # noqa: BLE001 - any build or load failure (MissingCUDAException, compiler errors, ...)
            why = f"its JIT build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else 'no message'})"
            log.warning("DeepSpeed FusedLamb could not be built, using our LAMB: %s", why)

    if stage > 0:
        config["zero_allow_untested_optimizer"] = True
        where = f"ZeRO-{stage} partitions"
    else:
        where = "ZeRO-0, whole tensors"
    return Lamb(lamb_param_groups(model, weight_decay), weight_decay=weight_decay, **params), config, \
        f"optimizer: our multi-tensor LAMB ({where}, per-parameter trust ratios); DeepSpeed FusedLamb off: {why}"


def fused_lamb_unavailable(config: dict[str, Any], params: dict[str, Any], allow_fused: bool) -> str | None:
    """Why DeepSpeed's FusedLamb is not used for this config, or None when it is."""
    if not allow_fused:
        return "switched off"
    if not _cuda_fused_lamb_available():
        return "no CUDA"
    if _zero_stage(config) != 0:  # DeepSpeed hands a client optimizer flat partitions at ZeRO 1-3
        return f"it would see ZeRO-{_zero_stage(config)} flat partitions, not whole parameters"
    if params.get("bias_correction", True):  # FusedLamb's own default is True
        return ("its bias correction is a step-size factor, not LAMB's corrected moments (set bias_correction false, "
                "as ALBERT and the shipped configs do, to use it)")
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
        layout = FlatLayout.per_parameter_shards([p.ds_numel for p in params], [p.partition_numel() for p in params],
                                                 dist.get_rank(group=group), group)
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
