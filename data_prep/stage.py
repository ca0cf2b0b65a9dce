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
        stage.keep_current(planned, finished, redo, "piece")  # resumed: finished tasks of changed bytes made again
        stage.run(map_task, [Task(...) for each of stage.share(items, size) not done yet], "examples", "B")
        stage.run(reduce_task, ..., "shards", "shard")
        ...                                              # rank 0 writes the record
        stage.close()

Only rank 0 looks at the folder and makes its folders, once; an error it finds there is raised on every rank
together (World.raise_together). Every task writes under a temporary name and renames (common.atomic), so a killed
run leaves only whole files: `--resume` keeps them and redoes the rest, provided the run's identity is the one
recorded (identity_difference).

Inputs are recognised by content. Each map task hashes the span of input bytes it reads (a Source, kept with its done
marker); a resumed run whose inputs' times moved since they were recorded (an input edited, or only touched) hashes
the spans its finished tasks read again and makes again those whose bytes differ (Stage.keep_current), so that the
result is always the bytes a clean run on the current inputs gives. A finished run's record keeps, per input, the
digest of those spans (recorded_inputs), checked the same way when the folder is met again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
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


# An input's modification and status-change times: when either moved since they were recorded, the bytes that
# finished tasks read from it are hashed again. The status-change time moves with every write and cannot be set back,
# so an edit whose mtime was restored (cp -p, rsync -t, os.utime) is looked at too.
_TIMES = ("mtime_ns", "ctime_ns")
_HASH_BLOCK = 1 << 20


def input_identity(files: Iterable[Path]) -> list[dict[str, Any]]:
    """What identifies the input files of a run, recorded in its folder and compared by --resume: each file's
    resolved path (the same files however they are named) and size, which must be the same, and its times (_TIMES),
    which decide whether its bytes are hashed again."""
    identity = []
    for f in files:
        status = f.stat()
        identity.append(
            {
                "path": str(f.resolve()),
                "bytes": status.st_size,
                "mtime_ns": status.st_mtime_ns,
                "ctime_ns": status.st_ctime_ns,
            }
        )
    return identity


@dataclass(frozen=True)
class Span:
    """Bytes [start, stop) of an input file as stored (of a compressed file: its compressed bytes); path resolved."""

    path: str
    start: int
    stop: int

    @classmethod
    def of(cls, path: str | Path, start: int | None = None, stop: int | None = None) -> Span:
        """Bytes [start, stop) of `path`; the whole file when start is None."""
        if start is None or stop is None:
            start, stop = 0, Path(path).stat().st_size
        return cls(str(Path(path).resolve()), start, stop)

    def sha256(self) -> str:
        """The sha256 of the span's bytes now (of fewer bytes if the file ends before `stop`)."""
        digest = hashlib.sha256()
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.start)
                left = self.stop - self.start
                while left > 0 and (block := f.read(min(_HASH_BLOCK, left))):
                    digest.update(block)
                    left -= len(block)
        except FileNotFoundError:
            raise DataPrepError(f"{self.path}: no such file or directory") from None
        return digest.hexdigest()


