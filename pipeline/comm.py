"""The training loop's own collectives (step counts, stop/NaN flags, metric sums), on the right device.

Rule: every tensor our code hands to a collective lives on the communication device, which is the
engine's device: the rank's GPU under NCCL, the CPU under gloo. An NCCL process group accepts CUDA
tensors only ("No backend type associated with device type cpu").

Why not a device-mapped group (`cpu:gloo,cuda:nccl`) that would let host values travel over gloo: the
values the loop reduces are produced on the GPU (losses, accuracies, the non-finite flag). Sending them
over gloo would read each into host memory first, a device-to-host sync per micro-batch; on the device
they are summed where they are made and read once per logging step (and the step's flags once per step).

Host values (counts known from the CPU batch, a signal flag) reach the device through pinned memory with
an asynchronous copy, so building a collective's input never waits on the GPU either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class CollectiveDeviceError(RuntimeError):
    """A tensor on another device than the process group's reached one of our collectives."""


class Comm:
    """All-reduces on `device`; a tensor from anywhere else is refused before it reaches the backend."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def tensor(self, values: Sequence[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Host values as a tensor on the device, without a host sync (pinned memory, async copy on CUDA)."""
        host = torch.tensor(list(values), dtype=dtype)
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def check(self, t: torch.Tensor) -> torch.Tensor:
        if not _same_device(t.device, self.device):
            raise CollectiveDeviceError(
                f"a {tuple(t.shape)} tensor on {t.device} reached a collective whose tensors must be on {self.device} "
                f"(the {dist.get_backend() if dist.is_initialized() else 'process group'} backend's device)"
            )
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over all ranks; returns t."""
        dist.all_reduce(self.check(t), op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place maximum over all ranks; returns t."""
        dist.all_reduce(self.check(t), op=dist.ReduceOp.MAX)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place minimum over all ranks; returns t."""
        dist.all_reduce(self.check(t), op=dist.ReduceOp.MIN)
        return t


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda:0 and a bare cuda (the current device) count as the same only when the current device is 0."""
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    index = lambda d: d.index if d.index is not None else torch.cuda.current_device()  # noqa: E731
    return index(a) == index(b)
