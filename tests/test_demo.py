"""The embedded default data (train + eval shards from the Wikipedia excerpt), and `albert-data prepare`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, VOCAB_SIZE

from data_prep.inspection import verify_folder
from data_prep.shards import Manifest

pytestmark = pytest.mark.integration  # tier: see pyproject.toml


def test_demo_data_is_verified_and_reruns(tmp_path):
    cmd = [sys.executable, "-m", "data_prep.demo_data", "--output", str(tmp_path / "data")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "demo data ready and verified" in proc.stderr and "[MASK]{" in proc.stdout
    train = Manifest.load(tmp_path / "data" / "train").data
    assert train["num_examples"] > 10000 and train["vocab"]["vocab_size"] == 8000
    assert Manifest.load(tmp_path / "data" / "eval").data["num_examples"] > 500
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "data_prep.sharding" not in proc.stderr and "data_prep.vocab" not in proc.stderr, "a rerun redoes nothing"
    assert Manifest.load(tmp_path / "data" / "train").data["shards"] == train["shards"]


def test_prepare_runs_every_stage_and_resumes(wiki_dump, tmp_path):
    out = tmp_path / "prep"
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "prepare",
        "--input",
        str(wiki_dump),
        "--output",
        str(out),
        "--vocab-size",
        str(VOCAB_SIZE),
        "--num-files",
        "2",
        "--num-shards",
        "2",
        "--dupe-factor",
        "1",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (out / "vocab" / "spiece.model").exists() and len(list((out / "corpus").glob("*.txt"))) == 2
    assert verify_folder(out / "shards") == []
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert resumed.returncode == 0 and "shards already complete" in resumed.stderr
