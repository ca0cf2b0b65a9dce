"""Resume on another number of ranks or another ZeRO stage: a checkpoint's files -> one state per parameter -> an
engine of any layout.

DeepSpeed loads optimizer partitions only as they were saved, and its universal checkpoints neither read nor write
ZeRO-0 and do not cross ZeRO-1/2 <-> ZeRO-3. So the conversion is ours, in two halves:

- `read_checkpoint`: the files of any layout DeepSpeed 0.19 writes for our LAMB, read in one process on CPU, become a
  `TrainingState`: per parameter (by name, whole shape) the fp32 master weight and LAMB's two moments; LAMB's step;
  the engine's counters and LR schedule; the fp16 loss scale; the client state (the loader's position).
- `restore`: writes that state into an engine built as usual for this run: by hand at ZeRO-0 (the parameters, or
  FP16_UnfusedOptimizer's fp32 copies, and LAMB's per-tensor state); at ZeRO-1/2/3 and in BF16_Optimizer through
  DeepSpeed's per-parameter setters (`safe_set_full_fp32_param`, `safe_set_full_optimizer_state`) after LAMB's state
  for the flat partitions exists (ZeRO-1/2, BF16_Optimizer) or piece by piece (ZeRO-3), then the low-precision
  weights from the masters.

The layouts read (DeepSpeed 0.19.8; what each file holds, by key):
  ZeRO-0 fp32         mp_rank_00_model_states.pt: module = fp32 weights; optimizer = LAMB's state_dict, one entry per
                      parameter in LAMB's parameter-group order (no names: the order comes from `lamb_param_groups`)
  ZeRO-0 bf16/fp16    the same file; optimizer = FP16_UnfusedOptimizer's {fp32_groups (the masters),
                      optimizer_state_dict (LAMB's, per parameter), cur_scale, cur_iter, last_overflow_iter}
  ZeRO-1/2, BF16_Optimizer   (bf16_)zero_pp_rank_<r>_mp_rank_00_optim_states.pt per rank: optimizer_state_dict =
                      {single_partition_of_fp32_groups (rank r's flat piece of each group), base_optimizer_state (LAMB's,
                      one flat entry per group), param_slice_mappings (where each parameter's piece lies), loss_scaler}
  ZeRO-3              zero_pp_rank_<r>_mp_rank_00_optim_states.pt: optimizer_state_dict = {fp32_flat_groups,
                      optimizer_state_dict (LAMB's, one flat entry per sub-group), loss_scaler}; each parameter is cut
                      into `world` pieces of ceil(numel / world) (the last zero-padded), rank r's pieces back to back in
                      the order of param_shapes in zero_pp_rank_<r>_mp_rank_00_model_states.pt

Memory: every rank holds the whole fp32 state while restoring (12 bytes per parameter, plus the files, memory-mapped).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_rng

log = logging.getLogger("albert-pretrain")

MOMENTS = ("exp_avg", "exp_avg_sq")
FIELDS = ("fp32", *MOMENTS)  # per parameter: the master weight and LAMB's moments
LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class ReshardError(CheckpointError):
    """A checkpoint whose files this module cannot read; the message names the file."""


@dataclass
class TrainingState:
    """A checkpoint's training state, independent of ranks and ZeRO stage."""

    params: dict[str, dict[str, torch.Tensor]]  # name -> {"fp32", "exp_avg", "exp_avg_sq"}, whole shapes
    step: int  # LAMB's step count (bias correction)
    global_steps: int
    global_samples: int
    skipped_steps: int
    lr_scheduler: dict | None
    loss_scale: dict[str, float] | None  # LOSS_SCALE_FIELDS present in the checkpoint; None without fp16
    client: dict[str, Any]  # what albert-pretrain saved beside the engine (the loader's position)
    wrapper: str  # the DeepSpeed optimizer wrapper that wrote it


def _load(path: Path) -> dict:
    try:  # memory-mapped: only the tensors read are paged in. DeepSpeed pickles more than tensors in these files.
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling or I/O failure of one file
        raise ReshardError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _rank_of(path: Path) -> int:
    found = re.search(r"zero_pp_rank_(\d+)_", path.name)
    if found is None:
        raise ReshardError(f"{path}: not a rank's file (no zero_pp_rank_<r> in its name)")
    return int(found.group(1))


def _loss_scale(source: Any) -> dict[str, float]:
    """The loss scaler's fields from DeepSpeed's pickled LossScaler or FP16_UnfusedOptimizer's saved dict."""
    fields: dict[str, Any] = (
        source if isinstance(source, dict) else {k: getattr(source, k, None) for k in LOSS_SCALE_FIELDS}
    )
    return {k: fields[k] for k in LOSS_SCALE_FIELDS if fields.get(k) is not None}


