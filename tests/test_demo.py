"""The README's main job on the embedded corpus: Wikipedia excerpt -> prepare -> verified shards."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from data_prep.shards import Manifest


def test_demo_prepares_verified_shards_and_reruns(tmp_path):
    cmd = [sys.executable, "-m", "data_prep.demo", "--output", str(tmp_path / "demo")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "demo data ready and verified" in proc.stderr and "[MASK]{" in proc.stdout
    shards = tmp_path / "demo" / "data" / "shards"
    first = Manifest.load(shards).data
    assert first["num_examples"] > 10000 and first["vocab"]["vocab_size"] == 8000
    # a second run reuses the finished stages and leaves the shards as they were
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "shards already complete" in proc.stderr
    assert Manifest.load(shards).data["shards"] == first["shards"]
