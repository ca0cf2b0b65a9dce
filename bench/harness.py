"""What the benchmarks and the GPU check share: the step timer, matmul peaks, synthetic batches.

- `timed` / `time_step` / `time_steps`: wall-clock time of a callable, with the device's queued work finished before
  the clock starts and after the call (CUDA runs kernels asynchronously: without the syncs the clock would measure
  the launches only); `time_steps` lets several steps take turns, so that noise from other work on the machine
  hits them alike.
- `train_step`: one training step of a model (forward under autocast, backward, optimizer step), the unit timed.
- `matmul_peaks`: the FLOP/s of a large matmul per precision, the denominator of MFU: pipeline.flops.matmul_peak, the
  measurement albert-pretrain makes at start-up where it has no data-sheet peak (the device synced as here).
- the model FLOP count is pipeline.flops.step_flops, the one albert-pretrain reports in metrics.jsonl.
- `make_batch`: a pretraining-like synthetic batch; `markdown_table`: the tables the scripts print.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.flops import matmul_peak
from pipeline.model import AlbertConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (CUDA); CPU work is done when its call returns."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str = CPU) -> tuple[float, Any]:
    """(seconds, fn()) for one call, the device synced on both sides of it."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


@dataclass
class StepTimes:
    seconds: list[float]  # the timed calls, warmup left out
    last: Any = None  # what the last call returned (a step's loss)

    @property
    def fastest(self) -> float:
        """Noise from other work only ever adds time: on a shared machine the fastest call is the cleanest."""
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_steps(
    steps: Mapping[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device | str = CPU
) -> dict[str, StepTimes]:
    """Call every step warmup + repeats times, the steps taking turns (the order reversed every round, so that none
    always runs right after another); {name: its timed calls}."""
    times = {name: StepTimes([]) for name in steps}
    items = list(steps.items())
    rounds = warmup + repeats
    for i in range(rounds):
        for name, step in items if i % 2 == 0 else reversed(items):
            seconds, result = timed(step, device)
            if i >= warmup:
                times[name].seconds.append(seconds)
            if i == rounds - 1:
                times[name].last = result
            del result  # freed before the next call, which can then reuse its memory (a matmul's product, say)
    return times


def time_step(step: Callable[[], Any], warmup: int, repeats: int, device: torch.device | str = CPU) -> StepTimes:
    """`time_steps` for a single step."""
    return time_steps({"step": step}, warmup, repeats, device)["step"]


# --------------------------------------------------------------------------------------------- a training step


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on the device's type; fp32 runs without it."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer | None,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One training step (the benchmarks' unit): forward under autocast unless fp32, backward (through `scaler`'s loss
    scale if given), the optimizer's step when there is one; the gradients are released at the end, so that every step
    allocates them alike. Returns the loss (still on the device: reading it would sync)."""
    with autocast(device, dtype):
        loss = model(**batch).loss
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if opt is None:
        model.zero_grad(set_to_none=True)
    else:
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


# --------------------------------------------------------------------------------------------- peaks


def matmul_peaks(
    precisions: list[str],
    device: torch.device | str = CPU,
    before: Mapping[str, float] | None = None,
    n: int = 4096,
    reps: int = 5,
) -> dict[str, float]:
    """{precision: FLOP/s} of a large matmul; with `before` (an earlier measurement, e.g. from before the models ran),
    the better of the two: other work on a shared machine lowers the peak for a while."""
    return {k: max(matmul_peak(DTYPES[k], device, n, reps), (before or {}).get(k, 0.0)) for k in precisions}


# --------------------------------------------------------------------------------------------- batches and tables


def make_batch(
    cfg: AlbertConfig, batch: int, seq: int, predictions: int, seed: int = 0, device: torch.device | str = CPU
) -> dict[str, torch.Tensor]:
    """Pretraining-like batch: ~10% short sequences, 15% of tokens masked (at most `predictions`). Drawn on the CPU
    (the same batch for a seed on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)
    lengths = torch.where(
        torch.rand(batch, generator=g) < 0.1, torch.randint(seq // 4, seq, (batch,), generator=g), seq
    )
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    positions = torch.zeros(batch, predictions, dtype=torch.long)
    for b in range(batch):
        n = min(predictions, max(1, round(0.15 * int(lengths[b]))))
        positions[b, :n] = (torch.randperm(int(lengths[b]) - 2, generator=g)[:n] + 1).sort().values
    tensors = {
        "input_ids": ids * mask,
        "input_mask": mask,
        "segment_ids": (torch.arange(seq)[None, :] >= lengths[:, None] // 2).long() * mask,
        "masked_lm_positions": positions,
        "masked_lm_ids": torch.randint(5, cfg.vocab_size, (batch, predictions), generator=g) * (positions > 0),
        "next_sentence_labels": torch.randint(0, 2, (batch,), generator=g),
    }
    return {k: v.to(device) for k, v in tensors.items()}


def markdown_table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """A Markdown table; the columns in `numeric` right-aligned. A '|' inside a cell becomes '/' (it would end the cell)."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if i in numeric else "---" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)
