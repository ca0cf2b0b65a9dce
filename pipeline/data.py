"""Pretraining batches from a shard folder: disjoint per rank, shuffled by (seed, epoch), prefetched,
and resumable at the exact micro-batch.

The order of an epoch:
1. every shard is cut into blocks of BLOCK rows (the HDF5 chunk size, so a block is read whole);
   the blocks of all shards are permuted by (seed, epoch) into one virtual sequence of N rows;
2. rank r takes the contiguous range [r * (N // world), (r + 1) * (N // world)) of that sequence, so each
   rank reads only its own ~1/world of the data and the shares are disjoint;
3. the range is read one window (about `window` rows) at a time, and each window is shuffled by
   (seed, epoch, rank, window). Memory holds a few windows, never a whole shard.

Unmasked shards (`albert-data shard --masking dynamic`) are masked there, window by window, each example by (seed,
epoch, its global id) (pipeline/masking.py), so its mask does not depend on the ranks, the plan or a resume.

A background thread prepares the next window while the training loop consumes the current one (see `prefetch`
in PretrainingData); with `pin_memory` the batches are in page-locked memory, so the loop's
`.to(device, non_blocking=True)` copies run asynchronously.

An epoch yields the same number of micro-batches on every rank (whole optimizer steps; the remainder,
fewer than one global batch, is left out and counted). The loader's position is (epoch, micro-batch):
`state_dict()` goes into the checkpoint, and `load_state_dict()` continues with the very next example.

Another number of ranks or micro-batch size (the same global batch) within an epoch: the position also names the
plan it counts in (ranks, micro-batch, window). A loader with another plan takes the rows of the epoch that the
saved plan had not handed out yet (in the order of the virtual sequence) and cuts them for its own ranks by the same
rule (windows shuffled by (seed, epoch, rank, window, depth)), so each of them is seen exactly once; a further change
in the same epoch applies the rule again to what is still unseen. The next epoch is the plain layout. Those rows are
kept as runs of the virtual sequence (whole ranges, and about one run per unseen row of each old rank's window in
progress), never as one index per row of the epoch.

Skips (pipeline/data_skips.py): rows left out, the batches of an anomalous step and a margin after it, or every row of
a shard that became unreadable. A skip ends the plan in progress at its position like a change of plan does, and the
rest, less the skipped rows, is cut anew; the layout of an epoch (blocks and their order) never changes, so every
saved position keeps its meaning. A shard unreadable at start-up (with skip_bad_shards) is skipped in the same way.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from data_prep.shards import FIELDS, Manifest, stored_fields

from . import data_skips
from .masking import Masker, MaskOverrides, MaskSettings

log = logging.getLogger(__name__)

BLOCK = 1024
DEFAULT_WINDOW = 8192  # rows shuffled together (rounded down to whole micro-batches)
READ_GAP = 64  # rows: runs of a window closer than this are read as one range


class DataError(Exception):
    """A shard folder that cannot be used; the message names the file (`path`, where one shard is the problem)."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Plan:
    """How an epoch is cut among the ranks: what a position (micro-batches handed out per rank) counts in."""

    world: int
    micro: int
    window: int  # rows shuffled together, a multiple of micro


@dataclass
class LoaderState:
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of the current plan of this epoch already handed to the training loop
    # earlier plans of this epoch, each with the micro-batches it handed out ({world, micro, window, micro_batch}):
    # empty unless the run came back with another plan in the middle of the epoch
    # ({..., "removed": [skip ids]} where skips ended that plan: pipeline/data_skips.py)
    earlier: list[dict] = field(default_factory=list)

    def copy(self) -> LoaderState:
        return LoaderState(self.epoch, self.micro_batch, [dict(e) for e in self.earlier])


