"""Bad input reaches the user as one line, never a traceback or silently wrong text: text encodings (byte-order
marks), damaged compressed inputs, out-of-range numeric flags and damaged shards."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep import cli
from data_prep.errors import DataPrepError
from data_prep.readers import docs_pieces, iter_documents
from data_prep.shards import MANIFEST, Manifest

# A BOM for every codec; utf-8-sig writes UTF-8 with one.
WIDE = ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
BOMS = {
    "utf-16-le": b"\xff\xfe",
    "utf-16-be": b"\xfe\xff",
    "utf-32-le": b"\xff\xfe\x00\x00",
    "utf-32-be": b"\x00\x00\xfe\xff",
    "utf-8-sig": b"",
}
# Beyond ASCII: accents, CJK, and characters outside the BMP (surrogate pairs in UTF-16); CRLF line ends.
EXTRA = "Ärger über Café.\r\nZhōngwén 中文 sentence.\r\nEmoji 😀 and 𝄞 clef.\r\n\r\n"


def _text(wiki_corpus: Path) -> str:
    """Real text over several read chunks (so code units straddle chunk ends), plus the characters above."""
    return EXTRA + sorted(wiki_corpus.glob("corpus-*.txt"))[0].read_text() + EXTRA


def _write(path: Path, text: str, codec: str) -> Path:
    path.write_bytes(BOMS[codec] + text.encode(codec))
    return path


def _jsonl(text: str) -> str:
    return "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in text.split("\n\n") if doc.strip())


# --- encodings ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["docs", "paragraphs", "files", "jsonl"])
@pytest.mark.parametrize("codec", [*WIDE, "utf-8-sig"])
def test_bom_text_reads_as_its_utf8_version(wiki_corpus: Path, tmp_path: Path, codec: str, fmt: str) -> None:
    text = _text(wiki_corpus)
    if fmt == "jsonl":
        text = _jsonl(text)
    utf8 = tmp_path / "utf8.txt"
    utf8.write_text(text)
    expected = list(iter_documents(utf8, fmt))
    assert sum(len(doc) for doc in expected) > 1000  # ("files": one document)
    bom = _write(tmp_path / "bom.txt", text, codec)
    assert list(iter_documents(bom, fmt)) == expected
    # --allow-bad-bytes changes nothing in a text that decodes: no NUL, no replacement character
    assert list(iter_documents(bom, fmt, allow_bad_bytes=True)) == expected


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-32-be", "utf-8-sig"])
def test_bom_text_through_compression(wiki_corpus: Path, tmp_path: Path, codec: str) -> None:
    text = _text(wiki_corpus)
    utf8 = tmp_path / "utf8.txt"
    utf8.write_text(text)
    packed = tmp_path / "bom.txt.gz"
    packed.write_bytes(gzip.compress(BOMS[codec] + text.encode(codec), mtime=0))
    assert list(iter_documents(packed, "docs")) == list(iter_documents(utf8, "docs"))


@pytest.mark.parametrize("codec", WIDE)
def test_wide_text_is_one_byte_range(wiki_corpus: Path, tmp_path: Path, codec: str) -> None:
    path = _write(tmp_path / "wide.txt", _text(wiki_corpus), codec)
    size = path.stat().st_size
    assert docs_pieces(path, 64 << 10) == [(0, size)]  # a UTF-8 file this size is cut into many
    with pytest.raises(ValueError, match="read whole"):
        list(iter_documents(path, "docs", piece=(0, size // 2)))


def test_wide_text_makes_the_same_corpus_as_utf8(wiki_corpus: Path, tmp_path: Path) -> None:
    """`corpus` with parts far smaller than the file: the UTF-8 file is read in byte ranges, the UTF-16 one whole;
    the corpus files are the same."""
    text = _text(wiki_corpus)
    for name, codec in (("utf8", "utf-8-sig"), ("utf16", "utf-16-be")):
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "in.txt", text, codec)
        args = ["corpus", "--input", str(tmp_path / name / "in.txt"), "--output", str(tmp_path / f"out-{name}")]
        assert cli.main([*args, "--num-files", "2", "--part-mb", "0.05", "--no-progress"]) == 0
    for k in range(2):
        ours = (tmp_path / "out-utf16" / f"corpus-0000{k}.txt").read_bytes()
        assert ours == (tmp_path / "out-utf8" / f"corpus-0000{k}.txt").read_bytes()
        assert b"\0" not in ours and "\ufeff".encode() not in ours


@pytest.mark.parametrize("codec", WIDE)
@pytest.mark.parametrize("allow", [False, True])
def test_text_without_bom_that_looks_wide_is_refused_naming_it(
    wiki_corpus: Path, tmp_path: Path, codec: str, allow: bool
) -> None:
    path = tmp_path / "nobom.txt"
    path.write_bytes(_text(wiki_corpus).encode(codec))
    with pytest.raises(DataPrepError, match=f"nobom.txt: no byte-order mark, but the text looks like {codec.upper()}"):
        list(iter_documents(path, "docs", allow_bad_bytes=allow))


def test_nul_in_utf16_is_refused_at_its_byte_offset(tmp_path: Path) -> None:
    path = _write(tmp_path / "nul.txt", "One sentence.\nA\0B\n", "utf-16-le")
    offset = 2 + 2 * len("One sentence.\nA")
    with pytest.raises(DataPrepError, match=f"NUL character \\(UTF-16-LE\\) at byte offset {offset}: binary data"):
        list(iter_documents(path, "docs"))
    assert list(iter_documents(path, "docs", allow_bad_bytes=True)) == [["One sentence.", "A\0B"]]


def test_undecodable_utf16_is_refused_naming_utf16(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    lone_surrogates = b"\x00\xd8A\x00" * 100  # a high surrogate, then no low one: every other unit undecodable
    path.write_bytes(BOMS["utf-16-le"] + lone_surrogates)
    with pytest.raises(DataPrepError, match="undecodable bytes .* the first at byte offset 2: not UTF-16-LE text"):
        list(iter_documents(path, "docs"))


@pytest.mark.parametrize("fmt", ["docs", "jsonl"])
def test_damaged_deflate_data_in_gz_is_one_line(tmp_path: Path, fmt: str) -> None:
    """gzip raises zlib.error (not an OSError) for damaged deflate data: an invalid block type here."""
    good = gzip.compress(b'{"text": "Hello world. A sentence."}\n' * 100, mtime=0)
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(good[:10] + b"\x07" + good[11:])
    with pytest.raises(DataPrepError, match="bad.jsonl.gz: corrupt gz data .*invalid block type"):
        list(iter_documents(path, fmt))


# --- numeric flags --------------------------------------------------------------------------

# flag: (values refused besides nan, inf, -inf, "" and "x", values accepted)
NUMERIC = {
    "--num-files": (["-1", "1.5", "1048577"], ["0", "1048576"]),
    "--part-mb": (["0", "1e-7", "-1", "1048577"], ["1e-6", "0.002", "1048576"]),
    "--workers": (["0", "-1", "1025"], ["1", "1024"]),
    "--progress-seconds": (["-1", "31536001"], ["0", "0.001"]),
    "--vocab-size": (["0", "5", "65537"], ["6", "65536"]),
    "--input-sentence-size": (["0", "-1"], ["1"]),
    "--seed": (["-1", "4294967296", "1e3"], ["0", "4294967295"]),
    "--weight-seed": (["-1", "4294967296", "1e3"], ["0", "4294967295"]),
    "--dedup-min-repeats": (["0", "-1", "1.5"], ["1", "1000000"]),
    "--overlap-ngram": (["0", "1001"], ["1", "13", "1000"]),
    "--max-seq-length": (["0", "7", "65536"], ["8", "65535"]),
    "--max-predictions-per-seq": (["0", "-1", "65533"], ["1", "65532"]),
    "--masked-lm-prob": (["0", "-1", "1", "1.5"], ["1e-9", "0.5"]),
    "--ngram": (["0", "11"], ["1", "10"]),
    "--dupe-factor": (["0", "-1", "1001"], ["1", "1000"]),
    "--short-seq-prob": (["-0.1", "1.01"], ["0", "1"]),
    "--num-shards": (["-1", "1048577"], ["0", "7"]),
    "--shard-mb": (["0", "-1", "1e300"], ["0.5"]),
    "--piece-mb": (["0", "-1"], ["8"]),
    "--num-examples": (["-1"], ["0", "5"]),
}
ALWAYS_REFUSED = ["nan", "inf", "-inf", "", "x"]
REQUIRED = {
    "corpus": ["--input", "in", "--output", "out"],
    "vocab": ["--input", "in", "--output-prefix", "out/spiece"],
    "shard": ["--input", "in", "--spm-model", "m.model", "--output", "out"],
    "inspect": ["shard.h5"],
    "verify": ["shards"],
    "prepare": ["--input", "in", "--output", "out"],
}


def _numeric_flags() -> list[tuple[str, argparse.Action]]:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for command, sub in commands.choices.items():
        for option in sub._actions:
            if option.type in (int, float) or getattr(option.type, "__module__", "") == "common.flags":
                found.append((command, option))
    return found


def _long(action: argparse.Action) -> str:
    return [s for s in action.option_strings if s.startswith("--")][0]


def test_every_numeric_flag_is_range_checked() -> None:
    found = _numeric_flags()
    assert len(found) > 30
    for command, action in found:
        assert action.type not in (int, float), f"{command} {_long(action)} takes any {action.type.__name__}"
        assert _long(action) in NUMERIC, f"{command} {_long(action)}: add its range to NUMERIC"


@pytest.mark.parametrize(
    "command,flag", [(command, _long(action)) for command, action in _numeric_flags()], ids=lambda x: x
)
def test_numeric_flag_out_of_range_is_a_usage_error(command: str, flag: str, capsys: pytest.CaptureFixture) -> None:
    refused, accepted = NUMERIC[flag]
    for value in ALWAYS_REFUSED + refused:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, *REQUIRED[command], f"{flag}={value}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        [line] = [line for line in err.splitlines() if "error:" in line]
        assert line.startswith(f"albert-data {command}: error: argument ") and f"{flag}: must be " in line
        assert line.endswith(f"got {value!r}") and "Traceback" not in err
    parser = cli.build_parser()
    dest = flag.lstrip("-").replace("-", "_")
    for value in accepted:
        args = parser.parse_args([command, *REQUIRED[command], f"{flag}={value}"])
        assert getattr(args, dest) == float(value)


def test_range_is_named_in_the_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["shard", *REQUIRED["shard"], "--shard-mb", "nan"])
    assert "argument --shard-mb: must be a number in [1e-06, 1048576], got 'nan'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["vocab", *REQUIRED["vocab"], "--vocab-size", "70000"])
    assert "must be an integer in [6, 65536] (the shards store ids as uint16), got '70000'" in capsys.readouterr().err


def test_predictions_beyond_the_sequence_are_refused_before_any_work(
    wiki_corpus: Path, spm_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A relation between two flags, checked once both are known: one line, exit status 2, no output."""
    out = tmp_path / "out"
    args = ["shard", "--input", str(wiki_corpus), "--spm-model", str(spm_model), "--output", str(out)]
    with caplog.at_level(logging.ERROR):
        assert cli.main([*args, "--max-seq-length", "16", "--max-predictions-per-seq", "14"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["--max-predictions-per-seq 14: must be in [1, max_seq_length - 3]"]
    assert not any(out.glob("*.h5"))


def test_prepare_refuses_the_same_relation_before_the_corpus(wiki_dump: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "prepared"
    args = ["prepare", "--input", str(wiki_dump), "--output", str(out), "--vocab-size", "100"]
    with caplog.at_level(logging.ERROR):
        assert cli.main([*args, "--max-seq-length", "16", "--max-predictions-per-seq", "14"]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "--max-predictions-per-seq 14: must be in [1, max_seq_length - 3]"
    ]
    assert not (out / "corpus").exists()


# --- damaged shards -------------------------------------------------------------------------


def _damaged_copy(wiki_shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "shards"
    shutil.copytree(wiki_shards, folder)
    return folder, folder / Manifest.load(folder).shards[0]["name"]


def _flip_in_dataset(shard: Path, dataset: str) -> None:
    """One bit flipped in the middle of the dataset's first compressed chunk (zlib's checksum catches it)."""
    with h5py.File(shard, "r") as f:
        chunk = f[dataset].id.get_chunk_info(0)
    data = bytearray(shard.read_bytes())
    data[chunk.byte_offset + chunk.size // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def _verify(folder: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    status = cli.main(["verify", str(folder)])
    return status, capsys.readouterr().out.splitlines()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("dataset", ["input_ids", "masked_lm_ids"])
def test_verify_reports_a_bit_flip_with_dataset_and_checksum(
    wiki_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, dataset: str
) -> None:
    folder, shard = _damaged_copy(wiki_shards, tmp_path)
    _flip_in_dataset(shard, dataset)
    status, lines = _verify(folder, capsys)
    assert status == 1
    assert f"{shard}: sha256 differs from {MANIFEST} (file changed or corrupt)" in lines
    unreadable = [line for line in lines if "unreadable" in line]
    assert len(unreadable) == 1, lines
    assert unreadable[0].startswith(f"{shard}: dataset {dataset} (rows 0-")
    assert unreadable[0].endswith(f"; sha256 differs from {MANIFEST}")
    # the other shards are still checked: nothing is reported about them
    assert all(line.startswith(str(shard)) for line in lines)


def test_inspect_reports_a_bit_flip_with_dataset_and_checksum(
    wiki_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, shard = _damaged_copy(wiki_shards, tmp_path)
    _flip_in_dataset(shard, "input_ids")
    with caplog.at_level(logging.ERROR):
        assert cli.main(["inspect", str(shard)]) == 2
    [error] = _errors(caplog)
    assert error.startswith(f"{shard}: dataset input_ids (rows 0-") and "unreadable (" in error
    assert error.endswith(f"; sha256 differs from {MANIFEST}")


def test_truncated_shard_is_reported_by_verify_and_inspect(
    wiki_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    folder, shard = _damaged_copy(wiki_shards, tmp_path)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    status, lines = _verify(folder, capsys)
    assert status == 1
    assert any(
        line.startswith(f"{shard}: not a readable HDF5 file (") and line.endswith(f"; sha256 differs from {MANIFEST}")
        for line in lines
    ), lines
    with caplog.at_level(logging.ERROR):
        assert cli.main(["inspect", str(shard)]) == 2
    [error] = _errors(caplog)
    assert error.startswith(f"{shard}: HDF5 file unreadable (") and error.endswith(f"sha256 differs from {MANIFEST}")


def test_dataset_replaced_by_another_object_is_reported(
    wiki_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged name can make a field point at something that is not a dataset (here a named datatype)."""
    folder, shard = _damaged_copy(wiki_shards, tmp_path)
    with h5py.File(shard, "r+") as f:
        del f["segment_ids"]
        f["segment_ids"] = np.dtype("u1")
    status, lines = _verify(folder, capsys)
    assert status == 1 and f"{shard}: missing datasets segment_ids; sha256 differs from {MANIFEST}" in lines
    with caplog.at_level(logging.ERROR):
        assert cli.main(["inspect", str(shard)]) == 2
    [error] = _errors(caplog)
    assert error.startswith(f"{shard}: dataset segment_ids unreadable (")


def test_inspect_reports_ids_beyond_the_vocabulary(
    wiki_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, shard = _damaged_copy(wiki_shards, tmp_path)
    with h5py.File(shard, "r+") as f:
        ids = f["input_ids"][:]
        ids[0, 1] = 65000  # outside the test's 4000-piece vocabulary, in the first example shown
        f["input_ids"][...] = ids
    with caplog.at_level(logging.ERROR):
        assert cli.main(["inspect", str(shard), "-n", "1"]) == 2
    [error] = _errors(caplog)
    assert error.startswith(f"{shard}: values out of range (") and "albert-data verify` lists the rows" in error


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--save-interval", "0"),
        ("--log-interval", "0"),
        ("--max-steps", "-1"),
        ("--eval-batches", "0"),
        ("--keep-checkpoints", "0"),
        ("--seed", "-3"),
        ("--dist-timeout", "nan"),
        ("--eval-interval", "-1"),
    ],
)
def test_albert_pretrain_numeric_flags_are_range_checked(flag: str, value: str, capsys) -> None:
    """albert-pretrain's numeric flags: a usage error before any launch (a zero interval would divide by zero)."""
    from pipeline.run_config import parse_args

    required = ["--deepspeed_config", "x.json", "--model-config", "albert-tiny", "--data", "d", "--output", "o"]
    with pytest.raises(SystemExit) as stop:
        parse_args([*required, "--max-steps", "10", flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err
