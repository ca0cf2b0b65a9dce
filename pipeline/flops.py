"""Model FLOPs of a training step, and the peak they are measured against (MFU = achieved model FLOP/s / peak).

`step_flops` counts the matmul FLOPs (2 per multiply-add) of one forward pass of our ALBERT, part by part, from the
model config and the batch's shape; `StepFlops.training` is 3 x the forward: the backward computes two matmuls per
forward matmul (the gradient of each operand). What is counted is what the model computes:

- embeddings: the vocab x E lookups are free (a gather); the E -> H projection costs, at every token;
- shared layers: num_hidden_layers passes of a group of inner_group_num layers, each pass computed anew (sharing
  saves parameters, not FLOPs);
- attention at the padded sequence length: the model runs every row at the shards' max_seq_length (padding is
  masked, not skipped), so the padded length is what is computed;
- the heads read only the [CLS] row and the prediction slots, so the last layer computes queries, the attention
  output and the FFN for those rows only (keys and values for every token), and the MLM head (H -> E, then the tied
  E -> vocab decoder) runs at the `max_predictions_per_seq` slots of each example, padding slots included (they are
  computed, then masked in the loss); the SOP head is the pooler (H x H) and the classifier (H x 2) on [CLS].
  `gathered=False` counts transformers' AlbertForPreTraining instead: full last layer, MLM head at every token.

Model FLOPs, not hardware FLOPs (PaLM's definition of MFU): work the hardware repeats is not counted, so
activation checkpointing's second forward of the layers, and the scores a fused attention backward recomputes, leave
the count unchanged (they lower MFU, as they should). Elementwise work (LayerNorm, GELU, softmax, the loss) is left
out, as everyone counts it: it is under 1% of albert-base's matmul FLOPs.

Peaks (`Peak`, resolved by `resolve_peak`): `--peak-tflops` if given; else the data-sheet table for a known GPU
(`GPU_PEAKS`); else (the CPU, an unknown GPU) a short matmul measured at start-up (`matmul_peak`).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass

import torch

from .model import AlbertConfig


@dataclass(frozen=True)
class StepFlops:
    """Forward matmul FLOPs of one batch, by part; `training` is the whole step's model FLOPs."""

    embedding_projection: int  # E -> H at every token
    layers: int  # the layers' dense projections (query, key/value, attention output, FFN), every pass
    attention: int  # scores (Q K^T) and their weighted sum (P V), every pass
    mlm_head: int  # H -> E transform and the E -> vocab decoder at the prediction slots
    sop_head: int  # pooler and classifier on [CLS]

    @property
    def forward(self) -> int:
        return self.embedding_projection + self.layers + self.attention + self.mlm_head + self.sop_head

    @property
    def training(self) -> int:
        """Forward + backward: 3 x the forward (the backward's two matmuls per forward matmul)."""
        return 3 * self.forward


def step_flops(cfg: AlbertConfig, examples: int, seq_len: int, predictions: int, gathered: bool = True) -> StepFlops:
    """Matmul FLOPs of a forward pass over `examples` sequences of `seq_len` tokens (padded length) with
    `predictions` MLM slots each (the shards' max_predictions_per_seq). `gathered`: as our model computes it (last
    layer and MLM head at [CLS] + the prediction slots); False: transformers' AlbertForPreTraining (full last layer,
    MLM head at every token)."""
    H, E, I, V = cfg.hidden_size, cfg.embedding_size, cfg.intermediate_size, cfg.vocab_size  # noqa: E741 (the paper's names)
    passes = cfg.num_hidden_layers * cfg.inner_group_num
    L = seq_len
    rows = 1 + predictions if gathered else L  # rows of the last layer past its keys and values
    head_rows = predictions if gathered else L
    query_out_ffn = 2 * H * H + 2 * H * H + 2 * 2 * H * I  # per row: query, attention output, FFN in and out
    key_value = 2 * H * 2 * H  # per token
    layers = (passes - 1) * L * (query_out_ffn + key_value) + L * key_value + rows * query_out_ffn
    # per query row: Q K^T over L keys and P V (2 * L * head_dim per head, for every head: 2 * L * H), twice
    attention = (passes - 1) * L * 4 * L * H + rows * 4 * L * H
    per_sequence = StepFlops(
        embedding_projection=L * 2 * E * H,
        layers=layers,
        attention=attention,
        mlm_head=head_rows * (2 * H * E + 2 * E * V),
        sop_head=2 * H * H + 2 * H * 2,
    )
    return StepFlops(**{k: v * examples for k, v in dataclasses.asdict(per_sequence).items()})


# --------------------------------------------------------------------------------------------- peaks


class PeakSource(enum.StrEnum):
    """Where a run's peak comes from; the values are what run-info.json says."""

    FLAG = "flag"  # --peak-tflops
    TABLE = "table"  # GPU_PEAKS, the vendor's data sheet
    MEASURED = "measured"  # matmul_peak at start-up


@dataclass(frozen=True)
class Peak:
    """A device's peak for the run's matmuls, per device (per rank), in TFLOP/s."""

    tflops: float
    source: PeakSource
    matmul: str  # "bf16" | "fp16" | "tf32" | "fp32": the matmul precision the peak is for
    device: str  # the device's name