def read_checkpoint(
    tag_dir: Path, names: list[list[str]] | None, shapes: dict[str, torch.Size], fp16: bool = False
) -> TrainingState:
    """Read a checkpoint folder (one tag) of any ranks and ZeRO stage. `names`: for a version-1 checkpoint (see
    pipeline.checkpoint.FORMAT_VERSION), the model's parameter names in LAMB's group order (`lamb_param_groups`), used
    where the files hold none; None: the checkpoint's own (saved by albert-pretrain from version 2 on). `shapes`: each
    parameter's shape; `fp16`: whether the checkpoint was written with fp16 (its loss scale is then carried)."""
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=_rank_of)
    if not model_files:
        raise ReshardError(f"{tag_dir}: no *model_states.pt: not a DeepSpeed checkpoint")
    states = _load(model_files[0])
    if optim_files:
        params, step, wrapper, scale = _read_partitions(tag_dir, model_files, optim_files, states)
    else:  # ZeRO-0's optimizer state is by position: the names say which parameter each entry is
        order: list[list[str]] | None = states.get("lamb_param_names") or names
        if order is None:
            raise ReshardError(f"{model_files[0]}: no lamb_param_names (the ZeRO-0 optimizer state cannot be named)")
        params, step, wrapper, scale = _read_zero0(model_files[0], states, order, shapes)
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise ReshardError(f"{tag_dir}: no state for parameter(s) {', '.join(missing[:5])} (another model?)")
    for name, d in params.items():
        if name in shapes and d["fp32"].shape != shapes[name]:
            raise ReshardError(f"{tag_dir}: {name} has shape {tuple(d['fp32'].shape)}, the model {tuple(shapes[name])}")
    client = {k: v for k, v in states.items() if k in ("loader", "lamb_param_names", "anomaly")}
    return TrainingState(
        params=params,
        step=step,
        global_steps=int(states["global_steps"]),
        global_samples=int(states.get("global_samples", 0)),
        skipped_steps=int(states.get("skipped_steps", 0)),
        lr_scheduler=states.get("lr_scheduler"),
        loss_scale=scale if fp16 else None,
        client=client,
        wrapper=wrapper,
    )


