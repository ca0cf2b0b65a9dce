"""Run tasks in worker processes, one fresh forked process per task, and stop at the first failure.

Why not multiprocessing.Pool: its `imap_unordered` waits forever for a task whose process was killed (SIGKILL, the
kernel's OOM killer); concurrent.futures raises BrokenProcessPool but cannot say which task was lost. Here the
parent holds one pipe per running task: a task's process that dies without sending its result closes the pipe, the
parent sees it at once, ends the other running tasks and raises `TaskFailed`, one line naming the task, how its
process ended, and that `--resume` continues (finished tasks' files are kept: every task writes atomically).

A fresh process per task (also with one worker) hands the memory a task used back to the system when it ends, so
the peak does not creep up with the number of tasks. Each task's process is killed with its parent (Linux
PR_SET_PDEATHSIG): an MPI_Abort of the parent leaves no orphan still writing. A task's argument reaches its process
by the fork itself (nothing is pickled), so the tasks may also come from a generator that reads them from an input
as the run goes (a file that only one process can read, cleaned by the workers in chunks): the parent takes the
next task as soon as it has started one, so that its reading overlaps the tasks already running.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import signal
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from .errors import DataPrepError
from .progress import progress

log = logging.getLogger(__name__)

RESUME_HINT = "finished work is kept: run the same command with --resume to continue"


@dataclass(frozen=True)
class Task:
    name: str  # what a failure names, e.g. "piece f00001-p00002 (corpus-00001.txt bytes 0-8388608)"
    args: Any  # the task function's argument
    size: int = 1  # its share of the phase's progress (e.g. input bytes)


class TaskFailed(DataPrepError):
    """A task raised or its process died; the message names the task."""


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def _child(fn: Callable[[Any], Any], args: Any, conn: Connection) -> None:
    _die_with_parent()
    try:
        result = fn(args)
    except BaseException as e:
        detail = "" if isinstance(e, DataPrepError) else traceback.format_exc()
        conn.send(("error", f"{type(e).__name__}: {e}" if detail else str(e), detail))
    else:
        conn.send(("ok", result, ""))
    conn.close()


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode} without a result"


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Iterable[Task],
    workers: int,
    desc: str,
    bar: bool,
    every: float | None = None,
    unit: str = "task",
    total: int | None = None,
) -> list[Any]:
    """fn(task.args) for every task, at most `workers` at a time, each in its own forked process; the results in
    the order they finished. Progress as data_prep.progress shows it, counting Task.size in `unit` against `total`
    (default: the sum of the tasks' sizes; give it when `tasks` is a generator, which is then advanced one task ahead
    of the processes started). Raises TaskFailed at the first failure."""
    results: list[Any] = []
    if total is None:
        tasks = list(tasks)
        total = sum(t.size for t in tasks)
    source = iter(tasks)
    ahead = next(source, None)
    if ahead is None:
        return results
    ctx = multiprocessing.get_context("fork")
    running: dict[Connection, tuple[Task, Any]] = {}
    # The parent's objects go to the permanent generation: the tasks' garbage collections then do not touch (and
    # so copy) the pages they inherited.
    gc.collect()
    gc.freeze()
    try:
        with progress(desc, total, unit, bar, every) as shown:
            while ahead is not None or running:
                while ahead is not None and len(running) < max(1, workers):
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_child, args=(fn, ahead.args, send), daemon=True)
                    proc.start()
                    send.close()  # the child holds the only write end: its death closes the pipe
                    running[recv] = (Task(ahead.name, None, ahead.size), proc)  # (its argument is the child's now)
                    ahead = next(source, None)
                for conn in cast(list[Connection], wait(list(running), timeout=1.0)):
                    task, proc = running.pop(conn)
                    try:
                        status, value, detail = conn.recv()
                    except (EOFError, OSError):
                        proc.join()
                        raise TaskFailed(
                            f"{desc}: {task.name}: its worker process (pid {proc.pid}) {_how_it_ended(proc.exitcode)}; "
                            f"the run stopped; {RESUME_HINT}"
                        ) from None
                    finally:
                        conn.close()
                    proc.join()
                    if status == "error":
                        if detail:
                            log.error("%s: %s failed:\n%s", desc, task.name, detail.rstrip())
                        raise TaskFailed(f"{desc}: {task.name}: {value}; the run stopped; {RESUME_HINT}")
                    results.append(value)
                    shown.update(task.size)
                shown.update(0)
    finally:
        for _, proc in running.values():
            proc.kill()
        for conn, (_, proc) in running.items():
            proc.join()
            conn.close()
        gc.unfreeze()
    return results
