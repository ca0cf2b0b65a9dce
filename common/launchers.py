"""The environment variables of the launchers we run under, in one table (used by albert-data and albert-pretrain).

| launcher                      | rank                 | number of processes   | local rank                 |
|-------------------------------|----------------------|-----------------------|----------------------------|
| torchrun, `deepspeed`         | RANK                 | WORLD_SIZE            | LOCAL_RANK                 |
| OpenMPI's mpirun              | OMPI_COMM_WORLD_RANK | OMPI_COMM_WORLD_SIZE  | OMPI_COMM_WORLD_LOCAL_RANK |
| PMIx (srun --mpi=pmix)        | PMIX_RANK            | (asked of MPI)        |                            |
| MPICH / Hydra (PMI)           | PMI_RANK             | PMI_SIZE              |                            |
| srun                          | SLURM_PROCID         | SLURM_STEP_NUM_TASKS  | SLURM_LOCALID              |

srun's MPI plugins give its tasks MPI variables too (--mpi=pmi2: PMI_RANK / PMI_SIZE; --mpi=pmix: PMIX_RANK), equal to
srun's own: `launched_by_srun` takes such a task for srun's, not for an mpirun's rank.

Not SLURM_NTASKS: a batch script has it too, for the whole job, where python runs as one process without srun.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Any of these means an MPI launcher started us (mpi4py then finds rank and size).
MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK")
# The process counts an MPI launcher (OpenMPI's mpirun, MPICH/Hydra) sets itself, unlike srun --mpi=pmix.
MPIRUN_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# How many processes the launcher started: the MPI launchers' own counts first (the ranks of an `mpirun` inside a
# Slurm job inherit the SLURM_STEP_NUM_TASKS of its daemons' step, one task per node), then srun's step size.
SIZE_VARS = (*MPIRUN_SIZE_VARS, "SLURM_STEP_NUM_TASKS")
# This process's rank, for log lines, in the order the launchers are tried.
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def launched_by_mpi(env: Mapping[str, str] = os.environ) -> bool:
    return any(v in env for v in MPI_VARS)


def launched_by_srun(env: Mapping[str, str] = os.environ) -> bool:
    """srun started this process as one task of its step: SLURM_PROCID and SLURM_STEP_NUM_TASKS, with any PMI / PMIx
    rank and size equal to them (srun's MPI plugins set those). The ranks of an mpirun inside a Slurm job inherit
    the SLURM_PROCID / SLURM_STEP_NUM_TASKS of the daemons that srun started (one per node), which are not theirs:
    OpenMPI's OMPI_COMM_WORLD_SIZE, or a PMI rank or size that differs, tells them apart."""
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env or "OMPI_COMM_WORLD_SIZE" in env:
        return False
    rank, size = env["SLURM_PROCID"], env["SLURM_STEP_NUM_TASKS"]
    return all(env.get(v, rank) == rank for v in ("PMI_RANK", "PMIX_RANK")) and env.get("PMI_SIZE", size) == size


def launcher_rank(env: Mapping[str, str] = os.environ) -> str | None:
    """This process's rank as its launcher set it, or None for a plain process."""
    return next((env[v] for v in RANK_VARS if v in env), None)
