"""pipeline/malloc.py: the settings really stop the per-step page faults, and step aside when the
process has chosen its allocator or settings."""

import subprocess
import sys

import pytest

from pipeline.malloc import malloc_tuning_unavailable

# Steps that allocate 20 buffers of 8 MiB (activations), then free them all; print the minor page
# faults of 10 such steps after 3 warm-up steps.
LOOP = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    from pipeline.malloc import tune_malloc
    print(tune_malloc(), file=sys.stderr)
if sys.argv[1] == "glibc-start":  # glibc's starting thresholds, pinned: its adaptation moves them by what ran before
    import ctypes
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 128 * 1024), libc.mallopt(-1, 128 * 1024)
x = torch.ones(1 << 21)
def step():
    buffers = [x * i for i in range(20)]
    del buffers
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def faults(mode: str, env: dict | None = None) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True, env=env)
    return int(r.stdout.split()[-1]), r.stderr


def thp_always() -> bool:
    """Transparent huge pages for every mapping: 8 MiB buffers fault in 2 MiB at a time, too few faults to count."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.mark.skipif(malloc_tuning_unavailable() is not None, reason="glibc malloc settings not applicable here")
@pytest.mark.skipif(
    thp_always(), reason="transparent huge pages set to always: page faults are not counted in 4 KiB pages"
)
def test_tuned_malloc_stops_page_faults_per_step():
    touched = 10 * 20 * 2048  # 10 steps x 20 buffers x 2,048 pages of 4 KiB
    # glibc's starting thresholds (128 KiB): every buffer is a fresh mmap, so every page is faulted in each step.
    # (Left to adapt, glibc raises its thresholds by what it has seen: between the two, a count that varies from run
    # to run; measured here 14,000-410,000.)
    start, _ = faults("glibc-start")
    assert start > touched * 0.9, start
    tuned, line = faults("tuned")
    assert "blocks under 32 MiB from the heap, its free top trimmed only above 1 GiB" in line
    assert tuned < touched / 20, (tuned, touched)


def test_steps_aside_for_a_preloaded_allocator_or_given_settings(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert "jemalloc is preloaded" in malloc_tuning_unavailable()
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # not one of ours
    assert malloc_tuning_unavailable() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0")
    assert "glibc.malloc.trim_threshold" in malloc_tuning_unavailable()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert "MALLOC_TOP_PAD_" in malloc_tuning_unavailable()


@pytest.mark.skipif(malloc_tuning_unavailable() is not None, reason="glibc malloc settings not applicable here")
@pytest.mark.skipif(
    thp_always(), reason="transparent huge pages set to always: page faults are not counted in 4 KiB pages"
)
def test_given_settings_are_left_alone():
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    plain, line = faults("tuned", env)
    assert (
        "left as the process has it (glibc malloc settings given in the environment (MALLOC_MMAP_THRESHOLD_))" in line
    )
    assert plain > 10 * 20 * 1000, plain
