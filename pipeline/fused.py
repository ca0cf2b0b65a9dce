"""Fused execution paths for the model, each with a switch and a plain fallback.

- attention: `scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA, the fused
  kernel on CPU) or the explicit form; "auto" picks per device and dtype (see model.attention).
- compile: `torch.compile` of each distinct shared `AlbertLayer` (compiled once, reused by every
  pass through it) and of the MLM head's transform. Inductor fuses bias + gelu_new and
  dropout + residual + LayerNorm into C++/OpenMP kernels on CPU, Triton kernels on GPU; on CPU
  the compiled code computes gelu_new through sigmoid (gelu_tanh_by_sigmoid: the same function, a faster kernel). "auto"
  compiles on CUDA only: on CPU it measured no faster (see compile_unavailable).
- the optimizer's fused path (DeepSpeed FusedLamb on CUDA) is chosen in lamb_deepspeed.select_optimizer
  with `FusedOptions.fused_lamb`.

`apply_fused` returns the log lines saying which paths are active and why others are not; `resolve_fused` says the
same as data (albert-pretrain's run-info.json).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch._dynamo

from .model import ATTENTION_IMPLS, AlbertForPreTraining, AlbertLayer

COMPILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class FusedOptions:
    attention: str = "auto"  # "auto" | "sdpa" | "math"
    compile: str = "auto"  # "on" | "off" | "auto": on where it pays (CUDA), see compile_unavailable
    fused_lamb: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention: {self.attention!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile: {self.compile!r} is not one of {', '.join(COMPILE_MODES)}")


PLAIN = FusedOptions(attention="math", compile="off", fused_lamb=False)


def compile_unavailable(mode: str, device: torch.device, zero_stage: int) -> str | None:
    """Why torch.compile is not used here, or None when it is."""
    if mode == "off":
        return "switched off"
    if mode == "auto" and device.type == "cpu":
        # Measured (bench/bench_fused.py, 2 cores, seq 128): the CPU step is matmul-bound (MFU over
        # 90% at albert-base), so the fused elementwise kernels gave 0.98-1.05x, for 25-55 s of
        # compiling at start-up with a cold cache.
        return "auto: no faster on CPU in bench/bench_fused.py; --compile on forces it"
    if zero_stage == 3:
        # Measured: ZeRO-3's gather/release hooks around each module call make Dynamo recompile
        # the layer at every pass until its recompile limit, after which it runs eagerly anyway.
        return "ZeRO-3: its parameter hooks make the layer recompile until the limit"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "no Triton for CUDA kernels"
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        return (
            None
            if shutil.which(cxx) or shutil.which("c++") or shutil.which("clang++")
            else f"no C++ compiler ({cxx}) for CPU kernels"
        )
    return f"not set up for device {device.type}"


def describe_attention(impl: str, device: torch.device) -> str:
    if impl == "math":
        return "attention: explicit matmul + softmax form (switched to math)"
    kernels = "flash / memory-efficient kernels" if device.type == "cuda" else "the fused CPU kernel"
    if impl == "sdpa" or device.type != "cpu":
        return f"attention: scaled_dot_product_attention ({kernels})"
    return "attention: scaled_dot_product_attention (fused CPU kernel) in fp32; explicit form in bf16, whose backward is faster on CPU"


def sdpa_kernel_choice(config, device: torch.device, dtype: torch.dtype, seq_len: int | None = None) -> dict[str, str]:
    """The kernel scaled_dot_product_attention dispatches to for this model's attention shapes (at `seq_len`, default
    the model's longest up to 512), as torch's own dispatcher chooses (torch._fused_sdp_choice):
    {"without_padding": ..., "with_padding": ...} for a batch without padding (no mask) and with it (a boolean
    mask); "unknown (Error)" where the dispatcher cannot be asked."""
    from torch.nn.attention import SDPBackend

    heads = config.num_attention_heads
    length = seq_len or min(config.max_position_embeddings, 512)
    q = torch.zeros(2, heads, length, config.hidden_size // heads, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 1, 1, length, device=device, dtype=torch.bool)
    names = {}
    for case, m in (("without_padding", None), ("with_padding", mask)):
        try:
            names[case] = SDPBackend(
                torch._fused_sdp_choice(q, q, q, m, config.attention_probs_dropout_prob, False)
            ).name.lower()
        except Exception as e:  # noqa: BLE001 - a private function: report, never fail the run over it
            names[case] = f"unknown ({type(e).__name__})"
    return names


def sdpa_kernels(config, device: torch.device, dtype: torch.dtype) -> str:
    """sdpa_kernel_choice as a log line."""
    names = sdpa_kernel_choice(config, device, dtype)
    return (
        f"SDPA kernel on {device.type} in {str(dtype).removeprefix('torch.')}: {names['without_padding']} for batches "
        f"without padding, {names['with_padding']} with padding"
    )


def runs_sdpa(impl: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the layers call scaled_dot_product_attention for `impl` (model.attention's rule for "auto")."""
    return impl == "sdpa" or (impl == "auto" and not (device.type == "cpu" and dtype == torch.bfloat16))


