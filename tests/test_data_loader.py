"""The pretraining loader: disjoint shares, every example once per epoch, exact position, bad shards named, the
read-ahead keeps the order, shards read without HDF5 file locks; and a smoke run of bench/bench_loader.py."""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_prep.shards import FIELDS, Manifest, read_shard
from pipeline.data import BLOCK, DataError, PretrainingData

REPO = Path(__file__).resolve().parents[1]


def rows(batches) -> list[bytes]:
    return [b["input_ids"][i].numpy().astype(np.uint16).tobytes() for b in batches for i in range(len(b["input_ids"]))]


def epoch(data: PretrainingData) -> list[bytes]:
    try:
        return rows(itertools.islice(iter(data), data.micro_batches_per_epoch))
    finally:
        data.close()


def test_ranks_get_disjoint_shares_covering_the_data(wiki_shards):
    everything = [
        r.tobytes() for s in Manifest.load(wiki_shards).shards for r in read_shard(wiki_shards / s["name"])["input_ids"]
    ]
    loaders = [
        PretrainingData(wiki_shards, micro_batch_size=4, grad_accum=2, rank=r, world=2, seed=1) for r in range(2)
    ]
    shares = [epoch(d) for d in loaders]
    assert len(shares[0]) == len(shares[1]) == loaders[0].steps_per_epoch * 8
    seen = shares[0] + shares[1]
    assert len(set(seen)) == len(seen), "an example served twice in one epoch"
    assert set(seen) <= set(everything)
    assert len(everything) - len(seen) == loaders[0].dropped_per_epoch < 16


def test_epochs_are_reshuffled_and_seeded(wiki_shards):
    a = PretrainingData(wiki_shards, 4, 1, seed=1)
    first = rows(itertools.islice(iter(a), a.micro_batches_per_epoch + 5))
    a.close()
    assert first[:20] != first[a.micro_batches_per_epoch * 4 : a.micro_batches_per_epoch * 4 + 20]
    assert epoch(PretrainingData(wiki_shards, 4, 1, seed=1))[:50] == first[:50]
    assert epoch(PretrainingData(wiki_shards, 4, 1, seed=2))[:50] != first[:50]


def test_resume_continues_with_the_next_example(wiki_shards):
    straight = PretrainingData(wiki_shards, 4, 1, seed=3)
    n = straight.micro_batches_per_epoch
    whole = rows(itertools.islice(iter(straight), n + 30))
    straight.close()
    for cut in (7, n - 1, n + 3):  # mid-window, the last batch of an epoch, the next epoch
        d = PretrainingData(wiki_shards, 4, 1, seed=3)
        head = rows(itertools.islice(iter(d), cut))
        state = d.state_dict()
        d.close()
        e = PretrainingData(wiki_shards, 4, 1, seed=3)
        e.load_state_dict(state)
        tail = rows(itertools.islice(iter(e), 20))
        e.close()
        assert head + tail == whole[: (cut + 20) * 4]