@dataclass(frozen=True)
class Source:
    """What a finished task read: a span of an input and the sha256 of its bytes then (recorded with its marker)."""

    span: Span
    sha256: str

    @classmethod
    def read(cls, span: Span) -> Source:
        """The span as it is now (hashed just before a task reads it)."""
        return cls(span, span.sha256())

    def to_json(self) -> dict[str, Any]:
        return {"path": self.span.path, "start": self.span.start, "stop": self.span.stop, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Source:
        return cls(Span(data["path"], data["start"], data["stop"]), data["sha256"])


def _joined(digests: Iterable[str]) -> str:
    """One digest for a file from its spans' digests, in order."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def recorded_inputs(inputs: list[dict[str, Any]], sources: Iterable[Source]) -> list[dict[str, Any]]:
    """The inputs as the record of a finished run keeps them: their identity (input_identity) plus "cuts" (where the
    spans its tasks read meet) and "sha256" (of those spans' digests, in order). A file that no task read whole (a
    multistream index, read while planning) is hashed whole now."""
    spans: dict[str, dict[Span, str]] = {}
    for source in sources:
        spans.setdefault(source.span.path, {})[source.span] = source.sha256
    recorded = []
    for entry in inputs:
        read = sorted(spans.get(entry["path"], {}).items(), key=lambda item: item[0].start)
        bounds = [0] + [span.stop for span, _ in read]
        if not read or [span.start for span, _ in read] != bounds[:-1] or bounds[-1] != entry["bytes"]:
            read = [(whole := Span(entry["path"], 0, entry["bytes"]), whole.sha256())]
        cuts = [span.stop for span, _ in read[:-1]]
        recorded.append({**entry, "cuts": cuts, "sha256": _joined(digest for _, digest in read)})
    return recorded


def _same_bytes(entry: dict[str, Any]) -> bool:
    """Whether an input recorded by recorded_inputs still holds the bytes it had (its spans hashed again)."""
    bounds = [0, *entry["cuts"], entry["bytes"]]
    return _joined(Span(entry["path"], a, b).sha256() for a, b in zip(bounds, bounds[1:])) == entry["sha256"]


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%d %H:%M:%S") + f".{ns % 10**9:09d} UTC"


def times_moved(was: dict[str, Any], now: dict[str, Any]) -> str | None:
    """How an input's times (_TIMES) moved since `was` recorded them, in words ("mtime ... then, ... now"); None when
    they did not, or were not recorded (a folder of an older albert-data)."""
    if any(key not in was for key in _TIMES) or all(was[key] == now[key] for key in _TIMES):
        return None
    if was["mtime_ns"] != now["mtime_ns"]:
        return f"mtime {_when(was['mtime_ns'])} then, {_when(now['mtime_ns'])} now"
    return f"mtime as it was, but ctime {_when(was['ctime_ns'])} then, {_when(now['ctime_ns'])} now"


def _compared(inputs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """What must be the same in the inputs of a run and of the one that recorded them: paths and sizes (a file of
    another size is not the same; one whose times moved is hashed again instead)."""
    return [{"path": entry["path"], "bytes": entry["bytes"]} for entry in inputs or []]


def identity_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between the identity recorded by a run and this run's, in words ("settings", "vocabulary",
    "inputs (PATH: 10 bytes then; PATH: 12 bytes now)", "package versions (numpy 1.26.4 then, 2.2.6 now)"); None when
    they are the same. An identity is a dict: "settings", "inputs" (input_identity: their paths and sizes compared),
    and what else decides the bytes of the outputs (a vocabulary's hash, "versions" of packages)."""
    keys = sorted(set(recorded) | set(current), key=lambda k: (k != "versions", k != "inputs", k != "settings", k))
    for key in keys:
        was, now = recorded.get(key), current.get(key)
        if key == "inputs":
            was_inputs, now_inputs = _compared(was), _compared(now)
            if was_inputs != now_inputs:
                return f"inputs ({_changed_inputs(was_inputs, now_inputs)})"
            continue
        if was == now:
            continue
        if key == "versions":
            was, now = was or {}, now or {}
            names = [name for name in sorted(set(was) | set(now)) if was.get(name) != now.get(name)]
            changed = "; ".join(f"{name} {was.get(name)} then, {now.get(name)} now" for name in names)
            return f"package versions ({changed[:500]})"
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


@dataclass(frozen=True)
class Opened:
    """What prepare_output found: a finished run of this identity (nothing to do), a new run, or an interrupted run
    to continue, with the inputs whose times moved since it recorded them (resolved path -> how, in words)."""

    finished: bool
    moved: dict[str, str] | None = None  # None: a new run


def prepare_output(
    folder: StageFolder, identity: dict[str, Any], resume: bool, finished_run: Callable[[], Finished]
) -> Opened:
    """Check and claim the output folder (rank 0): a finished run of this identity (its record's files all there), a
    new folder (folders made, identity recorded) or an interrupted run of the same work format and identity
    (temporary files of killed tasks removed; what its inputs' times say is for Stage.keep_current)."""
    out = folder.output
    if existing_output(out, resume):
        if (out / folder.record).exists() and not folder.work.exists():
            _check_finished(folder, identity, finished_run())
            return Opened(finished=True)
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
        moved = {
            now["path"]: how
            for was, now in zip(saved["inputs"], identity["inputs"])
            if (how := times_moved(was, now)) is not None
        }
        return Opened(finished=False, moved=moved)
    for path in [folder.sub(name) for name in folder.subfolders] or [folder.work]:
        path.mkdir(parents=True, exist_ok=True)
    write_json(folder.settings, {"work_format": folder.work_format, **identity})
    return Opened(finished=False)


def _check_finished(folder: StageFolder, identity: dict[str, Any], finished: Finished) -> None:
    """A finished folder met again by --resume: made from the same identity (an input whose times moved since:
    the same bytes, its spans hashed again; a record of an older version without them: its path and size), and
    every file its record lists there with its size (`albert-data verify` checks the contents of shards)."""
    out, record = folder.output, folder.record
    what = identity_difference(finished.identity, {key: identity.get(key) for key in finished.identity})
    if what:
        raise DataPrepError(f"{out}: already complete, but made with other {what} ({record}); choose another --output")
    for was, now in zip(finished.identity.get("inputs") or [], identity.get("inputs") or []):
        how = times_moved(was, now) if "sha256" in was else None
        if how is None:
            continue
        if not _same_bytes(was):
            raise DataPrepError(
                f"{out}: already complete, but made from other bytes of {now['path']} (modified since: {how}; its "
                f"sha256 differs from {record}'s); choose another --output, or remove the folder and run again"
            )
        log.info("%s: touched since %s was made (%s), the same bytes", now["path"], record, how)
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
    identity: dict[str, Any] = field(default_factory=dict)  # this run's (open)
    moved: dict[str, str] | None = None  # resumed: the inputs whose times moved since recorded (open); None: new

    def open(self, identity: dict[str, Any], resume: bool, finished_run: Callable[[], Finished]) -> bool:
        """prepare_output on rank 0; on every rank, its answer (True: finished already) or its error."""
        opened = self.world.run_on_rank0(lambda: prepare_output(self.folder, identity, resume, finished_run))
        self.identity, self.moved = identity, opened.moved
        return opened.finished

    def keep_current(
        self,
        planned: Callable[[], dict[str, Span]],
        finished: Callable[[], dict[str, Source]],
        redo: Callable[[list[str]], None],
        noun: str,
    ) -> None:
        """After planning, before any task (rank 0; the others wait): on a resumed run whose inputs' times moved,
        the finished tasks (`finished`: name -> what it read) whose result is not what this run's task would make (see
        `planned`: name -> what it would read now) go to `redo` by name: a task whose span is cut elsewhere now (or
        is not planned at all), or whose bytes differ now (only the spans of the inputs whose times moved are read
        again). `redo` removes first what was made from them (the outputs of later phases), then their done
        markers; a warning names each input and its tasks (`noun`: "piece"). Then this run's identity is recorded,
        with the times of the inputs checked. Nothing to do otherwise."""
        self.world.run_on_rank0(lambda: self._keep_current(planned, finished, redo, noun))

    def _keep_current(
        self,
        planned_now: Callable[[], dict[str, Span]],
        finished: Callable[[], dict[str, Source]],
        redo: Callable[[list[str]], None],
        noun: str,
    ) -> None:
        moved = self.moved
        if not moved:
            return
        stale: dict[str, list[tuple[str, str]]] = {}  # input -> its tasks to make again, each with its span
        kept: dict[str, int] = {}
        planned = planned_now()
        for name, source in sorted(finished().items()):
            path, span, was = source.span.path, planned.get(name), source.span
            if span != was:
                where = "not planned now" if span is None else f"bytes {span.start}-{span.stop} now"
                stale.setdefault(path, []).append((name, f"bytes {was.start}-{was.stop} then, {where}"))
            elif path in moved and span.sha256() != source.sha256:
                stale.setdefault(path, []).append((name, f"bytes {span.start}-{span.stop}"))
            else:
                kept[path] = kept.get(path, 0) + 1
        for path, how in moved.items():
            if path not in stale and kept.get(path):
                log.info(
                    "%s: touched since the interrupted run (%s); the bytes its %d finished %s(s) read are the same",
                    path,
                    how,
                    kept[path],
                    noun,
                )
        for path, tasks in stale.items():
            named = ", ".join(f"{name} ({span})" for name, span in tasks[:5]) + (" …" if len(tasks) > 5 else "")
            why = (
                f"modified since the interrupted run ({moved[path]})"
                if path in moved
                else f"cut into other {noun}s now (an input they are planned from changed)"
            )
            log.warning(
                "%s: %s: the bytes of %s %s differ; %d finished %s(s) made again, %d kept",
                path,
                why,
                noun,
                named,
                len(tasks),
                noun,
                kept.get(path, 0),
            )
        if stale:
            redo(sorted(name for tasks in stale.values() for name, _ in tasks))
        write_json(self.folder.settings, {"work_format": self.folder.work_format, **self.identity})

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
        """The run is finished (rank 0 wrote its record): once every rank is done reading them (the last phase's
        markers), rank 0 removes the work files."""
        self.world.barrier()
        if self.world.rank == 0:
            shutil.rmtree(self.folder.work, ignore_errors=True)
        self.world.barrier()
