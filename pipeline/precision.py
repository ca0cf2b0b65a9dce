"""Numeric precision of a run: the DeepSpeed config's fp16/bf16/fp32 choice, checked, and TF32 matmuls on GPUs."""

from __future__ import annotations

from typing import Any


class PrecisionError(ValueError):
    """A precision setting this run cannot use; reported on one line before any step."""


def check_precision(ds: dict[str, Any], allow_fp16_on_cpu: bool) -> str:
    """ "fp16", "bf16" or "fp32" from the DeepSpeed config, refusing what cannot work here."""
    import torch

    fp16, bf16 = ds.get("fp16", {}).get("enabled", False), ds.get("bf16", {}).get("enabled", False)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if fp16 and bf16:
        raise PrecisionError("DeepSpeed config: fp16 and bf16 are both enabled; choose one")
    if fp16 and stage == 0:
        raise PrecisionError(
            "fp16 with ZeRO stage 0 is broken in DeepSpeed 0.19 (the loss is never scaled); use ZeRO 1-3 or bf16"
        )
    accum_dtype = str(ds.get("data_types", {}).get("grad_accum_dtype", "")).lower()
    if bf16 and stage == 0 and accum_dtype in ("fp32", "float32", "float"):
        raise PrecisionError(
            "bf16 with data_types.grad_accum_dtype fp32 needs ZeRO 1-3 (DeepSpeed 0.19 refuses it at ZeRO-0); "
            "use ZeRO-1 or drop the setting"
        )
    if fp16 and not torch.cuda.is_available():
        if not allow_fp16_on_cpu:
            raise PrecisionError("fp16 needs a GPU; on CPU use a bf16 or fp32 config (ds_configs/cpu-*.json)")
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True  # the documented override for testing the fp16 path on CPU
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


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
