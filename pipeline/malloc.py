"""glibc malloc settings for training on CPU: keep the freed step buffers in the process.

A training step allocates and frees the same activation and gradient buffers (hundreds of KiB to
tens of MiB each) every step. glibc serves such blocks with mmap and gives them back to the kernel
when they are freed (its threshold starts at 128 KiB and only grows with what it sees), and it trims
the heap's free top above 128 KiB, so every step zero-fills fresh pages again: about 14,000 page
faults per forward + backward of albert-tiny (batch 8 x 128, bf16), 900 with the settings below; that
step 1.01-1.16x faster (four runs of `python bench/bench_ops.py`, section 6), training steps in the
engine 1.01-1.06x (`bench/bench_engine.py --malloc-defaults`). PyTorch's CPU allocator has no cache
of its own, so this is the cache: blocks under `MMAP_THRESHOLD` come from the heap and stay there
for the next step; the heap's free top is given back only above `TRIM_THRESHOLD`.

Skipped when the process already chose: another allocator preloaded (jemalloc, tcmalloc, mimalloc)
or glibc's malloc settings given in the environment.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 1 << 30

# Settings that fix what we would set (any of them turns glibc's dynamic mmap threshold off): the user chose.
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_TUNABLES = (
    "glibc.malloc.mmap_threshold",
    "glibc.malloc.trim_threshold",
    "glibc.malloc.top_pad",
    "glibc.malloc.mmap_max",
)


def malloc_tuning_unavailable() -> str | None:
    """Why the settings are not applied in this process, or None when they can be."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} is preloaded (LD_PRELOAD)"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    given = [v for v in _ENV if v in os.environ] + [t for t in _TUNABLES if t in tunables]
    if given:
        return f"glibc malloc settings given in the environment ({', '.join(given)})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None


def tune_malloc() -> str:
    """Apply the settings (once per process, before the big allocations); returns a log line."""
    reason = malloc_tuning_unavailable()
    if reason:
        return f"malloc: left as the process has it ({reason})"
    libc = ctypes.CDLL(None)  # the process's own libc (no ldconfig lookup: that would fork)
    refused = [
        name
        for name, param, value in (
            ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
        if not libc.mallopt(param, value)
    ]
    if refused:
        return f"malloc: glibc refused mallopt {', '.join(refused)}; its default kept there"
    return (
        f"malloc: blocks under {MMAP_THRESHOLD >> 20} MiB from the heap, its free top trimmed only above {TRIM_THRESHOLD >> 30} GiB "
        "(step buffers reused instead of page-faulted in again; --no-malloc-tuning keeps glibc's defaults)"
    )
