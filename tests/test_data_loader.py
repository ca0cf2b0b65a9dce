"""The pretraining loader: disjoint shares, every example once per epoch, exact position, bad shards named."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest

from data_prep.shards import Manifest, read_shard
from pipeline.data import DataError, PretrainingData


def rows(batches) -> list[bytes]:
    return [b["input_ids"][i].numpy().astype(np.uint16).tobytes() for b in batches for i in range(len(b["input_ids"]))]


def epoch(data: PretrainingData) -> list[bytes]:
    try:
        return rows(itertools.islice(iter(data), data.micro_batches_per_epoch))
    finally:
        data.close()


def test_ranks_get_disjoint_shares_covering_the_data(wiki_shards):
    everything = [r.tobytes() for s in Manifest.load(wiki_shards).shards for r in read_shard(wiki_shards / s["name"])["input_ids"]]
    loaders = [PretrainingData(wiki_shards, micro_batch_size=4, grad_accum=2, rank=r, world=2, seed=1) for r in range(2)]
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
    assert first[: 20] != first[a.micro_batches_per_epoch * 4 : a.micro_batches_per_epoch * 4 + 20]
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
