"""Session fixtures: the real Wikipedia excerpt, turned once into a corpus, a vocabulary and shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 4000
SHARD_ARGS = ["--dupe-factor", "2", "--num-shards", "3", "--seed", "7"]


def pytest_collection_modifyitems(items):
    """Tiers (pyproject.toml): `slow` and `mpi` tests belong to the integration tier."""
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("mpi"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _remove_stale_deepspeed_shm():
    """DeepSpeed's CPU all-reduce maps 69 MB segments /dev/shm/deepspeed_allreduce_buffer_*; a rank that is
    killed (as the fault tests do) never removes them, and /dev/shm is memory. At the end of the session,
    remove those the session created that no process still maps."""
    import time

    started = time.time()
    yield
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(
                line.split()[-1] for line in maps.read_text().splitlines() if "deepspeed_allreduce_buffer" in line
            )
        except OSError:
            continue
    for f in shm.glob("deepspeed_allreduce_buffer_*"):
        try:
            if f.stat().st_mtime >= started - 1 and str(f) not in mapped:
                f.unlink()
        except OSError:
            continue


@pytest.fixture(scope="session")
def wiki_dump() -> Path:
    from data_prep.sample_corpora import wikipedia_excerpt

    return wikipedia_excerpt()


@pytest.fixture(scope="session")
def wiki_corpus(wiki_dump, tmp_path_factory) -> Path:
    from data_prep.corpus import write_corpus

    out = tmp_path_factory.mktemp("corpus")
    write_corpus([wiki_dump], out, num_files=4, fmt="auto", workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def spm_model(wiki_corpus, tmp_path_factory) -> Path:
    from data_prep.cli import train_vocab_from

    prefix = tmp_path_factory.mktemp("vocab") / "spiece"
    return train_vocab_from([wiki_corpus], prefix, VOCAB_SIZE, 1_000_000, 12345, 1, "docs")


@pytest.fixture(scope="session")
def wiki_shards(wiki_corpus, spm_model, tmp_path_factory) -> Path:
    from data_prep.cli import main

    out = tmp_path_factory.mktemp("shards") / "out"
    assert (
        main(["shard", "--input", str(wiki_corpus), "--spm-model", str(spm_model), "--output", str(out), *SHARD_ARGS])
        == 0
    )
    return out
