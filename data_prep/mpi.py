"""The set of cooperating processes: one plain process, or the ranks of an MPI job (mpirun / srun --mpi=pmix).

mpi4py is imported only when the environment says we run under a launcher, so plain runs need no MPI library.

Failures never leave ranks waiting: an error found on any rank at a point where all of them check
(`World.raise_together`) is raised on every rank at once (`SharedError`, each rank exits normally); any other exception on one rank of an MPI job (in a
task or not: a full disk in a mkdir, a killed worker) is logged in one line and ends every rank with MPI_Abort
(`World.abort_on_error` around the collective work, and an excepthook for whatever escapes it).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from common.launchers import SIZE_VARS, launched_by_mpi

from .errors import DataPrepError

log = logging.getLogger(__name__)


def launched_size() -> tuple[int, str] | None:
    """(number of processes, the variable that says so) when a launcher started us, else None."""
    for var in SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value), var
    return None


class SharedError(DataPrepError):
    """An error raised on every rank together (World.raise_together): no rank is left waiting."""


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

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (in rank order), None on the others."""
        return [obj] if self.comm is None else self.comm.gather(obj, root=0)

    def scatter(self, per_rank: list[Any] | None) -> Any:
        """Rank r gets per_rank[r] (a list given on rank 0)."""
        if self.comm is not None:
            return self.comm.scatter(per_rank, root=0)
        if per_rank is None:
            raise ValueError("World.scatter: rank 0 gives the list")
        return per_rank[0]

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` on every rank, in rank order."""
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def alltoallv(self, data: Any, counts: list[int]) -> tuple[Any, list[int]]:
        """A numpy array whose rows go to the ranks in turn (counts[r] rows to rank r), moved as a buffer (nothing
        pickled); returns the rows every rank sent here, in rank order, and how many came from each."""
        if self.comm is None:
            return data, list(counts)
        import numpy as np

        got = self.comm.alltoall([int(c) for c in counts])
        received = np.empty(sum(got), dtype=data.dtype)
        sent_at = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        got_at = np.concatenate(([0], np.cumsum(got)[:-1])).astype(np.int64)
        self.comm.Alltoallv(
            [np.ascontiguousarray(data), (list(counts), sent_at.tolist())], [received, (got, got_at.tolist())]
        )
        return received, got

    def raise_together(self, error: str | None) -> None:
        """Any rank's error message (None: no error; the lowest rank's first) raised as SharedError on every rank."""
        errors = [error] if self.comm is None else self.comm.allgather(error)
        first = next((e for e in errors if e), None)
        if first:
            raise SharedError(first)

    def run_on_rank0(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0 (work on shared files that one process does), its result on every rank; a DataPrepError it
        raises is raised on every rank (SharedError)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except DataPrepError as e:
                error = str(e)
        self.raise_together(error)
        return self.bcast(result)

    def abort(self, code: int = 1) -> None:
        if self.comm is not None and self.size > 1:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            self.comm.Abort(code)

    @contextmanager
    def abort_on_error(self) -> Iterator[None]:
        """Around collective work: an exception on this rank alone (anything but SharedError) is logged in one line
        and ends every rank (MPI_Abort), where the others would wait for this one forever. Single process: raised."""
        try:
            yield
        except SharedError:
            raise
        except BaseException as e:
            if self.comm is None or self.size == 1:
                raise
            what = str(e) if isinstance(e, DataPrepError) else f"{type(e).__name__}: {e}"
            log.error(
                "%s; stopping all %d ranks (MPI_Abort)", what, self.size, exc_info=not isinstance(e, DataPrepError)
            )
            self.abort(2 if isinstance(e, DataPrepError) else 1)
            raise

    def describe(self) -> str:
        """This rank's line for a job log: "[rank R] node N host H: MPI rank R of S"."""
        node = os.environ.get("SLURMD_NODENAME", "?")
        return f"[rank {self.rank}] node {node} host {socket.gethostname()}: MPI rank {self.rank} of {self.size}"


_mpi_world: World | None = None


def get_world(mode: str = "auto") -> World:
    """mode: auto (MPI when started by an MPI launcher: mpirun, srun --mpi=pmix), on (require MPI), off (single
    process; also `srun` tasks without an MPI plugin in auto mode: independent runs). The first call under MPI prints
    each rank's line (World.describe, for job logs) and refuses, on every rank, a world whose size is not the number
    of processes started (for mode on, srun's task count too): ranks that each ran alone would all do the whole work."""
    global _mpi_world
    if mode == "off" or (mode == "auto" and not launched_by_mpi()):
        return World()
    if _mpi_world is not None:  # MPI is initialised once per process: `prepare` and its shard step share the world
        return _mpi_world
    started = launched_size()
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DataPrepError(
            f"MPI is needed here (--mpi {mode}) but mpi4py cannot be imported ({e}); install mpi4py built against the launcher's MPI"
        ) from None

    comm = MPI.COMM_WORLD
    world = World(comm.Get_rank(), comm.Get_size(), comm)
    print(world.describe(), flush=True)
    if started is not None and world.size != started[0]:
        n, var = started
        raise DataPrepError(
            f"{var}={n}: {n} processes were started, but MPI sees a world of {world.size}"
            + (" (every process alone)" if world.size == 1 else "")
            + ": mpi4py is not built against the launcher's MPI (python -c 'import mpi4py; print(mpi4py.get_config())'),"
            " or srun ran without --mpi=pmix (`srun --mpi=list` shows the site's plugins; slurm/prep.sbatch: SRUN_MPI);"
            " for independent single-process runs, --mpi off"
        )
    if world.rank == 0:
        log.info("MPI: %d ranks", world.size)
    if world.size > 1:
        _abort_on_uncaught(world)
    _mpi_world = world
    return world


def _abort_on_uncaught(world: World) -> None:
    """An exception that escapes everything on one rank: its traceback as usual, then MPI_Abort for every rank."""
    previous = sys.excepthook

    def hook(kind, value, tb) -> None:
        previous(kind, value, tb)
        log.error("uncaught %s on rank %d: stopping all %d ranks (MPI_Abort)", kind.__name__, world.rank, world.size)
        world.abort(1)

    sys.excepthook = hook
