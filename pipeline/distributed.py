"""Which launcher started us, and the torch.distributed variables it implies.

- torchrun and the `deepspeed` launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
- `srun` sets SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS / SLURM_JOB_NODELIST: we map them, the
  rendezvous host being the first node of the allocation (SLURM_STEP_NUM_TASKS, not SLURM_NTASKS, so that a
  batch script running python without srun is not mistaken for one task of many). Its tasks are recognised before
  the MPI variables are looked at: with --mpi=pmi2 or pmix they carry PMI_RANK / PMI_SIZE / PMIX_RANK too
  (common.launchers.launched_by_srun);
- `mpirun` (OpenMPI, PMIx): DeepSpeed's MPI discovery (mpi4py) finds rank, size and rank 0's address;
- otherwise a single plain process on a free local port.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from common.launchers import launched_by_mpi, launched_by_srun

log = logging.getLogger(__name__)


class LaunchError(Exception):
    """A launch this process cannot run under (e.g. its GPU binding); reported on one line before any collective."""


class RendezvousError(Exception):
    """Rank 0 cannot be reached: reported on one line, long before the process-group timeout."""


@dataclass(frozen=True)
class Launch:
    launcher: str  # torchrun | deepspeed | srun | mpirun | single
    mpi_discovery: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("node[1-2],gpu7" -> "node1"), by scontrol when present."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # no scontrol (e.g. inside a container): the first item outside brackets, each bracket at its first value
        # ("rack[1-2]-n[03,07]-ib,gpu7" -> "rack1-n03-ib")
        first = re.split(r",(?![^\[]*\])", nodelist)[0]
        while m := re.search(r"\[([^\]]*)\]", first):
            first = first[: m.start()] + re.split(r"[-,]", m.group(1))[0] + first[m.end() :]
        return first


def torchrun_pretrain(ranks: int, args: list[str]) -> list[str]:
    """The command that runs `albert-pretrain ARGS` on RANKS local processes under torchrun, with this Python and a
    free rendezvous port (the demo and the benchmarks launch it so)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    return [*torchrun, "--master_port", str(free_port()), "-m", "pipeline.pretrain", *args]


def slurm_rendezvous(env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT) of a Slurm job's tasks: the values already set (slurm/pretrain.sbatch exports
    RDZV_ADDR / RDZV_PORT as them), else the first node of the step (of the job, in the batch script) and
    20000 + SLURM_JOB_ID % 20000."""
    addr = env.get("MASTER_ADDR") or first_host(
        env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost"))
    )
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return addr, port


def detect_launch() -> Launch:
    """Set the torch.distributed variables the launcher left out; say which launcher it was."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("deepspeed" if "CROSS_RANK" in env or "DS_LAUNCHER" in env else "torchrun", False)
    if launched_by_srun(env):  # also under srun's MPI plugins; not the ranks of an mpirun inside a Slurm job
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["MASTER_ADDR"], env["MASTER_PORT"] = slurm_rendezvous(env)
        return Launch("srun", False)
    if launched_by_mpi(env):
        return Launch("mpirun", True)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return Launch("single", False)


