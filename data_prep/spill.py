"""A map task's output: one file per input piece holding its example records grouped by shard, indexed in a footer.

Layout of `.work/spill/fNNNNN-pNNNNN.bin`:

    [run 0 records][run 1 records]...[runs: int64 (n, 3) = shard, byte offset, records][JSON counts][trailer]
    trailer: MAGIC (8 bytes), then uint64 little-endian: byte offset of the runs table, n, length of the JSON

A run is a shard's records from one flush of the writer's buffer, in the order they were made; runs are written in
flush order, so reading a shard's runs of a piece in table order gives that piece's records for the shard in the
order they were made. The file is written under a temporary name and renamed when whole: its presence means the
piece is done. One file per piece (not one per piece and shard) keeps the files created at pieces + shards.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import DataPrepError

MAGIC = b"ALBSPL01"
_TRAILER = struct.Struct("<8sQQQ")


class SpillWriter:
    """Buffers records per shard and writes them as runs once `buffer_bytes` are held (so memory stays bounded)."""

    def __init__(self, f: BinaryIO, num_shards: int, buffer_bytes: int):
        self.f = f
        self.buffer_bytes = buffer_bytes
        self.buffers: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        self.buffered = 0
        self.offset = 0
        self.runs: list[tuple[int, int, int]] = []

    def add(self, records: np.ndarray, dest: np.ndarray) -> None:
        """Records with their shard numbers; each shard's keep their order."""
        order = np.argsort(dest, kind="stable")
        bounds = np.searchsorted(dest[order], np.arange(len(self.buffers) + 1))
        for shard in np.flatnonzero(np.diff(bounds)):
            part = records[order[bounds[shard] : bounds[shard + 1]]]
            self.buffers[shard].append(part)
            self.buffered += part.nbytes
        if self.buffered >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        for shard, parts in enumerate(self.buffers):
            if parts:
                n = sum(len(p) for p in parts)
                self.runs.append((shard, self.offset, n))
                for part in parts:
                    self.f.write(part.tobytes())
                    self.offset += part.nbytes
                parts.clear()
        self.buffered = 0

    def close(self, counts: dict[str, Any]) -> None:
        """Flush, then write the runs table, the piece's counts and the trailer."""
        self.flush()
        table = np.asarray(self.runs, dtype="<i8").reshape(-1, 3)
        meta = json.dumps(counts, sort_keys=True).encode()
        self.f.write(table.tobytes())
        self.f.write(meta)
        self.f.write(_TRAILER.pack(MAGIC, self.offset, len(table), len(meta)))


def read_index(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(runs table int64 (n, 3): shard, byte offset, records; the piece's counts) of a spill file."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < _TRAILER.size:
            raise DataPrepError(f"{path}: not a spill file (too short)")
        f.seek(size - _TRAILER.size)
        magic, table_at, n, meta_len = _TRAILER.unpack(f.read(_TRAILER.size))
        if magic != MAGIC or table_at + 24 * n + meta_len + _TRAILER.size != size:
            raise DataPrepError(f"{path}: not a spill file of this version (trailer {magic!r})")
        f.seek(table_at)
        table = np.frombuffer(f.read(24 * n), dtype="<i8").reshape(n, 3)
        meta = json.loads(f.read(meta_len))
    return table, meta


def read_runs(path: Path, runs: np.ndarray, out: np.ndarray) -> None:
    """Read runs of one spill file (rows: byte offset, records), in order, into `out` (exactly their records).
    One open and no stat (os.open, positioned reads): a reduce opens every piece's file, the count that matters."""
    view = out.view(np.uint8)
    at = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, n in runs:
            nbytes = int(n) * out.dtype.itemsize
            got = 0
            while got < nbytes:  # (a read returns at most about 2 GB)
                step = os.preadv(fd, [view[at + got : at + nbytes].data], int(offset) + got)
                if step == 0:
                    raise DataPrepError(f"{path}: truncated at byte {int(offset) + got} (run of {n} records)")
                got += step
            at += nbytes
    finally:
        os.close(fd)
