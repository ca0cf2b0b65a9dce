"""Pretraining batches from a shard folder: disjoint per rank, shuffled by (seed, epoch), prefetched,
and resumable at the exact micro-batch.

The order of an epoch:
1. every shard is cut into blocks of BLOCK rows (the HDF5 chunk size, so a block is read whole);
   the blocks of all shards are permuted by (seed, epoch) into one virtual sequence of N rows;
2. rank r takes the contiguous range [r * N // world, (r + 1) * N // world) of that sequence, so each
   rank reads only its own ~1/world of the data and the shares are disjoint;
3. the range is read one window (about `window` rows) at a time, and each window is shuffled by
   (seed, epoch, rank, window). Memory holds a few windows, never a whole shard.

An epoch yields the same number of micro-batches on every rank (whole optimizer steps; the remainder,
fewer than one global batch, is left out and counted). The loader's position is (epoch, micro-batch):
`state_dict()` goes into the checkpoint, and `load_state_dict()` continues with the very next example.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from data_prep.shards import FIELDS, Manifest

log = logging.getLogger(__name__)

BLOCK = 1024


class DataError(Exception):
    """A shard folder that cannot be used; the message names the file."""


@dataclass
class LoaderState:
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of this epoch already handed to the training loop


@dataclass(frozen=True)
class _Shard:
    path: Path
    rows: int


def _check_shard(path: Path, rows: int, seq_len: int) -> str | None:
    """Cheap start-up check (metadata, first and last row): the problem, or None."""
    try:
        with h5py.File(path, "r") as f:
            for name in FIELDS:
                if name not in f:
                    return f"dataset {name} missing"
                if f[name].shape[0] != rows:
                    return f"{name} has {f[name].shape[0]} rows, manifest says {rows}"
            if f["input_ids"].shape[1] != seq_len:
                return f"sequence length {f['input_ids'].shape[1]}, manifest says {seq_len}"
            if rows:
                for name in FIELDS:
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
        window: int = 8192,
        prefetch: int = 4,
        skip_bad_shards: bool = False,
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
        self.micro, self.accum, self.rank, self.world, self.seed = micro_batch_size, grad_accum, rank, world, seed
        self.prefetch = prefetch
        self.window = max(1, window // micro_batch_size) * micro_batch_size  # batches never straddle windows
        self.skipped_shards: list[str] = []
        shards = []
        for entry in self.manifest.shards:
            path = self.folder / entry["name"]
            problem = _check_shard(path, entry["num_examples"], self.seq_len) if path.exists() else "missing"
            if problem:
                if not skip_bad_shards:
                    raise DataError(f"{path}: {problem} (run `albert-data verify {self.folder}`; --skip-bad-shards skips it)")
                log.warning("skipping shard %s: %s", path, problem)
                self.skipped_shards.append(entry["name"])
                continue
            shards.append(_Shard(path, entry["num_examples"]))
        self.shards = shards
        # blocks: (shard index, first row, rows)
        self.blocks = np.array([(s, a, min(BLOCK, sh.rows - a)) for s, sh in enumerate(shards) for a in range(0, sh.rows, BLOCK)], dtype=np.int64).reshape(-1, 3)
        self.num_examples = int(self.blocks[:, 2].sum()) if len(self.blocks) else 0
        per_step = micro_batch_size * grad_accum * world
        self.steps_per_epoch = self.num_examples // per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.folder}: {self.num_examples} examples, fewer than one global batch of {per_step}")
        self.micro_batches_per_epoch = self.steps_per_epoch * grad_accum
        self.dropped_per_epoch = self.num_examples - self.steps_per_epoch * per_step
        self.state = LoaderState()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.data_wait = 0.0  # seconds the consumer waited for batches (reset by the caller)

    # ------------------------------------------------------------------------------------ position
    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.state = LoaderState(**state)
        if self.state.micro_batch >= self.micro_batches_per_epoch:
            self.state = LoaderState(self.state.epoch + 1, 0)

    # ------------------------------------------------------------------------------------ order
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocks in this epoch's order and the virtual row where each starts."""
        order = self.blocks[np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))]
        starts = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(order[:, 2], out=starts[1:])
        return order, starts

    def _read_window(self, files: dict, order: np.ndarray, starts: np.ndarray, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of the epoch's virtual sequence."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in FIELDS}
        b = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            shard, first, rows = order[b]
            a = lo - starts[b]
            take = min(rows - a, hi - lo)
            path = self.shards[shard].path
            try:
                f = files.get(shard) or files.setdefault(shard, h5py.File(path, "r"))
                for k in FIELDS:
                    parts[k].append(f[k][first + a : first + a + take])
            except (OSError, KeyError, ValueError) as e:
                raise DataError(f"{path}: cannot read rows {first + a}-{first + a + take} ({e}); the shard is corrupt or truncated") from None
            lo += take
            b += 1
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _batches(self, start: LoaderState) -> Iterator[dict[str, torch.Tensor]]:
        files: dict = {}
        epoch, mb = start.epoch, start.micro_batch
        try:
            while True:
                order, starts = self._epoch_layout(epoch)
                per_rank = self.num_examples // self.world
                base = self.rank * per_rank
                used = self.micro_batches_per_epoch * self.micro
                w = (mb * self.micro) // self.window
                while w * self.window < used:
                    lo = base + w * self.window
                    hi = base + min((w + 1) * self.window, used)
                    rows = self._read_window(files, order, starts, lo, hi)
                    perm = np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(hi - lo)
                    first = max(mb * self.micro - w * self.window, 0)
                    for i in range(first, hi - lo, self.micro):
                        idx = perm[i : i + self.micro]
                        yield {k: torch.from_numpy(rows[k][idx].astype(np.int64)) for k in FIELDS}
                    w += 1
                epoch, mb = epoch + 1, 0
        finally:
            for f in files.values():
                f.close()

    # ------------------------------------------------------------------------------------ iteration
    def _producer(self, q: queue.Queue, start: LoaderState) -> None:
        try:
            for batch in self._batches(start):
                while not self._stop.is_set():
                    try:
                        q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.close()
        self._stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._producer, args=(q, LoaderState(**asdict(self.state))), daemon=True, name="prefetch")
        self._thread.start()
        while True:
            t0 = time.perf_counter()
            item = q.get()
            self.data_wait += time.perf_counter() - t0
            if isinstance(item, BaseException):
                raise item
            self.state.micro_batch += 1
            if self.state.micro_batch == self.micro_batches_per_epoch:
                self.state = LoaderState(self.state.epoch + 1, 0)
            yield item

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