def check_rendezvous(timeout: float) -> None:
    """Non-zero ranks: fail fast, with a clear message, when rank 0's address cannot be reached.

    Without this a rank waits for the whole process-group timeout (30 minutes by default)."""
    import time

    if os.environ.get("RANK", "0") == "0":
        return
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as e:
            last = e
            time.sleep(1.0)
    raise RendezvousError(
        f"rank {os.environ['RANK']}: cannot reach rank 0 at {host}:{port} within {timeout:.0f} s ({last}); check that the nodes can reach each other"
    )


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU a rank uses: its local rank modulo the GPUs it can see. A Slurm job that binds one GPU per task
    (`--gpus-per-task=1`, `--gpu-bind=...`) gives every task a single visible device, cuda:0, while
    SLURM_LOCALID still counts the tasks of the node; with all GPUs visible this is the local rank itself."""
    if visible < 1:
        raise ValueError("no visible GPU")
    return local_rank % visible


def choose_gpu(local: int, visible: int, mpi_discovery: bool, env: Mapping[str, str] = os.environ) -> int | None:
    """The CUDA device of this rank, checked against what DeepSpeed will do with LOCAL_RANK.

    torchrun, the deepspeed launcher, srun: gpu_index (LOCAL_RANK modulo the visible GPUs), which init_distributed
    writes back to LOCAL_RANK. Under mpirun DeepSpeed sets LOCAL_RANK itself from OpenMPI's local rank (None here: the
    device is known after discovery) and insists that the two agree, so there every rank must see all the node's GPUs."""
    ompi_local = env.get("OMPI_COMM_WORLD_LOCAL_RANK")
    if mpi_discovery:
        if ompi_local is not None and int(ompi_local) >= visible:
            raise LaunchError(
                f"mpirun: OpenMPI local rank {ompi_local} but {visible} GPU(s) visible; under mpirun every rank must "
                "see all its node's GPUs (DeepSpeed takes the device from OpenMPI's local rank): bind GPUs with srun "
                "or torchrun instead"
            )
        return None
    device = gpu_index(local, visible)
    if device != local and ompi_local is not None:
        raise LaunchError(
            f"local rank {local} with {visible} visible GPU(s) would use cuda:{device}, but DeepSpeed requires LOCAL_RANK "
            f"to equal OpenMPI's local rank ({ompi_local}): let every rank see all its node's GPUs"
        )
    return device


def init_distributed(launch: Launch, timeout_s: float) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA); returns (rank, world, local rank).

    On CUDA, LOCAL_RANK is rewritten to the rank's GPU index (choose_gpu) before DeepSpeed reads it: DeepSpeed takes
    LOCAL_RANK as the device both for the process group (`device_id`) and for the engine. DeepSpeed features that
    read LOCAL_RANK as a rank within the node (node-local checkpoint storage, pipeline checkpoint loading) are not
    used by this project's configs."""
    import deepspeed
    import torch

    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        device = choose_gpu(local, torch.cuda.device_count(), launch.mpi_discovery)
        if device is not None:
            os.environ["LOCAL_RANK"] = str(device)
            torch.cuda.set_device(device)
    deepspeed.init_distributed(
        dist_backend="nccl" if cuda else "gloo",
        auto_mpi_discovery=launch.mpi_discovery,
        distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
        timeout=timedelta(seconds=timeout_s),
    )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mismatch = slurm_step_mismatch(launch.launcher, world)
    if mismatch:
        raise LaunchError(mismatch)
    if cuda:
        if launch.mpi_discovery:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        gpus = f"cuda:{torch.cuda.current_device()} of {torch.cuda.device_count()} visible GPU(s)"
        log.info("local rank %d -> %s (CUDA_VISIBLE_DEVICES=%s)", local, gpus, visible)
    return rank, world, local


def slurm_step_mismatch(launcher: str, world: int, env: Mapping[str, str] = os.environ) -> str | None:
    """Why a world of `world` ranks cannot be this Slurm step's run, or None. Every task of a step belongs to the run
    (one rank each under srun or an MPI launch, a torchrun of several ranks each): a smaller world means tasks that
    each train alone (an MPI library that did not understand srun's plugin gives every task a world of one), all
    writing one --output."""
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if tasks is None or not tasks.isdigit() or world >= int(tasks):
        return None
    return (
        f"{launcher} launch: a world of {world} rank(s) in a Slurm step of {tasks} tasks; the tasks would train "
        "separately into one --output. Under srun, let pipeline.distributed map srun's variables (--mpi=none, or an "
        "MPI library built for the step's --mpi plugin)"
    )


def shutdown_distributed() -> None:
    """Destroy the process group before the interpreter exits. Left to interpreter teardown, gloo's and
    DeepSpeed's communication threads can abort a finished process ("terminate called without an active
    exception", seen once in a test run), which the launcher then reports as a failed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
