"""`python tests/helpers/shard_fault.py --fault FAULT ALBERT-DATA-ARGS...`: `albert-data` with a fault injected from the
outside (the project's code has no fault hooks). FAULT is one of:
- `kill-piece:NAME`: the map task of piece NAME (e.g. f00001-p00000) kills its own process with SIGKILL, as the
  kernel's OOM killer would;
- `raise-piece:NAME`: the map task of piece NAME raises OSError ENOSPC (a full disk);
- `kill-shard:N`: the reduce task of shard N kills its own process with SIGKILL;
- `kill-first-piece-on-rank:R`: the first map task that MPI rank R runs kills its own process with SIGKILL;
- `raise-on-rank:R`: MPI rank R fails outside any task, before the map phase (OSError EDQUOT, as a full quota
  would), while the other ranks go on to their work;
- `kill-corpus:NAME`: the `corpus` task NAME kills its own process with SIGKILL: a part (p000003), a chunk of a
  streamed part (p000001-c00002), the hash of a streamed part's file (p000001-source), a deduplicated part
  (p000001-d) or an output file (out-00001);
- `slow-markers-on-rank:R`: MPI rank R of `corpus` reads each output file's done marker a second late (a slow
  shared file system), after the other ranks have read theirs.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_prep import cli, corpus, sharding  # noqa: E402

RANK = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/.work/spill/f00001-p00000.bin")


def fail_map(when, fail) -> None:
    real = sharding._map_piece

    def map_piece(task):
        if when(task[0]):
            fail()
        return real(task)

    sharding._map_piece = map_piece


def kill_reduce(shard: int) -> None:
    real = sharding._reduce_shard

    def reduce_shard(task):
        if task.shard == shard:
            _kill_self()
        return real(task)

    sharding._reduce_shard = reduce_shard


def raise_on_rank(rank: int) -> None:
    real = sharding._pieces

    def pieces(*args, **kwargs):
        if RANK == rank:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "out/.work/spill")
        return real(*args, **kwargs)

    sharding._pieces = pieces


def kill_corpus(name: str) -> None:
    """The corpus task NAME dies; its task functions take (kind, args) (phase 1), (files, decisions, digest, folder,
    part) (dedup) or (segments, file, marker)."""
    part_task, write_output, write_screened = corpus._part_task, corpus._write_output, corpus._write_screened

    def task_name(kind: str, args) -> str:
        if kind == "chunk":
            return args[2]
        return args[0].name + ("-source" if kind == "source" else "")

    def part(task):
        if task_name(*task) == name:
            _kill_self()
        return part_task(task)

    def output(task):
        if Path(task[2]).stem == name:
            _kill_self()
        return write_output(task)

    def screened(task):
        if task[4] + "-d" == name:
            _kill_self()
        return write_screened(task)

    corpus._part_task, corpus._write_output, corpus._write_screened = part, output, screened


def slow_markers(rank: int) -> None:
    real = corpus.read_json

    def read_json(path):
        if RANK == rank and Path(path).stem.startswith("out-"):
            time.sleep(1)
        return real(path)

    corpus.read_json = read_json


def main() -> int:
    argv = sys.argv[1:]
    i = argv.index("--fault")
    kind, _, value = argv[i + 1].partition(":")
    del argv[i : i + 2]
    if kind == "kill-piece":
        fail_map(lambda piece: piece.name == value, _kill_self)
    elif kind == "raise-piece":
        fail_map(lambda piece: piece.name == value, _disk_full)
    elif kind == "kill-first-piece-on-rank":
        fail_map(lambda piece: RANK == int(value), _kill_self)  # every task of that rank: its first stops the run
    elif kind == "kill-shard":
        kill_reduce(int(value))
    elif kind == "raise-on-rank":
        raise_on_rank(int(value))
    elif kind == "kill-corpus":
        kill_corpus(value)
    elif kind == "slow-markers-on-rank":
        slow_markers(int(value))
    else:
        raise SystemExit(f"unknown fault {kind!r}")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
