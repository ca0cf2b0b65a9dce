"""Skips in the pretraining loader (pipeline/data_skips.py): the batches of a window, or a shard, left out, each other
example of the epoch still exactly once; a resume from before a skip, on the same or another layout, leaves out the
same examples; the skips travel in the loader's state."""

from __future__ import annotations

import itertools
from collections import Counter

import h5py
import numpy as np
import pytest

from data_prep.shards import Manifest
from pipeline import data_skips
from pipeline.data import DataError, PretrainingData, Runs

WINDOW = 64


def rows(batches) -> list[bytes]:
    return [b["input_ids"][i].numpy().astype(np.uint16).tobytes() for b in batches for i in range(len(b["input_ids"]))]


def loaders(shards, world: int, micro: int, accum: int = 1, state: dict | None = None, skips=()) -> list:
    out = [PretrainingData(shards, micro, accum, rank=r, world=world, seed=9, window=WINDOW) for r in range(world)]
    for d in out:
        if skips:
            d.add_skips(list(skips))
        if state is not None:
            d.load_state_dict(state)
    return out


def take(data: PretrainingData, n: int) -> list[bytes]:
    try:
        return rows(itertools.islice(iter(data), n))
    finally:
        data.close()


def rest_of_epoch(group: list[PretrainingData]) -> list[bytes]:
    n = group[0].remaining_in_epoch
    assert all(d.remaining_in_epoch == n for d in group)
    return [r for d in group for r in take(d, n)]


def straight_epoch(shards, world, micro, accum=1) -> list[bytes]:
    return rest_of_epoch(loaders(shards, world, micro, accum))