# Dense (no structured sparsity) peaks in TFLOP/s from NVIDIA's data sheets: "NVIDIA H100 Tensor Core GPU" (H100 SXM,
# H100 PCIe, H100 NVL), "NVIDIA H200 Tensor Core GPU" (H200 SXM, H200 NVL) and "NVIDIA A100 Tensor Core GPU" (A100
# 40GB and 80GB, SXM and PCIe: the same compute). The sheets give the Tensor Core figures with sparsity: the dense
# figure is half of it (H100 SXM: BF16 1,979 -> 989.5, TF32 989 -> 494.5); fp32 is the non-Tensor-Core figure.
# Matched against torch.cuda.get_device_name in this order, case-insensitively, all words present: the more
# specific names first ("NVIDIA H100 PCIe" before the SXM's "NVIDIA H100 80GB HBM3").
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def table_peak(device_name: str, matmul: str) -> float | None:
    """The data-sheet peak (TFLOP/s) of the first GPU_PEAKS entry whose words all appear in `device_name`, for
    `matmul` ("bf16", "fp16", "tf32", "fp32"); None for a device the table does not know."""
    words = device_name.upper().replace("-", " ").split()
    for name, peaks in GPU_PEAKS:
        if all(word in words for word in name.upper().split()):
            return peaks[matmul]
    return None


def matmul_kind(device: torch.device, dtype: torch.dtype) -> str:
    """The matmul precision the hardware runs for a model in `dtype`: fp32 matmuls run as TF32 on CUDA where torch
    allows it (pipeline.precision.set_tf32) and the GPU has it (Ampere and newer)."""
    if dtype == torch.float32:
        tf32 = (
            device.type == "cuda"
            and torch.backends.cuda.matmul.allow_tf32
            and torch.cuda.get_device_capability(device)[0] >= 8
        )
        return "tf32" if tf32 else "fp32"
    return dtype_name(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """ "bf16", "fp16", "fp32" (the names DeepSpeed configs use), else torch's name."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:  # Linux: the processor's model name (platform.processor() gives only the architecture there)
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype, device: torch.device | str = "cpu", n: int = 4096, reps: int = 5, min_seconds: float = 0.0
) -> float:
    """The best FLOP/s of n x n x n matmuls in `dtype` on `device`: `reps` timed calls, more until `min_seconds` have
    passed (one untimed call first; the device synced around each timed call). On a machine shared with other work
    the best call is the cleanest: noise only adds time, and a longer measurement is likelier to see a quiet moment."""
    device = torch.device(device)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best, calls, began = float("inf"), 0, time.perf_counter()
    while calls <= reps or time.perf_counter() - began < min_seconds:
        _sync(device)
        start = time.perf_counter()
        product = a @ b
        _sync(device)
        if calls:
            best = min(best, time.perf_counter() - start)
        calls += 1
        del product
    return 2 * n**3 / best


# The start-up measurement: (n, timed calls, at least this many seconds). CPU: 17 GFLOP per call, about 0.1 s on one
# core in bf16, for a second: on a machine shared with other work a shorter one often caught only a busy moment
# (measured on 2 shared cores: half the peak bench/bench_model.py found a minute later). CUDA: large enough to
# saturate the GPU, a few milliseconds per call.
STARTUP_MATMUL = {"cpu": (2048, 5, 1.0), "cuda": (8192, 10, 0.0)}


def resolve_peak(device: torch.device, dtype: torch.dtype, flag_tflops: float | None) -> Peak:
    """This rank's peak for a model in `dtype` on `device`: the flag's value, else the table's for a known GPU, else
    measured now (STARTUP_MATMUL)."""
    name, matmul = device_name(device), matmul_kind(device, dtype)
    if flag_tflops is not None:
        return Peak(flag_tflops, PeakSource.FLAG, matmul, name)
    if device.type == "cuda":
        listed = table_peak(name, matmul)
        if listed is not None:
            return Peak(listed, PeakSource.TABLE, matmul, name)
    n, reps, seconds = STARTUP_MATMUL.get(device.type, STARTUP_MATMUL["cpu"])
    if device.type == "cpu":
        n = _cpu_matmul_size(dtype, n)
    # fp32 on CUDA with TF32 allowed: the matmul below runs as TF32 too, as the model's do
    return Peak(matmul_peak(dtype, device, n, reps, seconds) / 1e12, PeakSource.MEASURED, matmul, name)


def _cpu_matmul_size(dtype: torch.dtype, largest: int, call_seconds: float = 0.2) -> int:
    """The start-up matmul's size on CPU: `largest`, or smaller where a call would take longer than `call_seconds`
    (a CPU without fp16 arithmetic runs fp16 matmuls a hundred times slower than bf16: 2048^3 would take seconds per
    call, minutes for the measurement), estimated from one call of 256^3."""
    small = 256
    a = torch.randn(small, small, dtype=dtype)
    a @ a  # (first call: allocation, kernel choice)
    start = time.perf_counter()
    a @ a
    per_flop = (time.perf_counter() - start) / (2 * small**3)
    fits = int((call_seconds / max(per_flop, 1e-15) / 2) ** (1 / 3))
    return max(small, min(largest, fits))
