"""The small measurements behind the profile notes of docs/performance.md, in one run, on CPU.

1. Where a training step of albert-tiny (bf16 autocast, batch 8 x 128, our LAMB) spends its time, from
   torch.profiler, grouped: matmuls, LAMB, softmax/log-softmax, gelu, dtype copies, the rest.
2. Accuracy over bf16 MLM logits [160, 30000]: argmax vs max().indices (the same first-index result).
3. gelu_new's tanh against sigmoid and the erf gelu, per million bf16 values; compiled gelu_new through tanh and
   through sigmoid (the fused path's form on CPU).
4. Our LAMB's step on one flat ZeRO-style partition of 17M elements in 30 parameter segments.
5. albert-tiny forward + backward with bf16 weights (as DeepSpeed's bf16 mode runs them), batch 8 x 128,
   vocabulary 8,000 (the demo's): plain vs compiled (pipeline/fused.py), fastest step of alternating runs, and
   from the profiler the time per step in matmuls and in everything else (the compiled kernels included).
6. pipeline/malloc.py: forward + backward of albert-tiny and albert-base (bf16 weights, as DeepSpeed's bf16
   mode runs them, batch 8 x 128) with glibc's malloc defaults and with our settings, in alternating child
   processes: the fastest step and the minor page faults per step.

Example:
    python bench/bench_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
from functools import partial

import torch
import torch.nn.functional as F
from harness import CPU, make_batch, time_step, time_steps, train_step

from pipeline.fused import gelu_tanh_by_sigmoid
from pipeline.lamb import FlatLayout, Lamb, lamb_param_groups
from pipeline.malloc import malloc_tuning_unavailable, tune_malloc
from pipeline.model import AlbertConfig, AlbertForPreTraining

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
PROFILED_STEPS = 3


def best_ms(fn, reps: int = 10) -> float:
    """The fastest of `reps` calls after one untimed call, in ms."""
    return 1000 * time_step(fn, 1, reps).fastest


def profile_ops(step) -> list:
    """The profiler's per-op totals over PROFILED_STEPS calls of `step` (CPU time in us)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
    return prof.key_averages()


def step_profile() -> None:
    cfg = AlbertConfig.from_name_or_path("albert-tiny")
    torch.manual_seed(0)
    model = AlbertForPreTraining(cfg).train()
    opt = Lamb(lamb_param_groups(model, 0.01), lr=1e-4)
    batch = make_batch(cfg, 8, 128, 20)
    step = partial(train_step, model, opt, batch, CPU, torch.bfloat16)
    for _ in range(3):
        step()
    events = profile_ops(step)
    groups = {
        "matmuls": MATMUL_OPS,
        "softmax / log-softmax": ("softmax",),
        "gelu": ("gelu",),
        "dtype copies": ("aten::copy_",),
    }
    total = sum(e.self_cpu_time_total for e in events)
    lamb = next((e.cpu_time_total for e in events if e.key.startswith("Optimizer.step#Lamb")), 0)
    print(
        f"\n1. albert-tiny bf16 step (batch 8 x 128), share of CPU time ({total / PROFILED_STEPS / 1e3:.0f} ms a step):"
    )
    for name, keys in groups.items():
        share = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / total
        print(f"   {name:22s} {share:6.1%}")
    print(f"   {'LAMB step (inclusive)':22s} {lamb / total:6.1%}")


def fused_profile() -> None:
    import copy

    from pipeline.fused import PLAIN, FusedOptions, apply_fused

    cfg = AlbertConfig.from_name_or_path("albert-tiny")
    cfg.vocab_size = 8000
    torch.manual_seed(0)
    plain = AlbertForPreTraining(cfg).train().to(torch.bfloat16)
    fused = copy.deepcopy(plain)
    apply_fused(plain, PLAIN, CPU)
    apply_fused(fused, FusedOptions(compile="on"), CPU)
    batch = make_batch(cfg, 8, 128, 20)
    steps = {name: partial(train_step, m, None, batch, CPU) for name, m in (("plain", plain), ("compiled", fused))}
    times = time_steps(steps, 3, 10)  # warmup: compiling, then settling
    best = {name: 1000 * ts.fastest for name, ts in times.items()}
    print("\n5. albert-tiny forward + backward, bf16 weights, batch 8 x 128, vocabulary 8,000:")
    for name, step in steps.items():
        events = profile_ops(step)
        total = sum(e.self_cpu_time_total for e in events) / PROFILED_STEPS / 1e3
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / PROFILED_STEPS / 1e3
        print(
            f"   {name:8s} fastest step {best[name]:.1f} ms; profiled {total:.1f} ms a step: matmuls {matmul:.1f} ms "
            f"({matmul / total:.0%}), the rest {total - matmul:.1f} ms"
        )
    print(f"   compiled / plain: {best['plain'] / best['compiled']:.2f}x")


