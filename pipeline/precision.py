"""Numeric precision of a run beyond the DeepSpeed config (whose fp16/bf16/fp32 choice pipeline.run_config checks):
TF32 matmuls on GPUs, and DeepSpeed's fp16 testing override on CPU."""

from __future__ import annotations


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's documented override for testing its fp16 path on a CPU without fp16 support (albert-pretrain's
    --allow-fp16-on-cpu; the run's config has checked that it was asked for)."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def set_tf32(device, enabled: bool) -> str:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer; ignored by older GPUs): about 8x the fp32
    matmul rate at a 10-bit mantissa, the precision of bf16 runs' inputs and better. A CUDA-only switch: the CPU's
    fp32 matmuls stay IEEE. Returns the log line."""
    import torch

    if device.type != "cuda":
        return "TF32: not applicable (CPU)"
    # The legacy switches: in torch >= 2.9 they also set the new fp32_precision, whereas setting only the new one
    # makes later readers of the legacy state (get_float32_matmul_precision, allow_tf32) raise "mix of the legacy
    # and new APIs".
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    if not enabled:
        return "TF32: off (--no-tf32): fp32 matmuls in full IEEE precision"
    has_tf32 = not torch.cuda.is_available() or torch.cuda.get_device_capability(device)[0] >= 8
    return f"TF32: on for fp32 matmuls{'' if has_tf32 else ' (this GPU has none: plain fp32)'}; --no-tf32 turns it off"