def test_truncated_shard_is_named_or_skipped(wiki_shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(wiki_shards, bad)
    name = Manifest.load(bad).shards[1]["name"]
    data = (bad / name).read_bytes()
    (bad / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=name):
        PretrainingData(bad, 4, 1)
    skipping = PretrainingData(bad, 4, 1, skip_bad_shards=True)
    assert skipping.skipped_shards == [name]
    assert skipping.num_examples == sum(s["num_examples"] for s in Manifest.load(bad).shards if s["name"] != name)
    assert len(epoch(skipping)) > 0


# ------------------------------------------------------------------------------------ read-ahead and the order
def key(row: dict) -> tuple[bytes, ...]:
    return tuple(np.asarray(row[k]).astype(np.int64).tobytes() for k in FIELDS)


def loader_rows(batches) -> list[tuple[bytes, ...]]:
    return [key({k: b[k][i] for k in FIELDS}) for b in batches for i in range(len(b["input_ids"]))]


def documented_order(
    folder, micro: int, accum: int, rank: int, world: int, seed: int, window: int, epochs: int
) -> list[tuple[bytes, ...]]:
    """The order the module docstring describes, computed from scratch: blocks of BLOCK rows permuted by
    (seed, epoch), the rank's contiguous share of whole steps, windows shuffled by (seed, epoch, rank, window)."""
    records = np.concatenate([read_shard(folder / s["name"]) for s in Manifest.load(folder).shards])
    sizes = [s["num_examples"] for s in Manifest.load(folder).shards]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    blocks = [
        np.arange(offsets[s] + a, offsets[s] + min(a + BLOCK, n))
        for s, n in enumerate(sizes)
        for a in range(0, n, BLOCK)
    ]
    n = len(records)
    used = n // (micro * accum * world) * accum * micro
    win = max(1, window // micro) * micro
    out = []
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(len(blocks))
        share = np.concatenate([blocks[b] for b in order])[rank * (n // world) :][:used]
        for w, lo in enumerate(range(0, used, win)):
            part = share[lo : lo + win]
            out += [key(records[i]) for i in part[np.random.default_rng([seed, e, rank, w]).permutation(len(part))]]
    return out


SETTINGS = [(8192, 1), (64, 0), (64, 1), (64, 3), (30, 2)]  # (window, prefetch); 30 rounds down to 28 rows


@pytest.mark.parametrize("window,prefetch", SETTINGS)
def test_read_ahead_keeps_the_documented_order_across_epochs(wiki_shards, window, prefetch):
    d = PretrainingData(wiki_shards, 4, 2, rank=1, world=2, seed=5, window=window, prefetch=prefetch)
    n = d.micro_batches_per_epoch
    try:
        got = loader_rows(itertools.islice(iter(d), 2 * n))
    finally:
        d.close()
    assert got == documented_order(wiki_shards, 4, 2, 1, 2, 5, window, epochs=2)


def test_resume_with_another_read_ahead_continues_with_the_next_example(wiki_shards):
    expected = documented_order(wiki_shards, 4, 2, 1, 2, 5, 64, epochs=2)
    n = PretrainingData(wiki_shards, 4, 2, rank=1, world=2, seed=5, window=64).micro_batches_per_epoch
    for (_, before), (_, after) in zip(SETTINGS[1:], SETTINGS[2:] + SETTINGS[1:2]):
        for cut in (7, 16, n - 1, n + 3):  # mid-window, a window's end, the last batch of an epoch, the next epoch
            d = PretrainingData(wiki_shards, 4, 2, rank=1, world=2, seed=5, window=64, prefetch=before)
            head = loader_rows(itertools.islice(iter(d), cut))
            state = d.state_dict()
            d.close()
            e = PretrainingData(wiki_shards, 4, 2, rank=1, world=2, seed=5, window=64, prefetch=after)
            e.load_state_dict(state)
            tail = loader_rows(itertools.islice(iter(e), 20))
            e.close()
            assert head + tail == expected[: (cut + 20) * 4], (before, after, cut)


def test_batches_are_int64_tensors_of_the_fields(wiki_shards):
    d = PretrainingData(wiki_shards, 4, 1)
    try:
        b = next(iter(d))
    finally:
        d.close()
    assert set(b) == set(FIELDS)
    assert all(v.dtype == torch.int64 and v.device.type == "cpu" and len(v) == 4 for v in b.values())
    assert b["input_ids"].shape == (4, d.seq_len) and b["next_sentence_labels"].shape == (4,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_pinning_without_cuda_is_refused_at_once(wiki_shards):
    with pytest.raises(ValueError, match="needs CUDA"):
        PretrainingData(wiki_shards, 4, 1, pin_memory=True)


def test_shard_held_open_for_writing_elsewhere_is_read(wiki_shards, tmp_path, monkeypatch):
    """HDF5's file lock would refuse the read (as it does on a shared file system when another job has the file
    open); the loader opens shards without it."""
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    folder = tmp_path / "shards"
    shutil.copytree(wiki_shards, folder)
    path = folder / Manifest.load(folder).shards[0]["name"]
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, sys; f = h5py.File({str(path)!r}, 'a'); print('open', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(OSError, match="lock"):
            h5py.File(path, "r")  # the default: locked out
        whole = epoch(PretrainingData(folder, 4, 1, seed=1))
        assert whole == epoch(PretrainingData(wiki_shards, 4, 1, seed=1))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_bench_loader_smoke(wiki_shards, capsys):
    spec = importlib.util.spec_from_file_location("bench_loader", REPO / "bench" / "bench_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert (
        bench.main(
            ["--data", str(wiki_shards), "--micro", "8", "--window", "256", "--batches", "40", "--step-ms", "0.2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "stall after start-up, % of run" in out and "cores" in out
    assert (
        len([line for line in out.splitlines() if line.startswith("| prefetch=")]) == 4
    )  # prefetch 0 and 1, with and without a consumer


def _take(data: PretrainingData, n: int) -> list[bytes]:
    try:
        return rows(itertools.islice(iter(data), n))
    finally:
        data.close()


def _plan_loaders(shards, world: int, micro: int, accum: int, state: dict | None, window: int = 64):
    loaders = [PretrainingData(shards, micro, accum, rank=r, world=world, seed=9, window=window) for r in range(world)]
    if state is not None:
        for d in loaders:
            d.load_state_dict(state)
    return loaders


@pytest.mark.parametrize(
    "chain",
    [
        [(2, 4, 1, 37), (1, 8, 1, None)],  # 2 ranks -> 1 rank, mid-window (window 64 = 16 micro-batches of 4)
        [(1, 4, 2, 26), (2, 2, 2, None)],  # 1 rank -> 2 ranks, the micro-batch split differently too
        [(2, 4, 1, 37), (4, 2, 1, 25), (1, 4, 2, None)],  # two changes in one epoch
        [(2, 4, 1, 32), (2, 2, 2, None)],  # the same ranks with another micro-batch size, at a window boundary
    ],
)
def test_another_plan_sees_the_rest_of_the_epoch_exactly_once(wiki_shards, chain):
    """Each part hands out its micro-batches (rank by rank), then the next plan continues from the saved position:
    the epoch's examples are those of the first plan's straight epoch, each exactly once, whatever the chain."""
    world, micro, accum, _ = chain[0]
    straight = [epoch(d) for d in _plan_loaders(wiki_shards, world, micro, accum, None)]
    seen: list[bytes] = []
    state = None
    for world, micro, accum, handed in chain:
        loaders = _plan_loaders(wiki_shards, world, micro, accum, state)
        n = handed if handed is not None else loaders[0].remaining_in_epoch
        assert all(d.remaining_in_epoch == n for d in loaders) or handed is not None
        parts = [_take(d, n) for d in loaders]
        again = [_take(d, n) for d in _plan_loaders(wiki_shards, world, micro, accum, state)]
        assert parts == again, "the same resume gave other batches"
        seen += [r for p in parts for r in p]
        ends = [d.state_dict() for d in loaders]
        assert all(s == ends[0] for s in ends)
        state = ends[0]
    assert sorted(seen) == sorted(r for s in straight for r in s)
    assert state["epoch"] == 1 and state["micro_batch"] == 0 and not state["earlier"]
    # the next epoch is the last plan's plain layout
    world, micro, accum, _ = chain[-1]
    fresh = [PretrainingData(wiki_shards, micro, accum, rank=r, world=world, seed=9, window=64) for r in range(world)]
    for d in fresh:
        d.load_state_dict({"epoch": 1, "micro_batch": 0})
    after = _plan_loaders(wiki_shards, world, micro, accum, state)
    assert [_take(d, 10) for d in after] == [_take(d, 10) for d in fresh]


def test_a_position_saved_without_its_plan_counts_in_the_given_one(wiki_shards):
    """Checkpoints hold {epoch, micro_batch} without the plan: the caller passes the writer's."""
    a = _plan_loaders(wiki_shards, 2, 4, 1, None)
    for d in a:
        _take(d, 10)
    old = {"epoch": 0, "micro_batch": 10}
    b = PretrainingData(wiki_shards, 8, 1, seed=9, window=64)
    b.load_state_dict(old, plan={"world": 2, "micro": 4, "window": 64})
    assert b.state.earlier == [{"world": 2, "micro": 4, "window": 64, "micro_batch": 10}]
    assert b.remaining_in_epoch == b.micro_batches_per_epoch - 10


def test_a_plan_that_does_not_divide_the_global_batch_is_refused(wiki_shards):
    d = PretrainingData(wiki_shards, 4, 1, seed=9)
    with pytest.raises(DataError, match="does not divide this run's global batch of 4"):
        d.load_state_dict({"epoch": 0, "micro_batch": 3, "plan": {"world": 1, "micro": 8, "window": 64}})
