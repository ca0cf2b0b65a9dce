"""A resumable stage of `albert-data` (`corpus`, `shard`): map tasks that write work files, reduce tasks that make the
outputs from them, spread over worker processes (data_prep/tasks.py) and MPI ranks (data_prep/mpi.py).

    OUTPUT/                       the outputs, and the record of a finished run (manifest.json, .corpus.json)
    OUTPUT/.work/settings.json    the work files' format and the run's identity: its settings and inputs
    OUTPUT/.work/SUBFOLDER/       work files and done markers, one per finished task

A stage's run, the same on every rank:

    stage = Stage(StageFolder(output, "shard", WORK_FORMAT, MANIFEST, ("spill",)), world, workers, bar, every)
    with world.abort_on_error():
        if stage.open(identity, resume, finished_run):   # a finished run, checked: nothing to do
            return ...
        stage.run(map_task, [Task(...) for each of stage.share(items, size) not done yet], "examples", "B")
        stage.run(reduce_task, ..., "shards", "shard")
        ...                                              # rank 0 writes the record
        stage.close()

Only rank 0 looks at the folder and makes its folders, once; an error it finds there is raised on every rank
together (World.raise_together). Every task writes under a temporary name and renames (common.atomic), so a killed
run leaves only whole files: `--resume` keeps them and redoes the rest, provided the run's identity is the one
recorded (identity_difference).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.atomic import write_text
from common.output_lock import LockUnsupported, OutputInUse, OutputLock

from .errors import DataPrepError
from .mpi import World
from .tasks import Task, run_tasks

log = logging.getLogger(__name__)

WORK = ".work"
SETTINGS = "settings.json"
# How a difference in a run's identity is named in a message (other keys: their own name).
_NAMES = {"settings": "settings", "vocab_sha256": "vocabulary"}
Item = TypeVar("Item")


def input_identity(files: Iterable[Path]) -> list[dict[str, Any]]:
    """What identifies the input files of a run, recorded in its folder and compared by --resume: each file's
    resolved path (the same files however they are named) and size (a file rewritten in place is not the same)."""
    return [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files]


def identity_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between the identity recorded by a run and this run's, in words ("settings", "vocabulary",
    "inputs (PATH: 10 bytes then; PATH: 12 bytes now)", "package versions (numpy 1.26.4 then, 2.2.6 now)"); None when
    they are the same. An identity is a dict: "settings", "inputs" (input_identity), and what else decides the bytes
    of the outputs (a vocabulary's hash, "versions" of packages)."""
    keys = sorted(set(recorded) | set(current), key=lambda k: (k != "versions", k != "inputs", k != "settings", k))
    for key in keys:
        was, now = recorded.get(key), current.get(key)
        if was == now:
            continue
        if key == "versions":
            was, now = was or {}, now or {}
            names = [name for name in sorted(set(was) | set(now)) if was.get(name) != now.get(name)]
            changed = "; ".join(f"{name} {was.get(name)} then, {now.get(name)} now" for name in names)
            return f"package versions ({changed[:500]})"
        if key == "inputs":
            return f"inputs ({_changed_inputs(was or [], now or [])})"
        return _NAMES.get(key, key)
    return None


def _changed_inputs(was: list[dict[str, Any]], now: list[dict[str, Any]]) -> str:
    def facts(entry: dict[str, Any], when: str) -> str:
        return f"{entry['path']}: " + ", ".join(f"{v} {k}" for k, v in entry.items() if k != "path") + f" {when}"

    lines = [facts(e, "then") for e in was if e not in now] + [facts(e, "now") for e in now if e not in was]
    return "; ".join(lines)[:500]


def read_json(path: Path) -> Any:
    """A JSON file the stage wrote; one line naming the file if it is not JSON (edited, or not ours)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DataPrepError(f"{path}: not valid JSON ({e})") from None


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, sort_keys=True))


@dataclass(frozen=True)
class StageFolder:
    """The folders of one stage's output."""

    output: Path
    command: str  # the `albert-data` command that makes it, for messages
    work_format: int  # the layout of the work files; --resume refuses an interrupted run of another
    record: str  # the file whose presence (without .work) means a finished run, and what it was made from
    subfolders: tuple[str, ...]  # of .work, made once by rank 0

    @property
    def work(self) -> Path:
        return self.output / WORK

    @property
    def settings(self) -> Path:
        return self.work / SETTINGS

    def sub(self, name: str) -> Path:
        return self.work / name

    def marker(self, name: str) -> Path:
        """The done marker of a task (needs a "done" subfolder)."""
        return self.work / "done" / f"{name}.json"


@dataclass(frozen=True)
class Finished:
    """A finished run as its record describes it: its identity (the keys it records) and its files, each with its
    size where recorded (else None)."""

    identity: dict[str, Any]
    files: list[tuple[str, int | None]]