class Runs:
    """A sorted set of rows of the virtual sequence as runs (start, length); position i = the i-th row of the set."""

    def __init__(self, starts: np.ndarray, lengths: np.ndarray):
        keep = lengths > 0
        self.starts, self.lengths = starts[keep].astype(np.int64), lengths[keep].astype(np.int64)
        self.ends = np.cumsum(self.lengths)  # position after each run

    @classmethod
    def whole(cls, n: int) -> Runs:
        return cls(np.array([0]), np.array([n]))

    @classmethod
    def of_sorted(cls, rows: np.ndarray) -> Runs:
        """Runs of a sorted array of distinct rows."""
        if not len(rows):
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        firsts = np.concatenate([[0], breaks])
        return cls(rows[firsts], np.diff(np.concatenate([firsts, [len(rows)]])))

    @classmethod
    def concat(cls, parts: list[Runs]) -> Runs:
        """Union of sets given in increasing order, adjacent runs merged."""
        starts = np.concatenate([p.starts for p in parts]) if parts else np.zeros(0, np.int64)
        lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
        if len(starts) < 2:
            return cls(starts, lengths)
        joined = starts[1:] == starts[:-1] + lengths[:-1]
        heads = np.concatenate([[0], np.flatnonzero(~joined) + 1])
        return cls(starts[heads], np.add.reduceat(lengths, heads))

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def slice(self, lo: int, hi: int) -> Runs:
        """The rows at positions [lo, hi)."""
        if hi <= lo:
            return Runs(np.zeros(0, np.int64), np.zeros(0, np.int64))
        a = int(np.searchsorted(self.ends, lo, side="right"))
        b = int(np.searchsorted(self.ends, hi, side="left")) + 1
        starts, lengths = self.starts[a:b].copy(), self.lengths[a:b].copy()
        skip = lo - (int(self.ends[a - 1]) if a else 0)
        starts[0] += skip
        lengths[0] -= skip
        lengths[-1] -= int(self.ends[b - 1]) - hi
        return Runs(starts, lengths)

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The rows at these positions."""
        run = np.searchsorted(self.ends, positions, side="right")
        return self.starts[run] + positions - (self.ends[run] - self.lengths[run])

    def without(self, other: Runs) -> Runs:
        """The rows of this set that are not in `other`, as runs."""
        if not other.total or not self.total:
            return self
        a_end, b_end = self.starts + self.lengths, other.starts + other.lengths
        points = np.unique(np.concatenate([self.starts, a_end, other.starts, b_end]))
        lo, width = points[:-1], np.diff(points)  # elementary pieces [lo, lo + width): each wholly in or out of a set

        def covered(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
            run = np.searchsorted(starts, lo, side="right") - 1
            return (run >= 0) & (lo < ends[np.maximum(run, 0)])

        keep = covered(self.starts, a_end) & ~covered(other.starts, b_end)
        return Runs.concat([Runs(lo[keep], width[keep])])


@dataclass(frozen=True)
class _Shard:
    path: Path
    rows: int
    first_id: int = 0  # global id of its row 0: the rows of the shards before it in the manifest


def _open_shard(path: Path) -> h5py.File:
    # Read-only and without HDF5's file lock: on Lustre and NFS, flock() is slow, unsupported (the open fails) or
    # refused while another job has the file open for writing; shards are never modified while being read.
    return h5py.File(path, "r", locking=False)


def _check_shard(path: Path, rows: int, seq_len: int, fields: tuple[str, ...] = FIELDS) -> str | None:
    """Cheap start-up check (metadata, first and last row): the problem, or None."""
    try:
        with _open_shard(path) as f:
            if missing := [name for name in fields if name not in f]:
                return f"dataset {missing[0]} missing"
            for name in fields:
                if f[name].shape[0] != rows:
                    return f"{name} has {f[name].shape[0]} rows, manifest says {rows}"
            if f["input_ids"].shape[1] != seq_len:
                return f"sequence length {f['input_ids'].shape[1]}, manifest says {seq_len}"
            if rows:
                for name in fields:
                    f[name][0], f[name][rows - 1]
    except (OSError, KeyError, ValueError) as e:
        return f"unreadable ({e})"
    return None


class PretrainingData:
    def __init__(
        self,
        folder: Path,
        micro_batch_size: int,
        grad_accum: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        window: int = DEFAULT_WINDOW,
        prefetch: int = 1,
        skip_bad_shards: bool = False,
        pin_memory: bool = False,
        masking: MaskOverrides | None = None,
    ):
        self.folder = Path(folder)
        try:
            self.manifest = Manifest.load(self.folder)
        except Exception as e:  # data_prep raises DataPrepError; the engine reports DataError
            raise DataError(str(e)) from None
        attrs = self.manifest.data.get("attributes", {})
        self.seq_len = int(attrs["max_seq_length"])
        self.max_predictions = int(attrs["max_predictions_per_seq"])
        self.vocab_size = int(attrs["vocab_size"])
        self.sentence_task = attrs.get("sentence_task", "sop")
        # static shards hold masked examples; dynamic ones unmasked pairs, masked here in the read-ahead thread by
        # (seed, epoch, example id) with the manifest's settings, or those `masking` overrides
        self.masking = self.manifest.masking
        self._stored = stored_fields(self.masking)
        self.masker = self._masker(attrs, masking, seed)
        if self.masker is not None:
            self.max_predictions = self.masker.settings.max_predictions
        self.micro, self.accum, self.rank, self.world, self.seed = micro_batch_size, grad_accum, rank, world, seed
        self.window = max(1, window // micro_batch_size) * micro_batch_size  # batches never straddle windows
        # Read-ahead, in windows (0: none, a window is read when its first micro-batch is asked for). A thread
        # prepares whole windows (read, decompress, shuffle, cast, pin: bulk copies in h5py/numpy/torch, which
        # release the GIL) while the loop consumes the previous one as views. Reading a window takes tens of ms and
        # a GPU consumes one (128 micro-batches of 64 x 128) in ~130 ms, so one window ahead hides the read whenever
        # the producer keeps up at all. Windows, not micro-batches, cross the thread boundary: each hand-off (an OS
        # wake-up, then the GIL) costs the loop ~20 us, 2% of a 1 ms step. Memory: the window being consumed,
        # `prefetch` queued and one being prepared (as int64, ~28 MB each at 8192 x 128).
        if prefetch < 0:
            raise ValueError(f"prefetch is a number of windows, 0 or more; got {prefetch}")
        self.prefetch = prefetch
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (pass pin_memory=(device.type == 'cuda'))")
        self.pin_memory = pin_memory  # page-locked batches: asynchronous host-to-device copies
        self.plan = Plan(world, micro_batch_size, self.window)
        # Every shard of the manifest is in the layout, readable or not, so that positions mean the same rows
        # whatever is skipped; an unreadable one (with skip_bad_shards) is skipped from the start (a shard skip).
        self.skips: dict[str, dict] = {}  # id -> skip, every skip this run knows (pipeline/data_skips.py)
        # the rows of a chain and of a skip, by (epoch, chain) and (epoch, skip id): a window skip's rows are cut from
        # its own chain's, so without it the work would double with each skip of an epoch, at every step's position()
        self._memo: dict[tuple, Runs] = {}
        self.skipped_shards: list[str] = []
        offsets = np.cumsum([0] + [entry["num_examples"] for entry in self.manifest.shards])
        self.shards = [
            _Shard(self.folder / entry["name"], entry["num_examples"], int(first_id))
            for entry, first_id in zip(self.manifest.shards, offsets)
        ]
        start = asdict(LoaderState())
        for shard in self.shards:
            problem = (
                _check_shard(shard.path, shard.rows, self.seq_len, self._stored) if shard.path.exists() else "missing"
            )
            if problem:
                if not skip_bad_shards:
                    raise DataError(
                        f"{shard.path}: {problem} (run `albert-data verify {self.folder}`; --skip-bad-shards skips it)",
                        shard.path,
                    )
                log.warning("skipping shard %s: %s", shard.path, problem)
                self.skipped_shards.append(shard.path.name)
                self._add(data_skips.shard_skip(start, self.plan, shard.path.name, 0, f"unreadable: {problem}"))
        # blocks: (shard index, first row, rows)
        self.blocks = np.array(
            [(s, a, min(BLOCK, sh.rows - a)) for s, sh in enumerate(self.shards) for a in range(0, sh.rows, BLOCK)],
            dtype=np.int64,
        ).reshape(-1, 3)
        self.layout_rows = int(self.blocks[:, 2].sum()) if len(self.blocks) else 0  # rows of an epoch's order
        skipped = set(self.skipped_shards)
        self.num_examples = sum(sh.rows for sh in self.shards if sh.path.name not in skipped)  # readable ones
        per_step = micro_batch_size * grad_accum * world
        self.steps_per_epoch = self.num_examples // per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.folder}: {self.num_examples} examples, fewer than one global batch of {per_step}")
        self.micro_batches_per_epoch = self.steps_per_epoch * grad_accum
        self.dropped_per_epoch = self.num_examples - self.steps_per_epoch * per_step
        self.global_batch = per_step
        self.state = LoaderState()
        self._rows = Runs.whole(self.layout_rows)  # the rows the current plan of the epoch cuts among the ranks
        self._thread: threading.Thread | None = None
        self._unthreaded: Generator | None = None  # the windows when prefetch is 0
        self._stop = threading.Event()
        self.data_wait = 0.0  # seconds the consumer waited for batches (reset by the caller)
        self._settle()

    def _masker(self, attrs: dict, masking: MaskOverrides | None, seed: int) -> Masker | None:
        """The masking of dynamic shards (None for static ones, which refuse masking settings)."""
        given = masking.given() if masking is not None else []
        if self.masking != "dynamic":
            if given:
                raise DataError(
                    f"{self.folder}: holds masked shards (albert-data shard --masking static); {', '.join(given)} "
                    f"{'apply' if len(given) > 1 else 'applies'} only to unmasked shards (--masking dynamic), which "
                    "are masked while training"
                )
            return None
        recorded = MaskSettings(
            float(attrs["masked_lm_prob"]), int(attrs["ngram"]), int(attrs["max_predictions_per_seq"])
        )
        settings = masking.over(recorded) if masking is not None else recorded
        if problem := settings.problem(self.seq_len):
            raise DataError(f"{self.folder}: {problem}")
        from data_prep.errors import DataPrepError
        from data_prep.vocab import Vocab

        try:  # the [MASK] id and the pieces a random replacement draws from
            vocab = Vocab(self.folder / self.manifest.data["vocab"]["file"])
        except DataPrepError as e:
            raise DataError(str(e)) from None
        return Masker(settings, seed, vocab.mask_id, vocab.normal_ids)

    # ------------------------------------------------------------------------------------ position
    def state_dict(self) -> dict:
        """The position, with the plan it counts in, the seed of the shuffle it counts in and every skip this run
        knows."""
        return {**asdict(self.state), "plan": asdict(self.plan), "seed": self.seed, "skips": list(self.skips.values())}

    def load_state_dict(self, state: dict, plan: dict | None = None) -> None:
        """Continue from a saved position. The plan it counts in is the state's own ("plan"), else `plan` (for
        positions saved without one), else this loader's. With another plan, the rest of the epoch is re-cut for this
        loader's ranks (see the module docstring). The state's skips join those this loader knows. A position of
        another seed's shuffle (saved with one: older states were not) is refused: it holds other examples here."""
        if state.get("seed", self.seed) != self.seed:
            raise DataError(
                f"{self.folder}: the position was saved by a run with --seed {state['seed']}, this run has --seed "
                f"{self.seed}: under it the position holds other examples (resume with --seed {state['seed']})"
            )
        self.close()
        for skip in state.get("skips", []):
            self._add(skip)
        saved = Plan(**(state.get("plan") or plan or asdict(self.plan)))
        st = LoaderState(state["epoch"], state["micro_batch"], [dict(e) for e in state.get("earlier", [])])
        if saved != self.plan and (st.micro_batch or st.earlier):
            st = LoaderState(st.epoch, 0, [*st.earlier, {**asdict(saved), "micro_batch": st.micro_batch}])
        self.state = st
        self._settle()

    def add_skips(self, skips: list[dict]) -> None:
        """Leave these out (pipeline/data_skips.py) from where each is due; iterate anew afterwards."""
        self.close()
        for skip in skips:
            self._add(skip)
        self._settle()

    def _add(self, skip: dict) -> None:
        sid = data_skips.skip_id(skip)
        known = self.skips.get(sid)
        # one shard skip per shard: the earliest, so that a resume from before a later one still leaves it out
        if known is None or (skip["epoch"], skip["step"]) < (known["epoch"], known["step"]):
            self.skips[sid] = skip
            self._memo.clear()

    @property
    def remaining_in_epoch(self) -> int:
        """Micro-batches this rank has still to hand out in the epoch in progress (skips due now applied)."""
        self._settle()
        return self._micro_batches(self._rows) - self.state.micro_batch

    def _next_epoch(self) -> None:
        self.state = LoaderState(self.state.epoch + 1, 0)
        self._settle()

    def _settle(self) -> None:
        """Apply the skips due at the position, find its rows, and go to the next epoch if this one is used up."""
        self.state, self._rows = self._settled_position(self.state)

    def _settled_position(self, state: LoaderState) -> tuple[LoaderState, Runs]:
        empty_epochs = 0
        while True:
            state = self._settled(state)
            rows = self._rows_of(state)
            if state.micro_batch < self._micro_batches(rows):
                return state, rows
            empty_epochs = empty_epochs + 1 if state.micro_batch == 0 else 0
            if empty_epochs > 1:
                raise DataError(f"{self.folder}: the skips leave no global batch in an epoch ({len(self.skips)} skips)")
            state = LoaderState(state.epoch + 1, 0)

    def position(self, state: LoaderState | None = None) -> dict:
        """Where the next micro-batch comes from ({epoch, micro_batch, earlier}), skips due there applied: at `state`
        (a copy of an earlier `self.state`), else now. Changes nothing (safe between the batches of an iteration)."""
        return asdict(self._settled_position((state or self.state).copy())[0])

    def window_skips(self, position: dict, micro_batches: int, step: int, cause: str) -> list[dict]:
        """Skips of the next `micro_batches` micro-batches per rank from `position` (from self.position()), into the
        next epoch where this one ends first. A known skip that falls due inside the window (one recorded further on
        in this history: an earlier rollback's, when a rollback goes one checkpoint further back) ends a window
        there, and the rest is counted once it is applied: the windows leave out `micro_batches` batches that
        nothing else leaves out. Stops the read-ahead (the caller iterates anew after adding the skips)."""
        self.close()
        known = dict(self.skips)
        state = LoaderState(position["epoch"], position["micro_batch"], [dict(e) for e in position["earlier"]])
        skips: list[dict] = []
        try:
            while micro_batches > 0 and len(skips) < 16:
                state, rows = self._settled_position(state)
                end = self._micro_batches(rows)
                stop = self._next_stop(state)
                until = min(state.micro_batch + micro_batches, end, stop if stop is not None else end)
                skip = data_skips.window_skip(asdict(state), self.plan, until, step, cause)
                skips.append(skip)
                self._add(skip)  # (for now: settling at `state` then applies it, and the skip due at `stop`)
                micro_batches -= until - state.micro_batch
                if until == end:
                    state = LoaderState(state.epoch + 1, 0)
        finally:
            self.skips = known
            self._memo.clear()
        return skips

    def _settled(self, state: LoaderState) -> LoaderState:
        """`state` with every skip due at its position applied: the plan in progress ends there and the rest, less
        the skipped rows, is cut anew (one more link of the chain), until none is due."""
        plan = asdict(self.plan)
        while True:
            due = sorted(
                sid
                for sid, skip in self.skips.items()
                if data_skips.relation(skip, state.epoch, state.earlier, plan, state.micro_batch) == "due"
            )
            if not due:
                return state
            link = {**plan, "micro_batch": state.micro_batch, "removed": due}
            state = LoaderState(state.epoch, 0, [*state.earlier, link])

    def _next_stop(self, state: LoaderState | None = None) -> int | None:
        """The position of the plan in progress (at `state`, else now) where the next skip recorded on this history
        falls due."""
        plan, st = asdict(self.plan), state or self.state
        ats = [
            s["at"]
            for s in self.skips.values()
            if s["epoch"] == st.epoch and s["earlier"] == st.earlier and s["plan"] == plan and s["at"] > st.micro_batch
        ]
        return min(ats) if ats else None

    def _rows_of(self, state: LoaderState) -> Runs:
        """The rows the current plan of state's epoch cuts: all of them, or what earlier plans left unseen, less
        the rows of the skips that ended them."""
        key = ("chain", state.epoch, json.dumps(state.earlier, sort_keys=True))
        if key not in self._memo:
            if len(self._memo) > 256:
                self._memo.clear()
            self._memo[key] = self._cut_chain(state)
        return self._memo[key]

    def _cut_chain(self, state: LoaderState) -> Runs:
        rows = Runs.whole(self.layout_rows)
        for depth, e in enumerate(state.earlier):
            plan = Plan(e["world"], e["micro"], e["window"])
            if self.global_batch % plan.world or (self.global_batch // plan.world) % plan.micro:
                raise DataError(
                    f"{self.folder}: a saved position counts in micro-batches of {plan.micro} on {plan.world} rank(s), "
                    f"which does not divide this run's global batch of {self.global_batch}"
                )
            if e["micro_batch"] * plan.micro * plan.world % self.global_batch:  # saved between optimizer steps
                raise DataError(
                    f"{self.folder}: a saved position after {e['micro_batch']} micro-batches of {plan.micro} on "
                    f"{plan.world} rank(s) is not a whole number of global batches of {self.global_batch}"
                )
            rows = self._unseen(state.epoch, rows, plan, e["micro_batch"], depth)
            for sid in e.get("removed", ()):
                rows = rows.without(self._skipped_rows(state.epoch, sid))
        return rows

    def _skipped_rows(self, epoch: int, sid: str) -> Runs:
        """The rows of `epoch`'s order that the skip `sid` leaves out."""
        key = ("skip", epoch, sid)
        if key not in self._memo:
            self._memo[key] = self._rows_of_skip(epoch, sid)
        return self._memo[key]

    def _rows_of_skip(self, epoch: int, sid: str) -> Runs:
        skip = self.skips.get(sid)
        if skip is None:
            raise DataError(f"{self.folder}: a saved position names skip {sid}, which this run does not know")
        if skip["kind"] == "shard":
            index = next((i for i, sh in enumerate(self.shards) if sh.path.name == skip["shard"]), None)
            if index is None:
                return Runs.of_sorted(np.zeros(0, np.int64))
            order, starts = self._epoch_layout(epoch)
            mine = np.flatnonzero(order[:, 0] == index)
            return Runs.concat([Runs(starts[mine], order[mine, 2])])
        # a window: what its plan would have handed out in micro-batches [at, until) on every rank
        context = LoaderState(skip["epoch"], 0, skip["earlier"])
        rows, plan, depth = self._rows_of(context), Plan(**skip["plan"]), len(skip["earlier"])
        lo_pos, picked = skip["at"] * plan.micro, []
        for r in range(plan.world):
            base, used = self._cut(rows, plan, r)
            hi_pos = min(skip["until"] * plan.micro, used)
            for w in range(lo_pos // plan.window, -(-hi_pos // plan.window)):
                first, size = w * plan.window, min(plan.window, used - w * plan.window)
                perm = self._window_perm(skip["epoch"], r, w, depth, size)
                take = perm[max(lo_pos - first, 0) : hi_pos - first]
                picked.append(rows.at(base + first + take))
        return Runs.of_sorted(np.unique(np.concatenate(picked)) if picked else np.zeros(0, np.int64))

    def _cut(self, rows: Runs, plan: Plan, rank: int) -> tuple[int, int]:
        """(first position, positions used) of rank's share of rows under plan."""
        per_rank = rows.total // plan.world
        used = rows.total // self.global_batch * (self.global_batch // plan.world)
        return rank * per_rank, used

    def _micro_batches(self, rows: Runs) -> int:
        return self._cut(rows, self.plan, self.rank)[1] // self.micro

    def _window_perm(self, epoch: int, rank: int, w: int, depth: int, n: int) -> np.ndarray:
        key = [self.seed, epoch, rank, w] if depth == 0 else [self.seed, epoch, rank, w, depth]
        return np.random.default_rng(key).permutation(n)

    def _unseen(self, epoch: int, rows: Runs, plan: Plan, handed: int, depth: int) -> Runs:
        """The rows of `rows` that `plan` had not handed out after `handed` micro-batches per rank, as runs."""
        parts = []
        cut = handed * plan.micro
        w = cut // plan.window
        for r in range(plan.world):
            base, used = self._cut(rows, plan, r)
            lo, hi = base + w * plan.window, base + min((w + 1) * plan.window, used)
            if lo < hi:  # the window in progress: what its shuffle had not reached yet
                rest = np.sort(self._window_perm(epoch, r, w, depth, hi - lo)[cut - w * plan.window :]) + lo
                parts.append(Runs.of_sorted(rows.at(rest)))
            parts.append(rows.slice(max(hi, lo), base + used))
        return Runs.concat(parts)

    # ------------------------------------------------------------------------------------ order
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocks in this epoch's order and the virtual row where each starts."""
        order = self.blocks[np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))]
        starts = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(order[:, 2], out=starts[1:])
        return order, starts

    @property
    def _read_keys(self) -> tuple[str, ...]:
        return (*self._stored, "example_id") if self.masker is not None else self._stored

    def _read_window(self, files: dict, order: np.ndarray, starts: np.ndarray, runs: Runs) -> dict[str, np.ndarray]:
        """These rows of the epoch's virtual sequence, in order. Runs less than READ_GAP rows apart are read as one
        range and their rows picked from it: after another plan re-cut an epoch, a window's rows are scattered
        (every other row of an old window), and one read per row would cost ~1 ms each."""
        ends = runs.starts + runs.lengths
        breaks = np.flatnonzero(runs.starts[1:] - ends[:-1] >= READ_GAP) + 1
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self._read_keys}
        for first, last in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(runs.starts)]])):
            lo, hi = int(runs.starts[first]), int(ends[last - 1])
            rows = self._read_range(files, order, starts, lo, hi)
            if last - first > 1:
                pick = np.concatenate([np.arange(a, b) for a, b in zip(runs.starts[first:last], ends[first:last])]) - lo
                rows = {k: v[pick] for k, v in rows.items()}
            for k in self._read_keys:
                parts[k].append(rows[k])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _read_range(
        self, files: dict, order: np.ndarray, starts: np.ndarray, lo: int, hi: int
    ) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of the epoch's virtual sequence (with dynamic shards, also their global ids: example_id)."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self._read_keys}
        b = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            shard, first, rows = order[b]
            a = lo - starts[b]
            take = min(rows - a, hi - lo)
            path = self.shards[shard].path
            try:
                if shard not in files:
                    files[shard] = _open_shard(path)
                f = files[shard]
                for k in self._stored:
                    parts[k].append(f[k][first + a : first + a + take])
                if self.masker is not None:
                    parts["example_id"].append(self.shards[shard].first_id + first + a + np.arange(take))
            except (OSError, KeyError, ValueError) as e:
                raise DataError(
                    f"{path}: cannot read rows {first + a}-{first + a + take} ({e}); the shard is corrupt or truncated",
                    path,
                ) from None
            lo += take
            b += 1
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _windows(self, start: LoaderState) -> Generator[list[dict[str, torch.Tensor]]]:
        """The windows from `start` on (from start's micro-batch in its window), each as its micro-batches: views
        of the window's rows in training order, cast to int64 and, with pin_memory, page-locked."""
        files: dict = {}
        epoch, mb, plan_rows, depth = start.epoch, start.micro_batch, self._rows_of(start), len(start.earlier)
        try:
            while True:
                order, starts = self._epoch_layout(epoch)
                base, used = self._cut(plan_rows, self.plan, self.rank)
                w = (mb * self.micro) // self.window
                while w * self.window < used:
                    lo = base + w * self.window
                    hi = base + min((w + 1) * self.window, used)
                    rows = self._read_window(files, order, starts, plan_rows.slice(lo, hi))
                    if self.masker is not None:
                        rows = self.masker(rows, rows["example_id"], epoch)
                    perm = self._window_perm(epoch, self.rank, w, depth, hi - lo)
                    first = max(mb * self.micro - w * self.window, 0)
                    # micro-batch j of the window is perm[j * micro : (j + 1) * micro]: rows[perm] holds them back to back
                    ready = {k: torch.from_numpy(rows[k][perm[first:]].astype(np.int64)) for k in FIELDS}
                    del rows
                    if self.pin_memory:
                        ready = {k: v.pin_memory() for k, v in ready.items()}
                    parts = [ready[k].split(self.micro) for k in FIELDS]  # views: no copy
                    yield [dict(zip(FIELDS, batch)) for batch in zip(*parts)]
                    w += 1
                nxt = self._settled(LoaderState(epoch + 1, 0))
                epoch, mb, plan_rows, depth = nxt.epoch, nxt.micro_batch, self._rows_of(nxt), len(nxt.earlier)
        finally:
            for f in files.values():
                f.close()

    # ------------------------------------------------------------------------------------ iteration
    @staticmethod
    def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
        """Put unless close() was called meanwhile (`stop`, this producer's own); False then."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _producer(self, q: queue.Queue, start: LoaderState, stop: threading.Event) -> None:
        windows = self._windows(start)
        try:
            for window in windows:
                if not self._put(q, window, stop):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(q, e, stop)
        finally:
            windows.close()  # closes the shard files now, not whenever the generator is collected

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # once, unless a skip recorded on this history falls due: then anew from there
            self._settle()
            yield from self._until_stop()

    def _until_stop(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the position on, until the position where a known skip falls due (if any)."""
        self.close()
        start = self.state.copy()
        count, stop = self._micro_batches(self._rows), self._next_stop()
        get: Callable[[], Any]
        if self.prefetch:
            self._stop = threading.Event()
            q: queue.Queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(
                target=self._producer, args=(q, start, self._stop), daemon=True, name="prefetch"
            )
            self._thread.start()
            get = q.get
        else:  # no read-ahead: each window is read when the first of its batches is asked for
            self._unthreaded = self._windows(start)
            get = self._unthreaded.__next__
        while True:
            t0 = time.perf_counter()
            window = get()
            self.data_wait += time.perf_counter() - t0
            if isinstance(window, BaseException):
                raise window
            for batch in window:
                self.state.micro_batch += 1
                if self.state.micro_batch == count:
                    self._next_epoch()
                    count, stop = self._micro_batches(self._rows), self._next_stop()
                yield batch
                if self.state.micro_batch == stop:
                    return

    def close(self) -> None:
        if self._unthreaded is not None:
            self._unthreaded.close()
            self._unthreaded = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None


def to_device(batch: dict, device) -> dict:
    """The CPU batch on the device (asynchronous copies from the loader's pinned memory on CUDA). A batch without
    padding goes without its input mask, so that attention runs without one: the flash kernel takes no mask.
    Decided on the CPU tensor, so no host sync."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "input_mask"}
    if not bool(batch["input_mask"].all()):
        out["input_mask"] = batch["input_mask"].to(device, non_blocking=True)
    return out
