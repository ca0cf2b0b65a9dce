"""`python tests/helpers/state_dump.py ALBERT-PRETRAIN-ARGS... --dump DIR`: albert-pretrain that also writes, from the
outside, the training state it saves and the one it resumes with, per parameter and by DeepSpeed's own getters:

    DIR/saved-step<N>.pt    just before each checkpoint of step N is written
    DIR/loaded-step<N>.pt   right after setup() resumed at step N

Each file (written by rank 0): {"params": {name: {"fp32", "exp_avg", "exp_avg_sq"}}, "lamb_step", "global_steps",
"global_samples", "lr", "loss_scale": {...} or None, "wrapper"}. The getters are DeepSpeed's
`safe_get_full_fp32_param` / `safe_get_full_optimizer_state` at ZeRO 1-3 (collectives: every rank calls them) and the
tensors themselves at ZeRO-0, so the comparison does not go through pipeline.reshard's reader.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import checkpoint, pretrain

MOMENTS = ("exp_avg", "exp_avg_sq")


def live_state(engine) -> dict:
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    wrapper, optimizer = engine.optimizer, engine.basic_optimizer
    masters = {}
    if isinstance(wrapper, FP16_UnfusedOptimizer):  # bf16/fp16 at ZeRO-0: one fp32 master per parameter
        for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups):
            masters.update({id(p): m for p, m in zip(lows, highs)})
    zero0 = wrapper is optimizer or isinstance(wrapper, FP16_UnfusedOptimizer)
    if hasattr(wrapper, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 and BF16_Optimizer link each parameter's fragment to the optimizer's state once, after the first
        # group's first step: groups whose state did not exist yet stay unlinked. Link again, now that all exist.
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    params = {}
    for name, p in engine.module.named_parameters():
        if zero0:
            t = masters.get(id(p), p)
            st = optimizer.state[t]
            params[name] = {"fp32": t.detach().float().clone(), **{k: st[k].detach().float().clone() for k in MOMENTS}}
        else:
            params[name] = {
                "fp32": safe_get_full_fp32_param(p).float().clone(),
                **{k: safe_get_full_optimizer_state(p, k).float().clone() for k in MOMENTS},
            }
    scaler = getattr(wrapper, "loss_scaler", None) or wrapper
    fields = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
    return {
        "params": params,
        "lamb_step": sorted({int(s["step"]) for s in optimizer.state.values() if "step" in s}),
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "lr": [g["lr"] for g in optimizer.param_groups],
        "loss_scale": {k: getattr(scaler, k) for k in fields if hasattr(scaler, k)},
        "wrapper": type(wrapper).__name__,
    }


def dump(engine, path: Path) -> None:
    state = live_state(engine)
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)


def main() -> int:
    argv = sys.argv[1:]
    i = argv.index("--dump")
    dump_dir = Path(argv[i + 1])
    del argv[i : i + 2]
    real_setup, real_save = pretrain.setup, checkpoint.save

    def setup(args):
        run = real_setup(args)
        if run.resumed:
            dump(run.engine, dump_dir / f"loaded-step{run.engine.global_steps}.pt")
        return run

    def save(engine, folder, step, *a, **k):
        dump(engine, dump_dir / f"saved-step{step}.pt")
        return real_save(engine, folder, step, *a, **k)

    pretrain.setup, checkpoint.save = setup, save
    return pretrain.main(argv)


if __name__ == "__main__":
    sys.exit(main())