def _whole(value: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    return torch.zeros(shape) if value is None else value.float().reshape(shape).clone()


def _read_zero0(path: Path, states: dict, names: list[list[str]], shapes: dict) -> tuple:
    opt = states.get("optimizer")
    if not isinstance(opt, dict):
        raise ReshardError(f"{path}: no optimizer state (saved without it?)")
    order = [n for group in names for n in group]
    if "fp32_groups" in opt:  # FP16_UnfusedOptimizer: bf16/fp16 at ZeRO-0
        wrapper, lamb, masters = (
            "FP16_UnfusedOptimizer",
            opt["optimizer_state_dict"],
            [t for g in opt["fp32_groups"] for t in g],
        )
        scale = _loss_scale(opt)
    else:  # the optimizer itself (our LAMB, or DeepSpeed's FusedLamb), fp32 weights in the module
        wrapper, lamb, scale = "none (ZeRO-0)", opt, None
        module = states["module"]
        masters = [module[n] for n in order]
    if len(masters) != len(order):
        raise ReshardError(f"{path}: {len(masters)} parameters in the optimizer state, the model has {len(order)}")
    params, steps = {}, set[int]()
    for i, name in enumerate(order):
        st = lamb["state"].get(i, {})
        params[name] = {"fp32": _whole(masters[i], shapes[name])}
        params[name].update({k: _whole(st.get(k), shapes[name]) for k in MOMENTS})
        if "step" in st:
            steps.add(int(st["step"]))
    return params, _one_step(steps, path), wrapper, scale


def _one_step(steps: set[int], where: Path) -> int:
    if len(steps) > 1:
        raise ReshardError(f"{where}: LAMB's step differs between tensors ({sorted(steps)})")
    return steps.pop() if steps else 0


def _read_partitions(tag_dir: Path, model_files: list[Path], optim_files: list[Path], states: dict) -> tuple:
    sds = [_load(f)["optimizer_state_dict"] for f in optim_files]
    world = len(sds)
    if [_rank_of(f) for f in optim_files] != list(range(world)):
        raise ReshardError(
            f"{tag_dir}: optimizer files of ranks {[_rank_of(f) for f in optim_files]}, not 0..{world - 1}"
        )
    for f, sd in zip(optim_files, sds):
        counts = sd.get("partition_count")
        counts = counts if isinstance(counts, list | tuple) else [counts]
        if any(c is not None and int(c) != world for c in counts):
            raise ReshardError(
                f"{f}: written as one of {counts[0]} partitions, but {tag_dir} holds {world} optimizer file(s): "
                "a rank's file is missing; resume from an earlier checkpoint (--resume PATH)"
            )
    scale = _loss_scale(sds[0]["loss_scaler"]) if sds[0].get("loss_scaler") is not None else None
    if int(sds[0].get("zero_stage", 0)) == 3:
        params, step = _read_zero3(tag_dir, model_files, sds)
        return params, step, "DeepSpeedZeroOptimizer_Stage3", scale
    wrapper = "DeepSpeedZeroOptimizer" if "zero_stage" in sds[0] else "BF16_Optimizer"
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: set[int] = set()
    for sd in sds:
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            flat = _flat_state(sd["single_partition_of_fp32_groups"][g], sd["base_optimizer_state"], g, steps)
            for name, where in mapping.items():
                d = pieces.setdefault(name, {k: [] for k in FIELDS})
                for k, t in flat.items():
                    d[k].append(t.narrow(0, where.start, where.numel))
    params = {}
    for group in states["param_shapes"]:
        for name, shape in group.items():
            params[name] = {k: torch.cat(v).float().reshape(shape).clone() for k, v in pieces[name].items()}
    return params, _one_step(steps, optim_files[0]), wrapper, scale


def _flat_state(fp32: torch.Tensor, lamb: dict, group: int, steps: set[int]) -> dict[str, torch.Tensor]:
    """A flat partition's master and moments (zero, step 0, where no optimizer step was applied yet: fp16 runs whose
    first steps all overflowed)."""
    st = lamb.get("state", {}).get(group, {})
    steps.add(int(st.get("step", 0)))
    return {"fp32": fp32, **{k: st[k] if k in st else torch.zeros(fp32.numel()) for k in MOMENTS}}


def _read_zero3(tag_dir: Path, model_files: list[Path], sds: list[dict]) -> tuple[dict, int]:
    world = len(sds)
    group_shapes = _load(next(f for f in model_files if _rank_of(f) == 0))["param_shapes"]
    params, steps = {}, set[int]()
    for g, shapes in enumerate(group_shapes):
        pieces: dict[str, dict[str, list[torch.Tensor]]] = {n: {k: [] for k in FIELDS} for n in shapes}
        for sd in sds:
            flat = _flat_state(sd["fp32_flat_groups"][g], sd["optimizer_state_dict"], g, steps)
            offset = 0
            for name, shape in shapes.items():
                part = math.ceil(math.prod(shape) / world)
                for k, t in flat.items():
                    pieces[name][k].append(t.narrow(0, offset, part))
                offset += part
            if offset != flat["fp32"].numel():
                raise ReshardError(
                    f"{tag_dir}: ZeRO-3 sub-group {g} holds {flat['fp32'].numel()} values per rank, the parameter "
                    f"shapes say {offset}"
                )
        for name, shape in shapes.items():
            numel = math.prod(shape)
            params[name] = {k: torch.cat(v)[:numel].float().reshape(shape).clone() for k, v in pieces[name].items()}
    return params, _one_step(steps, tag_dir)


# ------------------------------------------------------------------------------------------------ restore


def _flat_partitions(wrapper: Any) -> list[torch.Tensor] | None:
    """The tensors DeepSpeed's ZeRO-1/2/3 or BF16_Optimizer hands the optimizer (each gets one state entry)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        if hasattr(wrapper, attr):
            return list(getattr(wrapper, attr))
    return None


def _set_state(optimizer: torch.optim.Optimizer, tensor: torch.Tensor, step: int, **moments: torch.Tensor) -> None:
    """The optimizer's state for one tensor as its own step would have left it (LAMB and FusedLamb keep the same
    keys); moments zero unless given."""
    state: dict[str, Any] = {"step": step}
    for k in MOMENTS:
        value = moments.get(k)
        state[k] = torch.zeros_like(tensor) if value is None else value.to(tensor).reshape(tensor.shape).clone()
    optimizer.state[tensor] = state


def restore(engine: Any, state: TrainingState) -> None:
    """Collective: every rank calls it on an engine built for this run, before its first step."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    wrapper, optimizer = engine.optimizer, engine.basic_optimizer
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    params = state.params
    flat = _flat_partitions(wrapper)
    with torch.no_grad():
        if wrapper is optimizer:  # ZeRO-0 fp32: the optimizer steps the parameters themselves
            for group in optimizer.param_groups:
                for p in group["params"]:
                    d = params[name_of[id(p)]]
                    p.copy_(d["fp32"])
                    _set_state(optimizer, p, state.step, **{k: d[k] for k in MOMENTS})
        elif flat is None:  # FP16_UnfusedOptimizer (bf16/fp16 at ZeRO-0): one fp32 master per parameter
            for lows, masters in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
                for p, master in zip(lows, masters, strict=True):
                    d = params[name_of[id(p)]]
                    master.copy_(d["fp32"])
                    p.copy_(d["fp32"].to(p.dtype))
                    _set_state(optimizer, master, state.step, **{k: d[k] for k in MOMENTS})
        elif hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for t in flat:
                _set_state(optimizer, t, state.step)
            _restore_zero3(wrapper, optimizer, params, name_of)
        else:  # ZeRO-1/2, BF16_Optimizer
            # DeepSpeed links each parameter's fragment to the optimizer's state on its first step; the setters
            # need the state to exist (else they raise on the rank holding the fragment while the others wait).
            for t in flat:
                _set_state(optimizer, t, state.step)
            wrapper._lazy_init_hp_params_optimizer_state()
            for name, p in engine.module.named_parameters():
                d = params[name]
                safe_set_full_fp32_param(p, d["fp32"])
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, d[k], k)
            wrapper.update_lp_params()  # the module's weights from the masters (collective)
    engine.global_steps = state.global_steps
    engine.global_samples = state.global_samples
    engine.skipped_steps = state.skipped_steps
    if engine.lr_scheduler is not None and state.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state.lr_scheduler)
        for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_lr(), strict=True):
            group["lr"] = lr  # what the scheduler's last step set, as a same-layout load restores it
    if state.loss_scale:
        _restore_loss_scale(wrapper, state.loss_scale)


