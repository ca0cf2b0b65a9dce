"""Section 2 of bench/gpu_check.py: LAMB parity in fp32, DeepSpeed's FusedLamb against our Lamb.

Two copies of one model, the same batches, N steps: max |difference| of the parameters, the difference relative to
how far training moved them, loss curves side by side, PASS/FAIL against --parity-tol. Without CUDA FusedLamb is
replaced by FusedLambReference, a torch restatement of its kernel (checked against the kernel on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from gpu_check_common import (
    SHIPPED_DS_CONFIG,
    Budget,
    OptimizerFactory,
    Report,
    SectionSkipped,
    batches_on,
    our_lamb,
    shipped_lamb_params,
)
from harness import markdown_table, train_step

from pipeline.fused import PLAIN, apply_fused
from pipeline.lamb_deepspeed import fused_lamb_param_groups
from pipeline.model import AlbertConfig, AlbertForPreTraining

log = logging.getLogger("gpu_check.parity")

# Why --parity-tol defaults to 1e-5 (measured on CPU, 20 fp32 steps, albert-tiny 4 x 32 and albert-base 4 x 64):
PARITY_TOL_WHY = (
    "Tolerance: rounding alone (FusedLamb's rule restated in torch vs our Lamb, same math) gave 1-4e-7; "
    "real differences in the update gave 1e-4 to 4e-4 (weight decay 0.01 vs 0.02), 3e-2 (eps 1e-6 vs 1e-8) and "
    "0.4-0.5 (where the bias correction is applied), so 1e-5 sits 25x above the noise and 10x below the smallest of them."
)


class FusedLambReference(torch.optim.Optimizer):
    """DeepSpeed FusedLamb's CUDA kernel (csrc/lamb/fused_lamb_cuda_kernel.cu, eps outside the square
    root, the default) restated per tensor in torch, so that the parity check runs on CPU too:

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2              (moments never bias-corrected)
        u = m / (sqrt(v) + eps) + wd * w;  r = clamp(||w|| / ||u||, min_coeff, max_coeff), 1 if a norm is 0
        w -= s_t * r * u,  s_t = lr * sqrt(1 - b2^t) / (1 - b1^t) with bias_correction, else lr

    The bias correction scales the step after the trust ratio. Our Lamb corrects the moments before
    eps, weight decay and the ratio instead: the ratio cancels the correction's overall scale but not
    its weight against eps and weight decay, so no FusedLamb setting reproduces it.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
    ) -> None:
        defaults = {
            "lr": lr,
            "bias_correction": bias_correction,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "max_coeff": max_coeff,
            "min_coeff": min_coeff,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = m / (v.sqrt() + group["eps"]) + group["weight_decay"] * p
                w_norm, u_norm = p.norm(), u.norm()
                ratio = (
                    (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
                    if w_norm > 0 and u_norm > 0
                    else 1.0
                )
                step_size = (
                    group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t) if group["bias_correction"] else group["lr"]
                )
                p.sub_(step_size * ratio * u)


def fused_lamb_factory(params: dict[str, Any], cls: type | None = None) -> OptimizerFactory:
    """FusedLamb (or `cls`, e.g. FusedLambReference) on select_optimizer's groups, built directly: the parity
    check also compares settings (bias correction on) that select_optimizer would not give it."""

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        from deepspeed.ops.lamb import FusedLamb

        rest = {k: v for k, v in params.items() if k != "weight_decay"}
        return (cls or FusedLamb)(fused_lamb_param_groups(model, float(params.get("weight_decay", 0.0))), **rest)

    return make


@dataclass
class Parity:
    losses_a: list[float]
    losses_b: list[float]
    max_abs: float  # max over elements of |theta_a - theta_b|
    rel: float  # ||theta_a - theta_b|| / ||theta_a - theta_0||: the difference relative to how far training moved

    def agrees(self, tol: float) -> bool:
        finite = all(math.isfinite(x) for x in self.losses_a + self.losses_b)
        return finite and self.rel <= tol


def lamb_parity(
    cfg: AlbertConfig,
    make_a: OptimizerFactory,
    make_b: OptimizerFactory,
    batches: list[dict[str, torch.Tensor]],
    steps: int,
    device: torch.device,
    lr_factor_b: Callable[[int], float] | None = None,
    seed: int = 0,
) -> Parity:
    """Train two copies of one model (fp32, explicit attention: deterministic) on the same batches, cycled,
    with optimizers A and B; `lr_factor_b(t)` multiplies B's learning rate at step t (1-based)."""
    torch.manual_seed(seed)
    model_a = AlbertForPreTraining(cfg).to(device).train()
    apply_fused(model_a, PLAIN, device)
    model_b = copy.deepcopy(model_a)
    theta0 = torch.nn.utils.parameters_to_vector(model_a.parameters()).detach().clone()
    opt_a, opt_b = make_a(model_a), make_b(model_b)
    base_lr_b = [g["lr"] for g in opt_b.param_groups]
    losses: tuple[list[float], list[float]] = ([], [])
    for t in range(1, steps + 1):
        batch = batches[(t - 1) % len(batches)]
        if lr_factor_b is not None:
            for g, lr in zip(opt_b.param_groups, base_lr_b, strict=True):
                g["lr"] = lr * lr_factor_b(t)
        for model, opt, curve in ((model_a, opt_a, losses[0]), (model_b, opt_b, losses[1])):
            curve.append(float(train_step(model, opt, batch, device)))
    theta_a = torch.nn.utils.parameters_to_vector(model_a.parameters()).detach()
    theta_b = torch.nn.utils.parameters_to_vector(model_b.parameters()).detach()
    moved = float((theta_a - theta0).norm())
    diff = theta_a - theta_b
    return Parity(losses[0], losses[1], float(diff.abs().max()), float(diff.norm()) / max(moved, 1e-30))


def bias_correction_factor(betas: tuple[float, float]) -> Callable[[int], float]:
    """FusedLamb's step-size factor sqrt(1 - b2^t) / (1 - b1^t)."""
    b1, b2 = betas
    return lambda t: math.sqrt(1 - b2**t) / (1 - b1**t)


@dataclass
class Comparison:
    name: str
    a: str
    b: str
    make_a: OptimizerFactory
    make_b: OptimizerFactory
    expect_equal: bool
    lr_factor_b: Callable[[int], float] | None = None


def parity_comparisons(params: dict[str, Any], fused_available: bool) -> list[Comparison]:
    """FusedLamb (or, without CUDA, its restatement) against our Lamb, with the settings that should and should not agree."""
    cls, fused_name = (None, "FusedLamb") if fused_available else (FusedLambReference, "FusedLambReference (CPU)")

    def fused(p: dict[str, Any]) -> OptimizerFactory:
        return fused_lamb_factory(p, cls)

    off, on = {**params, "bias_correction": False}, {**params, "bias_correction": True}
    factor = bias_correction_factor(tuple(params.get("betas", (0.9, 0.999))))
    comparisons = [
        Comparison("control: our Lamb vs itself", "our Lamb", "our Lamb", our_lamb(on), our_lamb(on), True),
        Comparison(
            "bias_correction off in both (the shipped configs, ALBERT's LAMB)",
            f"{fused_name}",
            "our Lamb",
            fused(off),
            our_lamb(off),
            True,
        ),
        Comparison(
            "FusedLamb bias_correction on; ours off, lr x sqrt(1-b2^t)/(1-b1^t)",
            f"{fused_name}",
            "our Lamb",
            fused(on),
            our_lamb(off),
            True,
            factor,
        ),
        Comparison(
            "bias_correction on in both (FusedLamb's default; not selected by select_optimizer)",
            f"{fused_name}",
            "our Lamb",
            fused(on),
            our_lamb(on),
            False,
        ),
    ]
    if fused_available:
        comparisons.append(
            Comparison(
                "FusedLamb kernel vs its torch restatement (bias_correction on)",
                "FusedLamb",
                "FusedLambReference",
                fused(on),
                fused_lamb_factory(on, FusedLambReference),
                True,
            )
        )
    return comparisons


def parity_section(
    args: argparse.Namespace,
    device: torch.device,
    budget: Budget,
    report: Report,
    fused_reason: str | None,
    reserve_s: float,
) -> None:
    """Section 2."""
    params = shipped_lamb_params()
    batch_size, seq = args.parity_shape
    cfg = AlbertConfig.from_name_or_path(args.parity_config)
    batches = batches_on(device, cfg, batch_size, seq, count=4)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    rows, curves = [], []
    try:
        for comp in parity_comparisons(params, fused_reason is None):
            budget.check(args.parity_seconds, reserve_s)
            log.info("parity: %s", comp.name)
            try:
                r = lamb_parity(cfg, comp.make_a, comp.make_b, batches, args.parity_steps, device, comp.lr_factor_b)
            except Exception as e:
                log.exception("parity comparison failed")
                rows.append([comp.name, comp.a, comp.b, f"error: {type(e).__name__}: {str(e)[:150]}"] + [""] * 5)
                report.fail(f"LAMB parity: {comp.name}: {type(e).__name__}: {e}")
                continue
            agrees = r.agrees(args.parity_tol)
            ok = agrees == comp.expect_equal
            verdict = ("PASS" if ok else "FAIL") + (" (agree)" if agrees else " (differ)")
            if not ok:
                report.fail(
                    f"LAMB parity: {comp.name}: rel. diff {r.rel:.2e}, expected "
                    f"{'<=' if comp.expect_equal else '>'} {args.parity_tol:g}"
                )
            rows.append(
                [
                    comp.name,
                    comp.a,
                    comp.b,
                    f"{r.max_abs:.2e}",
                    f"{r.rel:.2e}",
                    f"{r.losses_a[0]:.4f} -> {r.losses_a[-1]:.4f}",
                    f"{r.losses_b[0]:.4f} -> {r.losses_b[-1]:.4f}",
                    "agree" if comp.expect_equal else "differ",
                    verdict,
                ]
            )
            if comp.name.startswith("bias_correction"):
                curves.append((comp, r))
    except SectionSkipped as e:
        rows.append([str(e)] + [""] * 8)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        report.emit(
            f"{args.parity_config}, fp32, batch {batch_size} x {seq}, {args.parity_steps} steps over 4 fixed batches, "
            f"two copies of one model (explicit attention), LAMB parameters of {SHIPPED_DS_CONFIG.name} at a "
            f"constant lr {params['lr']:g}. rel. diff = ||w_A - w_B|| / ||w_A - w_0||; the two agree when it is at most "
            f"{args.parity_tol:g}. {PARITY_TOL_WHY}\n"
        )
        if fused_reason is not None:
            report.emit(
                f"- FusedLamb: {fused_reason}; compared through FusedLambReference, a torch restatement of its CUDA "
                "kernel (checked against the kernel on a GPU)\n"
            )
        report.emit(
            markdown_table(
                ["comparison", "A", "B", "max abs diff", "rel. diff", "loss A", "loss B", "expected", "result"],
                rows,
                numeric={3, 4},
            )
        )
        factor = bias_correction_factor(tuple(params["betas"]))
        report.emit(
            f"\nWith bias_correction on, FusedLamb multiplies every step by sqrt(1-b2^t)/(1-b1^t) (betas {tuple(params['betas'])}): "
            + ", ".join(f"t={t} {factor(t):.2f}" for t in (1, 10, 100, 1000, 3125))
            + ". Our Lamb has no such factor: it corrects the moments before eps, weight decay and the trust ratio."
        )
    if curves:
        headers = ["step"] + [
            f"{'A' if i == 0 else 'B'}: {c.a if i == 0 else c.b}, {c.name.split(' (')[0]}"
            for c, _ in curves
            for i in (0, 1)
        ]
        lines = [
            [str(t + 1)] + [f"{x[t]:.5f}" for _, r in curves for x in (r.losses_a, r.losses_b)]
            for t in range(args.parity_steps)
        ]
        report.emit("\nLoss curves (the loss of each step, before its update):\n")
        report.emit(markdown_table(headers, lines, numeric=set(range(1, len(headers)))))