@dataclass(frozen=True)
class FusedPaths:
    """What a run's fused paths resolve to on this device, as data (run-info.json); apply_fused logs the same."""

    attention: str  # "sdpa" (scaled_dot_product_attention) | "explicit" (matmul + softmax)
    sdpa_kernels: dict[str, str] | None  # sdpa: torch's kernel choice (sdpa_kernel_choice); explicit: None
    compiled: bool  # torch.compile of the shared layers and the MLM head
    compile_off_reason: str | None  # why not compiled (compile_unavailable), None when compiled


def resolve_fused(
    config,
    options: FusedOptions,
    device: torch.device,
    zero_stage: int = 0,
    dtype: torch.dtype = torch.float32,
    seq_len: int | None = None,
) -> FusedPaths:
    """The paths apply_fused switches on for these options, on this device, for the model `config` in `dtype`
    (the SDPA kernel asked for sequences of `seq_len`)."""
    sdpa = runs_sdpa(options.attention, device, dtype)
    reason = compile_unavailable(options.compile, device, zero_stage)
    return FusedPaths(
        attention="sdpa" if sdpa else "explicit",
        sdpa_kernels=sdpa_kernel_choice(config, device, dtype, seq_len) if sdpa else None,
        compiled=reason is None,
        compile_off_reason=reason,
    )


def apply_fused(
    model: AlbertForPreTraining,
    options: FusedOptions,
    device: torch.device,
    zero_stage: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Switch the model's fused paths on as `options` ask and the machine allows; returns log lines."""
    model.set_attention(options.attention)
    lines = [describe_attention(options.attention, device)]
    if runs_sdpa(options.attention, device, dtype):
        lines[0] += f"; {sdpa_kernels(model.config, device, dtype)}"
    reason = compile_unavailable(options.compile, device, zero_stage)
    if reason:
        lines.append(f"torch.compile: off ({reason}); layers and MLM head run eagerly")
        return lines
    # A kernel that fails to compile falls back to eager for that graph, with a warning, instead of
    # stopping the run.
    torch._dynamo.config.suppress_errors = True
    # A shared layer is called in up to 8 variants (train/eval x padding mask or not x all rows or the gathered
    # last pass): Dynamo's default limit of 8 graphs per code object would leave no headroom before it falls back
    # to eager without a word.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    layers = [m for m in model.modules() if isinstance(m, AlbertLayer)]  # each shared layer once
    sigmoid_gelu = device.type == "cpu" and model.config.hidden_act in TANH_GELUS
    if sigmoid_gelu:
        users: list[AlbertForPreTraining | AlbertLayer] = [model, *layers]  # the modules that call self.act
        for module in users:
            module.act = gelu_tanh_by_sigmoid
    for layer in layers:
        # Static shapes: a run sees one batch shape (two graphs per layer: all rows, and the last
        # pass's [CLS] + masked rows), so dynamic-shape kernels would only cost speed.
        layer.compile(dynamic=False)
    # the instance attribute shadows the method (checkpoints and parameter names are unchanged)
    model.mlm_transform = torch.compile(model.mlm_transform, dynamic=False)  # type: ignore[method-assign]
    backend = "Triton" if device.type == "cuda" else "C++/OpenMP"
    lines.append(
        f"torch.compile: on for {len(layers)} shared layer(s) ({len(model.layer_schedule())} passes) and the MLM head "
        f"(Inductor, {backend} kernels{'; gelu_new through sigmoid' if sigmoid_gelu else ''}; compiled at the first step)"
    )
    return lines


TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_GELU_K = 2 * (2 / math.pi) ** 0.5


def gelu_tanh_by_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """gelu_new, the tanh-approximated gelu, as x * sigmoid(2z): 0.5 * (1 + tanh(z)) is sigmoid(2z). The same function
    (within 5e-7 in fp32); for compiled code only, where it is one kernel that computes in fp32 and, on CPU, about 2x
    faster than through tanh (bench/bench_ops.py, section 3). Eager, its separate passes would be slower than F.gelu."""
    return x * torch.sigmoid(_GELU_K * (x + 0.044715 * x * x * x))


def compile_counters() -> dict[str, Any]:
    """torch._dynamo's counters (torch._dynamo.utils.counters, process-wide) as data: frames Dynamo was asked to
    convert and those it converted, fallbacks (frames that raised and ran eagerly, which suppress_errors allows),
    graph breaks in all and the most frequent reasons, distinct graphs compiled."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    breaks = counters["graph_break"]
    return {
        "frames": frames["total"],
        "frames_converted": frames["ok"],
        "fallbacks": frames["total"] - frames["ok"],
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": dict(breaks.most_common(5)),
        "unique_graphs": counters["stats"]["unique_graphs"],
    }
