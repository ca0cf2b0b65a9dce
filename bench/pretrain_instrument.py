"""Run `albert-pretrain` in this process, instrumented from the outside, and write what it measured as JSON.

    python bench/pretrain_instrument.py [--instrument-out FILE] [--deterministic-from STEP] -- <albert-pretrain arguments>

It imports pipeline.pretrain, wraps `setup` (nothing in pipeline/ is edited or told), and calls
`pipeline.pretrain.main(argv)`, so the run is the real command with its real loop. After `setup` returns, the
engine's `step` and `backward` are wrapped on the instance:

- an optimizer step is one increment of `engine.global_steps` (the loop calls `engine.step()` after every
  micro-batch; DeepSpeed updates at the accumulation boundary only), so the "window" of step s is everything the
  process did between the end of step s-1's `engine.step()` and the end of step s's: step s's forward, backward
  and update, and whatever the loop did after step s-1 (logging, saving, evaluating);
- host syncs per window, on CUDA: `torch.cuda.set_sync_debug_mode("warn")` makes torch warn at every
  synchronizing CUDA call (`.item()`, `.tolist()`, blocking copies to the host, `nonzero`, ...) with the text in
  SYNC_WARNING; the warnings are counted through `warnings.showwarning` (a filter that shows every one of them is
  put first, ahead of albert-pretrain's own filters, which would hide the ones raised inside torch.distributed).
  That mode does not warn for `torch.cuda.synchronize()` or `Event.synchronize()` (c10's device_synchronize and
  CUDAEvent::synchronize never call warn_or_error_on_sync), so those are wrapped and counted too (DeepSpeed's
  throughput timer calls torch.cuda.synchronize at every micro-batch unless its config turns it off). Syncs made
  by other Python threads (the loader's prefetch thread) do not stop the training loop and are listed apart;
  the autograd engine's threads (backward hooks) count as the loop's;
- the loss handed to every `engine.backward` (kept on the device, read once at the end);
- the time of every boundary (host clock), peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS),
  the optimizer albert-pretrain chose (its Run.optimizer, as "optimizer_kind"), the optimizer DeepSpeed wraps and
  its wrapper, and the log lines that say which optimizer, attention kernel (the SDPA kernel line) and compile
  setting run.

With --deterministic-from STEP, `torch.use_deterministic_algorithms(True)` is switched on at the boundary of
that step (at once when the run resumes at or after it), and CUBLAS_WORKSPACE_CONFIG=:4096:8 is set before
torch loads: a run and its resumed copy compute the steps after STEP with deterministic kernels, so their losses
can be compared bit for bit (the flash and memory-efficient attention backward kernels, for one, are
deterministic only then). Windows from STEP on are not counted as production steps.

The JSON (default OUTPUT/instrument.json) holds the raw windows and a summary: syncs per optimizer step over the
"clean" steps (clean_steps: not among the first two steps of this process, not a logging, saving or evaluation
step nor the step after one, not the final step, and before --deterministic-from). Exit code: albert-pretrain's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import statistics
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The text of torch's warning (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync, under set_sync_debug_mode("warn")).
SYNC_WARNING = "called a synchronizing CUDA operation"
REPO = Path(__file__).resolve().parents[1]


def short_source(filename: str, lineno: int) -> str:
    """'deepspeed/runtime/engine.py:2946' for a file under site-packages, 'pipeline/pretrain.py:470' in the repository."""
    path = filename.replace(os.sep, "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        try:
            path = Path(filename).resolve().relative_to(REPO).as_posix()
        except ValueError:
            path = Path(filename).name
    return f"{path}:{lineno}"


def _caller_source(skip: Iterable[str] = ("torch/cuda/", "deepspeed/accelerator/", "pretrain_instrument.py")) -> str:
    """The first frame outside torch.cuda, DeepSpeed's accelerator shim and this file: who asked for the sync."""
    frame = sys._getframe(1)
    while frame is not None:
        src = short_source(frame.f_code.co_filename, frame.f_lineno)
        if not any(s in src for s in skip):
            return src
        frame = frame.f_back
    return "?"


