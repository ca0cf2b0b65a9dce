"""Logging set-up shared by every command: one format, the rank in each line where several processes write."""

from __future__ import annotations

import logging

from .launchers import launched_by_mpi, launcher_rank


def setup_logging(verbose: bool = False, rank: str | None = None) -> None:
    """INFO (DEBUG with `verbose`) to stderr. `rank` goes into every line when given; by default the MPI rank
    when an MPI launcher started this process, else none."""
    if rank is None and launched_by_mpi():
        rank = launcher_rank()
    where = "" if rank is None else f"[rank {rank}] "
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