@contextmanager
def one_writer(out: Path, world: World) -> Iterator[None]:
    """One run per output for the length of a command: rank 0 holds an flock on `.NAME.lock` beside `out` (in its
    parent, so that the folder's own emptiness check is not disturbed); a second run is refused on every rank, naming
    the holder's host and pid. The kernel releases the lock when its holder dies, SIGKILL included."""
    lock, error = None, None
    if world.rank == 0:
        lock = OutputLock(out.parent, f".{out.name}.lock", label=str(out))
        try:
            lock.acquire()
        except (OutputInUse, LockUnsupported) as e:
            error = f"{e}; wait for it to end, or choose another output"
    world.raise_together(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def existing_output(out: Path, resume: bool) -> bool:
    """Whether `out` already holds something (a run to continue or check), which only --resume accepts: without it
    a non-empty folder is refused, nothing in it touched."""
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"{out}: exists and is not a folder")
    if not (out.exists() and any(out.iterdir())):
        return False
    if not resume:
        raise DataPrepError(
            f"{out}: folder is not empty; pass --resume to continue an interrupted run, or choose an empty folder"
        )
    return True


def prepare_output(
    folder: StageFolder, identity: dict[str, Any], resume: bool, finished_run: Callable[[], Finished]
) -> bool:
    """Check and claim the output folder (rank 0): True when it holds a finished run of this identity (its record's
    files all there), False when the tasks are to run: a new folder (folders made, identity recorded) or an
    interrupted run of the same work format and identity (temporary files of killed tasks removed)."""
    out = folder.output
    if existing_output(out, resume):
        if (out / folder.record).exists() and not folder.work.exists():
            _check_finished(folder, identity, finished_run())
            return True
        if not folder.settings.exists():
            raise DataPrepError(
                f"{out}: not an interrupted `albert-data {folder.command}` output (no {WORK}/{SETTINGS}); cannot resume"
            )
        saved = read_json(folder.settings)
        found = saved.pop("work_format", 1)  # (format 1 did not record it)
        if found != folder.work_format:
            raise DataPrepError(
                f"{out}: an interrupted run of another albert-data version (work files of format {found}, this "
                f"version writes {folder.work_format}) cannot be continued; remove the folder and run again"
            )
        what = identity_difference(saved, identity)
        if what:
            raise DataPrepError(
                f"{out}: --resume with other {what} than the interrupted run ({folder.settings}); "
                "run it with the same, or choose an empty folder"
            )
        # what killed tasks left half-written (their temporary names): one listing of each folder
        for place in (out, *(folder.sub(name) for name in folder.subfolders)):
            for leftover in place.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
        log.info("%s: resuming an interrupted run", out)
        return False
    for path in [folder.sub(name) for name in folder.subfolders] or [folder.work]:
        path.mkdir(parents=True, exist_ok=True)
    write_json(folder.settings, {"work_format": folder.work_format, **identity})
    return False


def _check_finished(folder: StageFolder, identity: dict[str, Any], finished: Finished) -> None:
    """A finished folder met again by --resume: made from the same identity, and every file its record lists there
    with its size (`albert-data verify` checks the contents of shards)."""
    out, record = folder.output, folder.record
    what = identity_difference(finished.identity, {key: identity.get(key) for key in finished.identity})
    if what:
        raise DataPrepError(f"{out}: already complete, but made with other {what} ({record}); choose another --output")
    missing = [
        name
        for name, size in finished.files
        if not (out / name).is_file() or size not in (None, (out / name).stat().st_size)
    ]
    if missing:
        raise DataPrepError(
            f"{out}: {record} lists files that are missing or of another size: {', '.join(missing[:5])}"
            f"{' …' if len(missing) > 5 else ''}; remove the folder and run again"
        )


@dataclass
class Stage:
    """One process's part in a run of a stage."""

    folder: StageFolder
    world: World
    workers: int  # processes per rank
    bar: bool  # progress bars (a terminal, rank 0)
    every: float | None  # else a progress line every this many seconds (data_prep/progress.py)

    def open(self, identity: dict[str, Any], resume: bool, finished_run: Callable[[], Finished]) -> bool:
        """prepare_output on rank 0; on every rank, its answer (True: finished already) or its error."""
        return self.world.run_on_rank0(lambda: prepare_output(self.folder, identity, resume, finished_run))

    def share(self, items: list[Item], size: Callable[[Item], int]) -> list[Item]:
        """This rank's share of the items: the biggest first, dealt round-robin to the ranks (ties in their order)."""
        order = sorted(range(len(items)), key=lambda k: (-size(items[k]), k))
        return [items[k] for n, k in enumerate(order) if n % self.world.size == self.world.rank]

    def run(
        self,
        fn: Callable[[Any], Any],
        tasks: Iterable[Task],
        desc: str,
        unit: str = "task",
        total: int | None = None,
        then: Callable[[], None] | None = None,
    ) -> list[Any]:
        """This rank's tasks of a phase (run_tasks: one process each, a failure names its task), then `then` (what
        this rank records of them), then a barrier. Run it inside World.abort_on_error: a failure on one rank ends
        every rank instead of leaving them at the barrier."""
        results = run_tasks(fn, tasks, self.workers, desc, self.bar, self.every, unit, total)
        if then is not None:
            then()
        self.world.barrier()
        return results

    def close(self) -> None:
        """The run is finished (rank 0 wrote its record): rank 0 removes the work files."""
        if self.world.rank == 0:
            shutil.rmtree(self.folder.work, ignore_errors=True)
        self.world.barrier()