@dataclass
class Window:
    """What happened between two optimizer-step boundaries; `step` is the step that ended it."""

    step: int
    seconds: float
    syncs: dict[str, int] = field(default_factory=dict)  # source -> count, syncs that block the training loop
    background: dict[str, int] = field(default_factory=dict)  # syncs made by other Python threads
    deterministic: bool = False

    @property
    def count(self) -> int:
        return sum(self.syncs.values())


class SyncCounter:
    """Counts host syncs between optimizer-step boundaries (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.windows: list[Window] = []
        self._syncs: Counter[str] = Counter()
        self._background: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()  # depth of wrapped explicit syncs on this thread
        self._started = clock()
        self._installed: list[tuple[Any, str, Any]] = []
        self._showwarning: Any = None
        self._main = threading.main_thread()
        self._installed_filter: Any = None
        self.deterministic = False

    # -- recording

    def record(self, source: str) -> None:
        thread = threading.current_thread()
        # Python threads other than the main one (the loader's prefetch thread) do not stop the loop; threads that
        # Python did not start (the autograd engine's, running backward hooks) show up as _DummyThread and do.
        loop = thread is self._main or isinstance(thread, threading._DummyThread)
        with self._lock:
            if loop:
                self._syncs[source] += 1
            else:
                self._background[f"{source} [{thread.name}]"] += 1

    def boundary(self, step: int) -> Window:
        """Close the window that step `step` ended."""
        now = self.clock()
        with self._lock:
            window = Window(step, now - self._started, dict(self._syncs), dict(self._background), self.deterministic)
            self._syncs.clear()
            self._background.clear()
        self._started = now
        self.windows.append(window)
        return window

    def restart(self) -> None:
        """Forget what happened so far (set-up) and start the first window now."""
        with self._lock:
            self._syncs.clear()
            self._background.clear()
        self._started = self.clock()

    # -- hooks

    def install(self, explicit: bool = True) -> None:
        """Count torch's sync warnings (and, with `explicit`, calls of torch.cuda.synchronize and Event/Stream.synchronize)."""
        self._ensure_filter()
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._show
        if explicit:
            import torch

            self._wrap(torch.cuda, "synchronize")
            self._wrap(torch.cuda.Event, "synchronize")
            self._wrap(torch.cuda.Stream, "synchronize")  # its own warning (stream_synchronize) is not counted twice

    def uninstall(self) -> None:
        if self._showwarning is not None:
            warnings.showwarning = self._showwarning
            self._showwarning = None
        for owner, name, original in reversed(self._installed):
            setattr(owner, name, original)
        self._installed.clear()

    def _ensure_filter(self) -> None:
        """Every sync warning shown (so counted), whatever filters the program added since: ours goes first again.
        Called at every micro-step, so a filter added while training hides syncs until the next micro-step at most."""
        if not self._installed_filter or not warnings.filters or warnings.filters[0] != self._installed_filter:
            warnings.filterwarnings("always", message=".*" + SYNC_WARNING, category=UserWarning)
            self._installed_filter = warnings.filters[0]

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if SYNC_WARNING in str(message):
            if not getattr(self._local, "depth", 0):  # inside a wrapped explicit sync: counted there
                self.record(short_source(filename, lineno))
            return
        self._showwarning(message, category, filename, lineno, file, line)

    def _wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        counter = self

        @functools.wraps(original)
        def synchronize(*args, **kwargs):
            if not getattr(counter._local, "depth", 0):
                counter.record(_caller_source() + f" ({name})")
            counter._local.depth = getattr(counter._local, "depth", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._local.depth -= 1

        setattr(owner, name, synchronize)
        self._installed.append((owner, name, original))


def clean_steps(
    first_step: int,
    last_step: int,
    log_interval: int,
    save_interval: int,
    eval_interval: int,
    deterministic_from: int | None = None,
    skip_first: int = 2,
) -> list[int]:
    """The steps whose window is an ordinary production step: not among the first `skip_first` of this process
    (first_step is the first step it trains), not a logging, saving or evaluation step nor the step right after
    one (the loop logs, saves and evaluates after a step's boundary, so that work lands in the next window), not
    the final step (logged and saved), and before `deterministic_from`."""

    def busy(s: int) -> bool:
        return (
            s % log_interval == 0
            or s % save_interval == 0
            or bool(eval_interval and s % eval_interval == 0)
            or s >= last_step
        )

    steps = []
    for s in range(first_step + skip_first, last_step + 1):
        if busy(s) or (s - 1 >= first_step and busy(s - 1)):
            continue
        if deterministic_from is not None and s > deterministic_from:
            continue
        steps.append(s)
    return steps


OUR_CODE = ("pipeline/", "data_prep/")  # sources of the syncs our own code makes (the rest: DeepSpeed, torch)


def summarize_windows(windows: list[Window], steps: list[int]) -> dict[str, Any]:
    """Syncs per optimizer step over `steps` (max, mean, per source), and their mean duration."""
    chosen = [w for w in windows if w.step in set(steps)]
    if not chosen:
        return {"steps": [], "max": None, "mean": None, "per_step_by_source": {}, "seconds_mean": None}
    by_source: Counter[str] = Counter()
    for w in chosen:
        by_source.update(w.syncs)
    counts = [w.count for w in chosen]
    ours = [sum(n for source, n in w.syncs.items() if source.startswith(OUR_CODE)) for w in chosen]
    return {
        "steps": [w.step for w in chosen],
        "max": max(counts),
        "ours_max": max(ours),
        "mean": statistics.fmean(counts),
        "per_step_by_source": {k: v / len(chosen) for k, v in by_source.most_common()},
        "seconds_mean": statistics.fmean(w.seconds for w in chosen),
        "seconds_median": statistics.median(w.seconds for w in chosen),
    }


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which belongs to the address space exec made (getrusage's
    ru_maxrss also counts the parent's memory at the fork that started us)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LogLines(logging.Handler):
    """Keeps albert-pretrain's log lines that say which paths run (optimizer, attention kernel, compile)."""

    MARKERS = ("optimizer: ", "SDPA kernel", "attention: ", "torch.compile: ", "LAMB: ", "TF32: ")

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            message = record.getMessage()
            if any(m in message for m in self.MARKERS):
                self.lines.append(message)


class Instrument:
    """The instrumentation of one albert-pretrain process."""

    def __init__(self, deterministic_from: int | None = None, count_syncs: bool | None = None):
        self.deterministic_from = deterministic_from
        self.count_syncs = count_syncs
        self.counter = SyncCounter()
        self.losses: list[tuple[int, Any]] = []  # (step being computed, loss tensor on the device)
        self.start_step: int | None = None
        self.info: dict[str, Any] = {}
        self.log_lines = LogLines()

    def attach(self, engine: Any) -> None:
        """Wrap `engine.step` and `engine.backward` (on the instance) and start counting."""
        import torch

        real_step, real_backward = engine.step, engine.backward
        instrument = self
        self.start_step = int(engine.global_steps)
        device = torch.device(getattr(engine, "device", "cpu"))
        if self.count_syncs is None:
            self.count_syncs = device.type == "cuda"
        wrapper = getattr(engine, "optimizer", None)
        client = getattr(wrapper, "optimizer", wrapper)
        self.info.update(
            device=str(device),
            optimizer=type(client).__name__ if client is not None else None,
            optimizer_wrapper=type(wrapper).__name__ if wrapper is not None else None,
        )

        def step(*args, **kwargs):
            if instrument.count_syncs:
                instrument.counter._ensure_filter()
            before = engine.global_steps
            result = real_step(*args, **kwargs)
            if engine.global_steps != before:
                instrument.on_boundary(int(engine.global_steps))
            return result

        def backward(loss, *args, **kwargs):
            if instrument.count_syncs:
                instrument.counter._ensure_filter()
            instrument.losses.append((int(engine.global_steps) + 1, loss.detach().clone()))
            return real_backward(loss, *args, **kwargs)

        engine.step, engine.backward = step, backward
        if self.deterministic_from is not None and self.start_step >= self.deterministic_from:
            self.set_deterministic()
        if self.count_syncs:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            self.counter.install(explicit=device.type == "cuda")
        self.counter.restart()

    def on_boundary(self, step: int) -> None:
        self.counter.boundary(step)
        if self.deterministic_from is not None and step == self.deterministic_from:
            self.set_deterministic()

    def set_deterministic(self) -> None:
        import torch

        torch.use_deterministic_algorithms(True)
        if hasattr(torch.utils, "deterministic"):
            torch.utils.deterministic.fill_uninitialized_memory = (
                False  # filling every torch.empty would only cost time
            )
        self.counter.deterministic = True

    def finish(self) -> None:
        import torch

        if self.count_syncs and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self.counter.uninstall()

    def loss_values(self) -> dict[int, list[float]]:
        """step -> the losses of its micro-batches, as exact Python floats (read from the device once, here)."""
        import torch

        if not self.losses:
            return {}
        values = torch.stack([t.double().reshape(()) for _, t in self.losses]).cpu().tolist()
        out: dict[int, list[float]] = {}
        for (step, _), v in zip(self.losses, values, strict=True):
            out.setdefault(step, []).append(v)
        return out

    def result(self, pretrain_args: Any, returncode: int | None, error: str | None) -> dict[str, Any]:
        import torch

        windows = self.counter.windows
        last = windows[-1].step if windows else None
        steps: list[int] = []
        if self.start_step is not None and last is not None:
            steps = clean_steps(
                self.start_step + 1,
                int(pretrain_args.max_steps),
                int(pretrain_args.log_interval),
                int(pretrain_args.save_interval),
                int(pretrain_args.eval_interval),
                self.deterministic_from,
            )
        summary = summarize_windows(windows, steps)
        if not self.count_syncs:
            summary.update(max=None, mean=None, per_step_by_source={})
        if torch.cuda.is_available() and self.info.get("device", "").startswith("cuda"):
            memory, memory_kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
        else:
            memory, memory_kind = peak_rss(), "peak RSS"
        try:
            losses = {str(k): v for k, v in self.loss_values().items()}
        except Exception as e:  # noqa: BLE001 - a failed run may leave the device unusable; the losses are then lost
            losses, error = {}, error or f"reading the losses: {type(e).__name__}: {e}"
        return {
            "returncode": returncode,
            "error": error,
            "start_step": self.start_step,
            "final_step": last,
            "deterministic_from": self.deterministic_from,
            "counted_syncs": bool(self.count_syncs),
            "syncs": summary,
            "losses": losses,
            "peak_memory_bytes": int(memory),
            "memory_kind": memory_kind,
            "log_lines": self.log_lines.lines,
            "windows": [asdict(w) for w in windows],
            **self.info,
        }


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit(
            "pretrain_instrument: usage: pretrain_instrument.py [--instrument-out FILE] [--deterministic-from STEP] -- <albert-pretrain args>"
        )
    cut = argv.index("--")
    p = argparse.ArgumentParser(
        prog="pretrain_instrument", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--instrument-out",
        type=Path,
        default=None,
        help="the JSON (default: the run's --output folder/instrument.json)",
    )
    p.add_argument(
        "--deterministic-from", type=int, default=None, help="deterministic kernels from this step's boundary on"
    )
    return p.parse_args(argv[:cut]), argv[cut + 1 :]


def main(argv: list[str] | None = None) -> int:
    args, pretrain_argv = parse_args(argv)
    if args.deterministic_from is not None:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS when its handle is made: set first
    import pipeline.pretrain as pretrain

    pretrain_args = pretrain.parse_args(pretrain_argv)
    out = args.instrument_out or pretrain_args.output / "instrument.json"
    instrument = Instrument(args.deterministic_from)
    real_setup = pretrain.setup

    def setup(a):
        # main() has configured logging by now (a handler added earlier would stop its basicConfig)
        logging.getLogger().addHandler(instrument.log_lines)
        run = real_setup(a)
        instrument.info["optimizer_kind"] = run.optimizer.value
        instrument.attach(run.engine)
        return run

    pretrain.setup = setup
    returncode, error = None, None
    try:
        returncode = pretrain.main(pretrain_argv)
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        returncode = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        raise
    finally:
        pretrain.setup = real_setup
        instrument.finish()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(instrument.result(pretrain_args, returncode, error), indent=1) + "\n")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