def window_skip_after(shards, world: int, micro: int, handed: int, steps: int, accum: int = 1):
    """(the skip of micro-batches [handed, handed + steps * accum), the rows those batches hold, each rank's first
    `handed` micro-batches, the position there)."""
    group = loaders(shards, world, micro, accum)
    head = [take(d, handed) for d in group]
    position = group[0].state_dict()
    plain = loaders(shards, world, micro, accum, state=position)
    skipped = [r for d in plain for r in take(d, steps * accum)]
    skip = data_skips.window_skip(position, group[0].plan, handed + steps * accum, step=handed // accum + 1, cause="t")
    return skip, skipped, head, position


def test_runs_without_is_the_set_difference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = np.unique(rng.integers(0, 300, rng.integers(0, 200)))
        b = np.unique(rng.integers(0, 300, rng.integers(0, 200)))
        got = Runs.of_sorted(a).without(Runs.of_sorted(b))
        expect = np.setdiff1d(a, b)
        assert got.total == len(expect)
        assert np.array_equal(got.at(np.arange(got.total)), expect)


@pytest.mark.parametrize("world,micro,accum", [(1, 4, 1), (2, 4, 2)])
def test_a_window_skip_leaves_out_exactly_its_batches(wiki_shards, world, micro, accum):
    epoch = Counter(straight_epoch(wiki_shards, world, micro, accum))
    skip, skipped, head, _ = window_skip_after(wiki_shards, world, micro, handed=10 * accum, steps=3, accum=accum)
    group = loaders(wiki_shards, world, micro, accum, skips=[skip])
    again = [take(d, 10 * accum) for d in group]
    assert again == head, "the batches before the skip changed"
    tail = rest_of_epoch(group)
    seen = Counter([r for h in head for r in h] + tail)
    assert len(skipped) == 3 * accum * micro * world
    assert not (Counter(skipped) & Counter(tail)) or all(epoch[r] > 1 for r in set(skipped) & set(tail))
    assert seen + Counter(skipped) <= epoch  # nothing twice, nothing outside the epoch
    # what is lost beyond the skip is less than one global batch (the cut's remainder)
    assert sum((epoch - seen - Counter(skipped)).values()) < micro * accum * world


def test_a_resume_from_before_a_skip_leaves_out_the_same_examples(wiki_shards):
    """The run that recorded the skip, and a run resumed from a position before it that knows the skip (from the
    skips file), hand out the same batches from that position on; the skip survives state_dict/load_state_dict."""
    skip, _, _, _ = window_skip_after(wiki_shards, 2, 4, handed=12, steps=2)
    early = loaders(wiki_shards, 2, 4)
    [take(d, 5) for d in early]
    before = early[0].state_dict()  # a checkpoint written before the skip: it does not know it
    assert before["skips"] == []
    recorder = loaders(wiki_shards, 2, 4, state=before)
    for d in recorder:
        take(d, 7)
        d.add_skips([skip])
    after = recorder[0].state_dict()
    assert [s["cause"] for s in after["skips"]] == ["t"]
    expected = [take(d, 30) for d in loaders(wiki_shards, 2, 4, state=after)]
    resumed = loaders(wiki_shards, 2, 4, state=before, skips=[skip])
    assert [take(d, 7 + 30)[7 * 4 :] for d in resumed] == expected


def test_a_resume_on_another_layout_from_before_a_skip_leaves_it_out(wiki_shards):
    skip, skipped, _, _ = window_skip_after(wiki_shards, 2, 4, handed=12, steps=2)
    epoch = Counter(straight_epoch(wiki_shards, 2, 4))
    first = loaders(wiki_shards, 2, 4)
    head = [r for d in first for r in take(d, 6)]
    position = first[0].state_dict()
    other = loaders(wiki_shards, 1, 4, accum=2, state=position, skips=[skip])  # the same global batch of 8
    tail = rest_of_epoch(other)
    seen = Counter(head + tail)
    assert seen + Counter(skipped) <= epoch
    assert sum((epoch - seen - Counter(skipped)).values()) < 8


def test_two_skips_replayed_from_before_both(wiki_shards):
    """A second skip recorded after the first was applied (its position names the first): a run resumed from before
    both meets them where the recording run did."""
    first, _, _, _ = window_skip_after(wiki_shards, 1, 4, handed=6, steps=2)
    run = loaders(wiki_shards, 1, 4, skips=[first])[0]
    taken = take(run, 6 + 5)
    position = run.state_dict()
    assert position["earlier"] and position["earlier"][0]["removed"]
    second = data_skips.window_skip(position, run.plan, position["micro_batch"] + 3, step=12, cause="t2")
    run.add_skips([second])
    taken += take(run, 20)
    replay = loaders(wiki_shards, 1, 4, skips=[second, first])[0]
    assert take(replay, 6 + 5 + 20) == taken


def test_a_window_over_a_known_later_skip_leaves_out_its_count_besides_it(wiki_shards):
    """A rollback that goes one checkpoint further back: its window (8 micro-batches from 10) reaches the skip the
    first rollback recorded (2 from 14). The window ends there and goes on once that skip is applied: 8 micro-batches
    left out besides the known skip's 2, nothing twice."""
    epoch = Counter(straight_epoch(wiki_shards, 1, 4))
    known, known_rows, head, _ = window_skip_after(wiki_shards, 1, 4, handed=14, steps=2)
    d = loaders(wiki_shards, 1, 4, skips=[known])[0]
    assert take(d, 10) == head[0][: 10 * 4]
    windows = d.window_skips(d.position(), 8, step=11, cause="t")
    assert [w["until"] for w in windows][0] == 14 and len(windows) == 2
    assert list(d.skips) == [data_skips.skip_id(known)]  # computing the windows records nothing
    d.add_skips(windows)
    tail = rest_of_epoch([d])
    seen = Counter(head[0][: 10 * 4] + tail)
    assert seen <= epoch and not Counter(known_rows) & Counter(tail)
    assert not Counter(head[0][10 * 4 :]) & Counter(tail)  # the plain batches 10-13: the first window
    left_out = sum((epoch - seen).values())
    assert (8 + 2) * 4 <= left_out < (8 + 2 + 1) * 4  # (less than a batch more: the cut's remainder)


def test_windows_of_steps_that_ran_across_a_known_skip_leave_out_what_they_read(wiki_shards):
    """An fp16 overflow spiral of 6 steps that ran across a skip applied on the way (at micro-batch 14): a window at
    each step's own position leaves out exactly the batches those steps read, then the margin's."""
    epoch = Counter(straight_epoch(wiki_shards, 1, 4))
    known, known_rows, _, _ = window_skip_after(wiki_shards, 1, 4, handed=14, steps=2)
    d = loaders(wiki_shards, 1, 4, skips=[known])[0]
    head = take(d, 10)
    positions, read = [], []
    for _ in range(6):
        positions.append(d.position())
        read += take(d, 1)
    assert positions[-1]["earlier"] and not positions[0]["earlier"]  # the last steps read after the known skip
    windows = [w for p in positions[:-1] for w in d.window_skips(p, 1, step=11, cause="t")]
    windows += d.window_skips(positions[-1], 1 + 1, step=11, cause="t")
    replay = loaders(wiki_shards, 1, 4, skips=[known])[0]
    assert take(replay, 10) == head
    replay.add_skips(windows)
    tail = rest_of_epoch([replay])
    assert not (Counter(read) & Counter(tail)) or all(epoch[r] > 1 for r in set(read) & set(tail))
    seen = Counter(head + tail)
    assert seen <= epoch and not Counter(known_rows) & Counter(tail)
    left_out = sum((epoch - seen).values())
    assert (6 + 2 + 1) * 4 <= left_out < (6 + 2 + 1 + 1) * 4  # read, the known skip, the margin (and a remainder)


def test_a_shard_skip_leaves_the_shard_out_now_and_in_later_epochs(wiki_shards):
    name = Manifest.load(wiki_shards).shards[0]["name"]
    with h5py.File(wiki_shards / name, "r") as f:
        shard_rows = Counter(row.astype(np.uint16).tobytes() for row in f["input_ids"][:])
    others = Counter(straight_epoch(wiki_shards, 1, 4)) - shard_rows  # (rows of the epoch that the shard has not)
    d = loaders(wiki_shards, 1, 4)[0]
    head = take(d, 8)
    skip = data_skips.shard_skip(d.state_dict(), d.plan, name, step=9, cause="unreadable")
    d.add_skips([skip])
    tail = rest_of_epoch([d])
    assert not Counter(tail) - others, "the skipped shard's rows were handed out"
    assert sum((others - Counter(head + tail)).values()) < 4 + len(head)  # the others: all but the cut's remainder
    assert d.state.epoch == 1 and d.state.earlier[0]["micro_batch"] == 0  # the next epoch: left out from its start
    nxt = rest_of_epoch([d])
    assert not Counter(nxt) - others and sum((others - Counter(nxt)).values()) < 4


def test_a_skip_the_run_does_not_know_is_named(wiki_shards):
    skip, _, _, _ = window_skip_after(wiki_shards, 1, 4, handed=4, steps=1)
    d = loaders(wiki_shards, 1, 4, skips=[skip])[0]
    take(d, 10)
    position = d.state_dict()
    position["skips"] = []
    with pytest.raises(DataError, match="names skip"):
        loaders(wiki_shards, 1, 4, state=position)


class CountingLoader(PretrainingData):
    """Counts how many chains of plans it cuts."""

    cuts = 0

    def _cut_chain(self, state):
        CountingLoader.cuts += 1
        return super()._cut_chain(state)


def test_many_skips_in_an_epoch_cost_one_cut_per_chain(wiki_shards):
    """Each window skip's rows are cut from its own chain's: remembered, the cost of a position is linear in the
    skips of the epoch (it doubled with each one otherwise)."""
    run = loaders(wiki_shards, 1, 4)[0]
    skips = []
    for k in range(12):
        take(run, 3)
        position = run.position()
        skips.append(data_skips.window_skip(position, run.plan, position["micro_batch"] + 1, step=k, cause="t"))
        run.add_skips([skips[-1]])
    taken = run.state_dict()
    CountingLoader.cuts = 0
    fresh = CountingLoader(wiki_shards, 4, 1, seed=9, window=WINDOW)
    fresh.load_state_dict(taken)
    fresh.position()
    assert len(fresh.state.earlier) == 12
    assert CountingLoader.cuts <= 3 * 12 + 3


def test_one_shard_skip_per_shard_whatever_its_wording(wiki_shards):
    name = Manifest.load(wiki_shards).shards[0]["name"]
    d = loaders(wiki_shards, 1, 4)[0]
    start = d.state_dict()
    first = data_skips.shard_skip(start, d.plan, name, step=0, cause="unreadable: missing")
    later = data_skips.shard_skip({**start, "epoch": 1}, d.plan, name, step=300, cause="unreadable: truncated")
    d.add_skips([later, first])
    assert list(d.skips.values()) == [first]  # the earliest is kept


def test_a_skips_file_of_another_seed_is_refused_when_it_has_window_skips(wiki_shards, tmp_path):
    """The shuffle depends on --seed: a window skip's position holds other examples under another seed, a shard
    skip's shard does not."""
    d = loaders(wiki_shards, 1, 4)[0]
    window = data_skips.window_skip(d.state_dict(), d.plan, 2, step=1, cause="t")
    name = Manifest.load(wiki_shards).shards[0]["name"]
    shard = data_skips.shard_skip(d.state_dict(), d.plan, name, step=1, cause="unreadable")
    identity = {"folder": str(wiki_shards), "shards_sha256": "x"}
    path = tmp_path / data_skips.FILE
    data_skips.write(path, [window, shard], identity, seed=7)
    assert data_skips.read(path, identity, seed=7) == [window, shard]
    with pytest.raises(data_skips.SkipsFileError, match=r"recorded by a run with --seed 7; this run has --seed 8"):
        data_skips.read(path, identity, seed=8)
    data_skips.write(path, [shard], identity, seed=7)
    assert data_skips.read(path, identity, seed=8) == [shard]


def test_a_position_of_another_seed_is_refused(wiki_shards):
    d = PretrainingData(wiki_shards, 4, 1, seed=9, window=WINDOW)
    take(d, 3)
    state = d.state_dict()
    assert state["seed"] == 9
    other = PretrainingData(wiki_shards, 4, 1, seed=10, window=WINDOW)
    with pytest.raises(DataError, match=r"saved by a run with --seed 9, this run has --seed 10"):
        other.load_state_dict(state)
    same = PretrainingData(wiki_shards, 4, 1, seed=9, window=WINDOW)
    same.load_state_dict(state)
    assert take(same, 2) == take(d, 2)
