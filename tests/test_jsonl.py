"""JSON-lines logs read back at resume: a torn last line is dropped, other damage is named."""

from __future__ import annotations

import json

import pytest

from common.jsonl import JsonlError, keep_through_step, read_records


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_torn_last_line_is_dropped_and_earlier_steps_kept_as_written(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / 3 * s}) for s in (10, 20, 30)]
    path.write_text("".join(line + "\n" for line in lines) + '{"step": 40, "lo')  # a disk that filled mid-write
    assert [r["step"] for r in read_records(path)] == [10, 20, 30]
    assert "line 4 is torn" in caplog.text
    keep_through_step(path, 20)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"


def test_damage_before_the_last_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, ['{"step": 1}', "garbage", '{"step": 3}'])
    with pytest.raises(JsonlError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        read_records(path)


def test_blank_lines_and_a_clean_file(tmp_path):
    path = tmp_path / "batches-rank0.jsonl"
    write_lines(path, ['{"step": 1}', "", '{"step": 2}'])
    assert read_records(path) == [{"step": 1}, {"step": 2}]
    keep_through_step(path, 5)
    assert read_records(path) == [{"step": 1}, {"step": 2}]
