"""The README's main job, shortened: data, 2-rank DeepSpeed pretraining, evaluation, Hugging Face export and the
downstream probe (2 folds of 1 epoch, a few seconds)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration  # tier: see pyproject.toml


def test_demo_end_to_end_short(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--output", str(out), "--steps", "40"]
        + ["--probe-folds", "2", "--probe-epochs", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo summary: 40 steps" in proc.stdout and "MLM accuracy" in proc.stdout
    summary = proc.stdout[proc.stdout.index("demo summary") :]
    assert "downstream probe: 200 movie-review sentences (100 neg / 100 pos), 2-fold stratified CV" in summary
    assert re.search(r"\n    pretrained +\d\.\d{3} ± \d\.\d{3} ", summary), summary
    assert re.search(r"\n    random-init +\d\.\d{3} ± \d\.\d{3} ", summary), summary
    probe = json.loads((out / "probe" / "results.json").read_text())
    assert probe["complete"] and [r["model"] for r in probe["runs"]] == ["pretrained", "random-init"] * 2
    lines = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m.get("split", "train") == "train"]
    assert train[-1]["mlm_accuracy"] > train[0]["mlm_accuracy"] + 0.02, "MLM accuracy must rise"
    assert any(m.get("split") == "eval" for m in lines)
    code = (
        "import sys, logging; from transformers import AlbertForPreTraining, AlbertTokenizer;"
        "model, info = AlbertForPreTraining.from_pretrained(sys.argv[1], output_loading_info=True);"
        "assert not info['missing_keys'] and not info['unexpected_keys'], info;"
        "tokenizer = AlbertTokenizer.from_pretrained(sys.argv[1]);"
        "print(tokenizer.convert_tokens_to_ids(['[CLS]', '[SEP]', '[MASK]']))"
    )
    check = subprocess.run(
        [sys.executable, "-c", code, str(out / "hf")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "[2, 3, 4]"