def malloc_child(config: str, tuned: bool, steps: int) -> None:
    """Section 6's measurement in this (fresh) process; prints 'ms faults_per_step'."""
    if tuned:
        tune_malloc()
    cfg = AlbertConfig.from_name_or_path(config)
    torch.manual_seed(0)
    model = AlbertForPreTraining(cfg).train().to(torch.bfloat16)
    batch = make_batch(cfg, 8, 128, 20)
    step = partial(train_step, model, None, batch, CPU)
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ms = best_ms(step, reps=steps)
    print(f"{ms:.1f} {(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (steps + 1):.0f}")


def malloc_compare(threads: int) -> None:
    reason = malloc_tuning_unavailable()
    if reason:
        print(f"\n6. malloc: not measured ({reason})")
        return
    print(
        "\n6. forward + backward, bf16 weights, batch 8 x 128; glibc defaults vs pipeline/malloc.py, alternating fresh processes;"
    )
    print("   per mode: the median over processes of each one's fastest step [range], page faults per step (median):")
    for config, steps, processes in (("albert-tiny", 15, 5), ("albert-base", 4, 3)):
        runs: dict[str, list[tuple[float, float]]] = {"defaults": [], "tuned": []}
        for _ in range(processes):
            for mode in runs:
                cmd = [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(threads),
                    "--malloc-child",
                    f"{config}:{mode}:{steps}",
                ]
                ms, faults = map(
                    float, subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-2:]
                )
                runs[mode].append((ms, faults))
        med = {
            mode: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for mode, rs in runs.items()
        }
        cells = [
            f"{mode} {med[mode][0]:.1f} ms [{min(r[0] for r in rs):.1f}-{max(r[0] for r in rs):.1f}], {med[mode][1]:.0f} faults"
            for mode, rs in runs.items()
        ]
        print(f"   {config}: {'; '.join(cells)} ({med['defaults'][0] / med['tuned'][0]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--malloc-child", default=None, help=argparse.SUPPRESS
    )  # CONFIG:defaults|tuned:STEPS (section 6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.malloc_child:
        config, mode, steps = args.malloc_child.split(":")
        return malloc_child(config, mode == "tuned", int(steps))
    print(f"CPU, {args.threads} thread(s); sections 1-5: {tune_malloc()}")
    step_profile()

    logits = torch.randn(160, 30000).bfloat16()
    argmax, max_idx = best_ms(lambda: logits.argmax(-1)), best_ms(lambda: logits.max(-1).indices)
    assert torch.equal(logits.argmax(-1), logits.max(-1).indices)
    print(
        f"\n2. bf16 logits [160, 30000]: argmax {argmax:.2f} ms, max().indices {max_idx:.2f} ms ({argmax / max_idx:.1f}x)"
    )

    x = torch.randn(1 << 20).bfloat16()
    print(
        "\n3. per million bf16 values: "
        + ", ".join(
            f"{name} {best_ms(fn):.2f} ms"
            for name, fn in (
                ("gelu tanh (gelu_new)", lambda: F.gelu(x, approximate="tanh")),
                ("gelu erf", lambda: F.gelu(x)),
                ("tanh", lambda: torch.tanh(x)),
                ("sigmoid", lambda: torch.sigmoid(x)),
            )
        )
    )
    compiled = {}
    for name, act in (
        ("through tanh", partial(F.gelu, approximate="tanh")),
        ("through sigmoid (pipeline/fused.py)", gelu_tanh_by_sigmoid),
    ):
        y, bias, grad = (
            x.view(1024, 1024).clone().requires_grad_(),
            torch.zeros(1024, dtype=torch.bfloat16),
            torch.ones(1024, 1024).bfloat16(),
        )
        fn = torch.compile(lambda y=y, act=act, bias=bias, grad=grad: act(y + bias).backward(grad), dynamic=False)
        compiled[name] = best_ms(fn, reps=20)
    print(
        "   compiled gelu_new (bias + gelu, forward + backward): "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in compiled.items())
    )

    generator = torch.Generator().manual_seed(1)
    numels = torch.randint(1000, 1_000_000, (30,), generator=generator).tolist()
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    flat = torch.randn(sum(numels), generator=generator)
    flat.grad = torch.randn(flat.numel(), generator=generator)
    opt = Lamb([{"params": [flat], "weight_decay": 0.01, "adapt": True}], lr=1e-3, bias_correction=False)
    opt.register_flat(flat, FlatLayout.contiguous(numels, offsets, 0, flat.numel()))
    print(
        f"\n4. our LAMB step on one flat partition of {flat.numel() / 1e6:.0f}M elements in {len(numels)} "
        f"segments: {best_ms(opt.step, reps=5):.0f} ms"
    )
    fused_profile()
    malloc_compare(args.threads)


if __name__ == "__main__":
    main()
