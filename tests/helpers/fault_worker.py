"""`python tests/helpers/fault_worker.py ALBERT-PRETRAIN-ARGS... --fault FAULT`: albert-pretrain with a fault injected from the
outside (`--fault FAULT` may stand anywhere; it is taken out before albert-pretrain parses the rest).

FAULT is one of:
- `nan-at-step:N`: the model's MLM loss becomes NaN in every micro-batch of optimizer step N (wraps the model's
  forward once setup() has built the engine), each time the run reaches step N;
- `nan-once-at-step:N`: the same, the first time only (a rolled-back run goes on);
- `spike-once-at-step:N:FACTOR`: the MLM loss of step N is FACTOR times larger, the first time only;
- `nan-from-step:N`: the MLM loss is NaN in every step from N on, until the run comes back to an earlier step (a
  rollback): with fp16, an overflow at every step, the loss scale halved down to its floor;
- `grad-inf-from-step:N`: the same with the loss finite and a gradient infinite (what most fp16 overflows are);
- `kill-before-complete`: rank 0 is killed with SIGKILL when a save has written every rank's files but not yet the
  completion marker (wraps the checkpoint module's JSON writer);
- `slow-steps:SECONDS`: every training micro-batch's forward takes SECONDS longer (a step long enough for a person's
  second Ctrl-C to arrive inside it).
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline import checkpoint, pretrain


def after_setup(attach) -> None:
    """`attach(run)` once setup() has built the run (its engine and model)."""
    real_setup = pretrain.setup

    def setup(args):
        run = real_setup(args)
        attach(run)
        return run

    pretrain.setup = setup


def from_step_until_rollback(run, step: int):
    """A check for each call in training: is this step N or later, the run not yet back at an earlier step?"""
    seen = {"last": 0, "over": False}

    def active() -> bool:
        now = run.engine.global_steps + 1
        seen["over"] |= now < seen["last"]  # back at an earlier step: rolled back
        seen["last"] = now
        return now >= step and not seen["over"]

    return active


def scale_loss_at_step(step: int, factor: float, once: bool) -> None:
    def attach(run):
        model, forward = run.engine.module, run.engine.module.forward
        hits = [0]  # training forwards of step N so far: `once` poisons one step's worth (a rollback comes back)

        def poisoned(*a, **k):
            out = forward(*a, **k)
            if model.training and run.engine.global_steps + 1 == step:
                hits[0] += 1
                if not once or hits[0] <= run.config.engine.batch.accum:
                    out.mlm_loss = out.mlm_loss * factor
            return out

        model.forward = poisoned

    after_setup(attach)


def nan_from_step(step: int) -> None:
    def attach(run):
        model, forward = run.engine.module, run.engine.module.forward
        active = from_step_until_rollback(run, step)

        def poisoned(*a, **k):
            out = forward(*a, **k)
            if model.training and active():
                out.mlm_loss = out.mlm_loss * float("nan")
            return out

        model.forward = poisoned

    after_setup(attach)


def grad_inf_from_step(step: int) -> None:
    def attach(run):
        active = from_step_until_rollback(run, step)
        next(run.engine.module.parameters()).register_hook(lambda grad: grad * float("inf") if active() else grad)

    after_setup(attach)


def kill_before_complete() -> None:
    real_write = checkpoint._write_json

    def write(path, obj):
        if path.name == checkpoint.COMPLETE:
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, obj)

    checkpoint._write_json = write


def slow_steps(seconds: float) -> None:
    import time

    def attach(run):
        model, forward = run.engine.module, run.engine.module.forward

        def slow(*a, **k):
            if model.training:
                time.sleep(seconds)
            return forward(*a, **k)

        model.forward = slow

    after_setup(attach)


def main() -> int:
    argv = sys.argv[1:]
    i = argv.index("--fault")
    fault = argv[i + 1]
    del argv[i : i + 2]
    if fault.startswith("nan-at-step:"):
        scale_loss_at_step(int(fault.split(":", 1)[1]), float("nan"), once=False)
    elif fault.startswith("nan-once-at-step:"):
        scale_loss_at_step(int(fault.split(":", 1)[1]), float("nan"), once=True)
    elif fault.startswith("spike-once-at-step:"):
        _, step, factor = fault.split(":")
        scale_loss_at_step(int(step), float(factor), once=True)
    elif fault.startswith("nan-from-step:"):
        nan_from_step(int(fault.split(":", 1)[1]))
    elif fault.startswith("grad-inf-from-step:"):
        grad_inf_from_step(int(fault.split(":", 1)[1]))
    elif fault == "kill-before-complete":
        kill_before_complete()
    elif fault.startswith("slow-steps:"):
        slow_steps(float(fault.split(":", 1)[1]))
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    return pretrain.main(argv)


if __name__ == "__main__":
    sys.exit(main())