def _restore_zero3(wrapper: Any, optimizer: Any, params: dict, name_of: dict[int, str]) -> None:
    """ZeRO-3: each parameter's piece of this rank, written into the flat masters and moments. DeepSpeed's setters
    cannot do it: they read ceil(numel / world) values from rank x that far, past the end of a parameter whose size
    the ranks do not divide (a 2-value bias on 4 ranks). The last piece is zero-padded, as DeepSpeed pads it."""
    import torch.distributed as dist

    for i, group in enumerate(wrapper.fp16_groups):
        pg = wrapper.sub_group_process_groups[i]
        rank = dist.get_rank(group=dist.group.WORLD if pg is None else pg)
        master = wrapper.fp32_partitioned_groups_flat[i]
        targets = {"fp32": master, **{k: optimizer.state[master][k] for k in MOMENTS}}
        offset = 0
        for p in group:
            size = p.partition_numel()
            d = params[name_of[id(p)]]
            for key, dst in targets.items():
                piece = d[key].flatten()[rank * size : (rank + 1) * size]
                dst.narrow(0, offset, size).zero_()
                dst.narrow(0, offset, piece.numel()).copy_(piece)
            offset += size
        if offset != master.numel():
            raise ReshardError(f"ZeRO-3 sub-group {i}: {master.numel()} values on this rank, the parameters {offset}")
        low = wrapper.fp16_partitioned_groups_flat[i]
        if low is not None and low is not master:  # bf16/fp16: the module's partition from the master
            low.copy_(master)


def _restore_loss_scale(wrapper: Any, scale: dict[str, float]) -> None:
    """ZeRO-1/2/3 keep a LossScaler object, FP16_UnfusedOptimizer the same fields on itself."""
    target = getattr(wrapper, "loss_scaler", None) or wrapper
    for k, v in scale.items():
        if hasattr(target, k):
            setattr(target, k, v)


def lamb_names(module: torch.nn.Module) -> list[list[str]]:
    """The module's parameter names in LAMB's group order (the order of ZeRO-0's saved optimizer state)."""
    from .lamb import lamb_param_groups

    name_of = {id(p): n for n, p in module.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in lamb_param_groups(module, 0.0)]


def resume(engine: Any, tag_dir: Path, saved: str, here: str, fp16_both: bool, version: int) -> dict[str, Any]:
    """Collective: continue from a checkpoint of another layout (`saved`, `here`: as `describe_layout` words them;
    `version`: its format version). Returns the client state."""
    shapes = {n: getattr(p, "ds_shape", p.shape) for n, p in engine.module.named_parameters()}
    names = lamb_names(engine.module) if version == 1 else None
    state = read_checkpoint(tag_dir, names, shapes, fp16=fp16_both)
    restore(engine, state)
    if not load_rng(tag_dir):
        log.info("no random state saved for this rank in %s: dropout draws start from the seed", tag_dir)
    log.info(
        "resuming a %s checkpoint on %s: step %d, fp32 master weights and LAMB's moments of %d parameters carried "
        "over per parameter (%s -> %s)%s",
        saved,
        here,
        state.global_steps,
        len(state.params),
        state.wrapper,
        type(engine.optimizer).__name__,
        f", loss scale {state.loss_scale.get('cur_scale')}" if state.loss_scale else "",
    )
    return state.client
