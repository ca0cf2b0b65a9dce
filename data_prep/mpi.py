"""The set of cooperating processes: one plain process, or the ranks of an MPI job (mpirun / srun --mpi=pmix).

mpi4py is imported only when the environment says we run under MPI, so plain runs need no MPI library.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Variables set by the MPI launchers we support (OpenMPI's mpirun, PMIx under srun, MPICH/Hydra).
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK")


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _MPI_ENV)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    comm: Any = None

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def bcast(self, obj: Any) -> Any:
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def abort(self, code: int = 1) -> None:
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)


def get_world(mode: str = "auto") -> World:
    """mode: auto (MPI when launched by an MPI launcher), on (require MPI), off (single process)."""
    if mode == "off" or (mode == "auto" and not launched_by_mpi()):
        return World()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    world = World(comm.Get_rank(), comm.Get_size(), comm)
    if world.rank == 0:
        log.info("MPI: %d ranks", world.size)
    return world
