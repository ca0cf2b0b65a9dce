"""LAMB with per-parameter trust ratios, also on flat partitions of many parameters (what DeepSpeed ZeRO hands
a client optimizer). The maths only: which parameter lies where in DeepSpeed's partitions, and when DeepSpeed's
FusedLamb is used instead, is `pipeline/lamb_deepspeed.py`.

LAMB scales each parameter tensor's Adam-style update by its own trust ratio ||w|| / ||update||. Under ZeRO 1-3 (and
DeepSpeed's BF16 optimizer) a client optimizer does not see parameter tensors but flat fp32 partitions: several
parameters concatenated, parameters cut at partition borders, alignment padding in between. A per-tensor LAMB then
computes one ratio per partition. A `FlatLayout` registered for a flat tensor says where each parameter's pieces
lie; `Lamb.step` sums squares per piece, adds the pieces of one parameter across the data-parallel ranks (one small
all-reduce per step call) and applies per-parameter ratios.

Math (per parameter tensor; the LAMB paper's algorithm):
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * w     (no correction if bias_correction=False)
    r = clamp(||w|| / ||u||, min_coeff, max_coeff), 1 when either norm is 0; r = 1 where adapt=False
    w -= lr * r * u
ALBERT's own LAMB (google-research/albert lamb_optimizer.py) has no bias correction and no clamp; the shipped
configs set bias_correction false.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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
    def contiguous(
        cls, numels: Sequence[int], offsets: Sequence[int], start: int, size: int, group: Any = None
    ) -> FlatLayout:
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
    def per_parameter_shards(
        cls, numels: Sequence[int], shard_numels: Sequence[int], rank: int, group: Any = None
    ) -> FlatLayout:
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


@dataclass(frozen=True)
class StepPart:
    """What one step() call applied to (part of) a parameter group."""

    group: int  # id() of the group
    step: int  # the optimizer step it was part of
    grad_sq: torch.Tensor  # sums of squares of the gradients: [whole parameters, flat partitions] (float64)
    ratios: torch.Tensor | None  # trust ratios (adapted groups)


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

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
    ) -> None:
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
        # What each step() call applied, for the metrics (on the device: read only when they are logged). A group's
        # tensors may come in several calls per optimizer step (DeepSpeed's ZeRO-1/2 hands one group at a time,
        # ZeRO-3 one sub-group), so the key is (the group, the tensors of the call).
        self._parts: dict[tuple[int, tuple[int, ...]], StepPart] = {}
        self._held_slots: dict[int, torch.Tensor] = {}  # id of a flat tensor -> the parameters it holds pieces of
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
            adapt=True,
        )
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
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group)
        return loss

    def _step_group(self, index: int, group: dict[str, Any]) -> None:
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
                    "deepspeed.initialize, or the trust ratios would be computed per partition"
                )
        # Flat tensors without gradients still join the all-reduce in _scale_flat, so ranks stay in step.
        flat_with_grad = [p for p, _ in flat if p.grad is not None]
        params = whole + flat_with_grad
        updates = self._adam_updates(group, params) if params else []
        n, ratios = len(whole), []
        if group["adapt"]:
            if whole:
                whole_ratios = self._whole_ratios(group, whole, updates[:n])
                torch._foreach_mul_(updates[:n], whole_ratios)
                ratios.append(torch.stack(whole_ratios))
            if flat:
                ratios += self._scale_flat(group, flat, dict(zip(map(id, flat_with_grad), updates[n:], strict=True)))
        if params:
            squares = torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])).double() ** 2
            stamp = int(self.state[params[0]]["step"])
            if any(part.step != stamp for part in self._parts.values()):
                self._parts.clear()  # the first call of an optimizer step (also after a reload to an earlier one)
            self._parts[(id(group), tuple(map(id, params)))] = StepPart(
                id(group),
                stamp,
                torch.stack([squares[:n].sum(), squares[n:].sum()]),
                torch.cat(ratios) if ratios else None,
            )
            torch._foreach_add_(params, updates, alpha=-group["lr"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._parts.clear()  # the groups are new dicts: the ids the parts were kept by may be reused

    def last_step(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per parameter group, what the last optimizer step applied on this rank: the sums of squares of the
        gradients [over whole parameters (the same on every rank), over flat partitions (this rank's share)] and
        the trust ratios of an adapted group (None otherwise, or where this rank holds none of it)."""
        out = []
        for group in self.param_groups:
            parts = [p for p in self._parts.values() if p.group == id(group)]
            squares = torch.stack([p.grad_sq for p in parts]).sum(0) if parts else torch.zeros(2, dtype=torch.float64)
            ratios = [p.ratios for p in parts if p.ratios is not None]
            out.append((squares, torch.cat(ratios) if ratios else None))
        return out

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
        grads: list[torch.Tensor] = []
        exp_avgs, exp_avg_sqs, eps, scale = [], [], [], []
        for p in params:
            grad = p.grad
            assert grad is not None  # the caller passes the parameters that have a gradient
            if grad.is_sparse:
                raise RuntimeError("LAMB does not support sparse gradients")
            state = self.state[p] or self._init_state(p)
            state["step"] += 1
            step = int(state["step"])
            grads.append(grad)
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
        updates = list(torch._foreach_div(exp_avgs, denom))
        if corrected:
            torch._foreach_mul_(updates, scale)
        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        return updates

    @staticmethod
    def _whole_ratios(
        group: dict[str, Any], params: list[torch.Tensor], updates: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(updates))
        return list(_trust_ratio(w_norm, u_norm, group["min_coeff"], group["max_coeff"]).unbind())

    def _scale_flat(
        self, group: dict[str, Any], flat: list[tuple[torch.Tensor, FlatLayout]], updates: dict[int, torch.Tensor]
    ) -> list[torch.Tensor]:
        """Scale each flat update by per-parameter ratios, norms summed over segments and ranks; returns the ratios
        of the parameters this rank holds a piece of."""
        # Per segment (views into the flat tensors: no full-size temporaries), one pass each for w and u.
        sums = []  # [2, num_params] per flat tensor: squared norms of w and u, this rank's pieces
        for p, layout in flat:
            u = updates.get(id(p))
            w_sq = torch.stack(torch._foreach_norm(p.split(layout.sizes))).square()
            u_sq = (
                torch.stack(torch._foreach_norm(u.split(layout.sizes))).square()
                if u is not None
                else torch.zeros_like(w_sq)
            )
            per_slot = torch.zeros(2, layout.num_params + 1, dtype=w_sq.dtype, device=p.device)
            per_slot.index_add_(1, layout.slots, torch.stack([w_sq, u_sq]))
            sums.append(per_slot[:, : layout.num_params])
        self._all_reduce_by_group(sums, [layout.group for _, layout in flat])
        held = []
        for (p, layout), sq in zip(flat, sums, strict=True):
            u = updates.get(id(p))
            if u is None:
                continue
            ratio = _trust_ratio(sq[0].sqrt(), sq[1].sqrt(), group["min_coeff"], group["max_coeff"])
            if id(p) not in self._held_slots:  # once (torch.unique waits for the device)
                self._held_slots[id(p)] = torch.unique(layout.slots[layout.slots < layout.num_params])
            held.append(ratio[self._held_slots[id(p)]])
            ratio = torch.cat([ratio, ratio.new_ones(1)])  # padding slot
            scales = ratio[layout.slots]
            # Python floats are the fast path on the CPU; on a GPU reading them would be a host sync every step,
            # so there the 0-dim tensors go to the kernels as they are.
            torch._foreach_mul_(
                list(u.split(layout.sizes)), scales.tolist() if scales.is_cpu else list(scales.unbind())
            )
        return held

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
