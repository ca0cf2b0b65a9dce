"""albert-export's chain of custody: it refuses inputs that do not belong together and outputs it did not write,
records where an export came from, and replaces its output whole or not at all; common/output_lock.py's one
writer per folder, with real processes; albert-finetune's refusal of a tokenizer of another size than the model.

In-process tests use ZeRO-0 checkpoints in albert-pretrain's layout written without training (the module's
weights in mp_rank_00_model_states.pt, complete.json, model_config.json, latest). Tests that start processes
(killed exports, lock holders) are in the integration tier; the slow ones train a real two-rank ZeRO-2 run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers.engine_helpers import TEST_MODEL, ds_config, final_params, pretrain
from helpers.model_fixtures import small_config
from safetensors.torch import load_file

from common.output_lock import OutputInUse, OutputLock, hold_output
from pipeline.checkpoint import tag_for
from pipeline.export import main as export_main
from pipeline.export_output import lock_name
from pipeline.hf import to_hf_state_dict
from pipeline.model import AlbertConfig, AlbertForPreTraining

WORDS = (
    "the quick brown fox jumps over lazy dog albert shares layers across depth sentence order prediction masked "
    "language model embedding"
).split()


def train_spm(folder: Path, pieces: int) -> Path:
    """A SentencePiece model with the special pieces AlbertTokenizer expects, of exactly `pieces` pieces."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(200)]
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / f"spm{pieces}"),
        vocab_size=pieces,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        control_symbols="[CLS],[SEP],[MASK]",
        minloglevel=2,
    )
    return folder / f"spm{pieces}.model"


def another_vocabulary(spm_model: Path, dest: Path) -> Path:
    """The same pieces with one score changed: the same size, another vocabulary (another sha256)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model.read_bytes())
    proto.pieces[-1].score -= 1.0
    dest.write_bytes(proto.SerializeToString())
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checkpoint(root: Path, cfg: AlbertConfig, step: int = 3, seed: int = 0, **meta) -> Path:
    """A complete ZeRO-0 checkpoint as albert-pretrain saves it (pipeline/checkpoint.py); returns the tag folder."""
    torch.manual_seed(seed)
    tag_dir = root / tag_for(step)
    tag_dir.mkdir(parents=True)
    torch.save({"module": AlbertForPreTraining(cfg).state_dict()}, tag_dir / "mp_rank_00_model_states.pt")
    recorded = dict(world_size=1, zero_stage=0, precision="fp32", global_batch=4, micro_batch=4)
    recorded.update(optimizer_wrapper="FusedLamb", data=str(root / "no-data"), model_config=cfg.to_dict())
    (tag_dir / "complete.json").write_text(json.dumps({**recorded, **meta, "step": step, "tag": tag_dir.name}))
    cfg.to_json(root / "model_config.json")
    (root / "latest").write_text(tag_dir.name)
    return tag_dir


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with its sha256."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@pytest.fixture
def ckpt(tmp_path) -> Path:
    write_checkpoint(tmp_path / "ckpt", small_config(vocab_size=40))
    return tmp_path / "ckpt"


@pytest.fixture(scope="module")
def spm40(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("vocab40"), 40)


@pytest.fixture(scope="module")
def spm48(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("vocab48"), 48)


def export(caplog, *args) -> int:
    caplog.clear()
    return export_main([str(a) for a in args])


# --- the output folder


@pytest.mark.parametrize("existing", ["config.json", "spiece.model"])
def test_refuses_a_folder_it_did_not_write(ckpt, spm40, tmp_path, caplog, existing):
    """A user's own config.json, a shard folder's spiece.model: never replaced, with or without --overwrite."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / existing).write_text("the user's own file\n")
    before = tree(tmp_path / "mine")
    for overwrite in ([], ["--overwrite"]):
        assert export(caplog, "--checkpoint", ckpt, "--output", out, "--spm-model", spm40, *overwrite) == 2
        (message,) = error_lines(caplog)
        assert message == (
            f"--output {out}: the folder is not empty ({existing}) and is not an earlier albert-export output (no "
            "export.json); albert-export replaces only its own output: choose a new or empty folder"
        )
        assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine"]  # no lock, no temporary folder: checked first


def test_refuses_a_file_as_output(ckpt, tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "file") == 2
    assert error_lines(caplog) == [f"--output {tmp_path / 'file'}: is a file, not a folder; choose a folder"]


def test_writes_into_an_empty_folder(ckpt, tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "empty") == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_overwrite_replaces_only_its_own_unchanged_output(tmp_path, spm40, caplog):
    cfg = small_config(vocab_size=40)
    write_checkpoint(tmp_path / "ckpt", cfg, step=3, seed=0)
    out = tmp_path / "hf"
    assert export(caplog, "--checkpoint", tmp_path / "ckpt", "--output", out, "--spm-model", spm40) == 0
    first = tree(out)

    write_checkpoint(tmp_path / "ckpt", cfg, step=5, seed=1)  # training went on: latest is step 5
    assert export(caplog, "--checkpoint", tmp_path / "ckpt", "--output", out) == 2
    (message,) = error_lines(caplog)
    assert message.startswith(f"--output {out}: holds an earlier export ({(tmp_path / 'ckpt').resolve()}, tag ")
    assert message.endswith("; pass --overwrite to replace it, or choose another folder")
    assert tree(out) == first

    (out / "notes.txt").write_text("results of a probe\n")
    assert export(caplog, "--checkpoint", tmp_path / "ckpt", "--output", out, "--overwrite") == 2
    assert error_lines(caplog) == [
        f"--output {out}: --overwrite would lose what albert-export did not write there (added notes.txt since the "
        "export); move those out of the folder, or choose another folder"
    ]
    (out / "notes.txt").unlink()
    (out / "config.json").write_text((out / "config.json").read_text().replace("64", "65"))
    assert export(caplog, "--checkpoint", tmp_path / "ckpt", "--output", out, "--overwrite") == 2
    assert "(changed or removed config.json since the export)" in error_lines(caplog)[0]

    (out / "config.json").write_text((out / "config.json").read_text().replace("65", "64"))
    assert export(caplog, "--checkpoint", tmp_path / "ckpt", "--output", out, "--overwrite") == 0
    record = json.loads((out / "export.json").read_text())
    assert (record["checkpoint"]["tag"], record["checkpoint"]["step"], record["vocabulary"]) == (
        "step-00000005",
        5,
        None,
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "model.safetensors"]
    assert tree(out)["model.safetensors"] != first["model.safetensors"]
    # what is left beside the output: the lock file, no temporary or replaced folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.lock", "ckpt", "hf"]


def test_record_says_where_the_export_came_from(ckpt, spm40, tmp_path, caplog):
    out = tmp_path / "hf"
    assert export(caplog, "--checkpoint", ckpt, "--output", out, "--spm-model", spm40) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["tool"] == "albert-export"
    assert record["checkpoint"] == {
        "folder": str(ckpt.resolve()),
        "tag": "step-00000003",
        "step": 3,
        "complete_marker": True,
        "metadata": json.loads((ckpt / "step-00000003" / "complete.json").read_text()),
    }
    assert record["model_config"] == small_config(vocab_size=40).to_dict()
    assert record["model_config_from"] == "the checkpoint"
    assert record["vocabulary"] == {
        "source": str(spm40.resolve()),
        "sha256": sha256(spm40),
        "pieces": 40,
        "verified_against": None,  # the checkpoint recorded no vocabulary
    }
    files = sorted(p.name for p in out.iterdir() if p.name != "export.json")
    assert files == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "spiece.model",
        "tokenizer_config.json",
    ]
    assert record["files"] == {name: sha256(out / name) for name in files}
    written = load_file(out / "model.safetensors")
    saved = torch.load(ckpt / "step-00000003" / "mp_rank_00_model_states.pt")["module"]
    assert all(torch.equal(written[k], v) for k, v in to_hf_state_dict(saved).items())
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in out.iterdir()} == {0o666 & ~umask}  # not mkstemp's owner-only


# --- the model config and the vocabulary against the checkpoint


def test_model_config_must_be_the_checkpoints(tmp_path, caplog):
    """A shipped name is accepted as albert-pretrain accepts it; a config of another depth is refused although no
    shape differs (the layers are shared); dropout, which a resumed run may change, is taken from --model-config."""
    tiny = AlbertConfig.from_name_or_path("albert-tiny")
    trained = AlbertConfig(**{**tiny.to_dict(), "hidden_dropout_prob": 0.1})
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, trained)

    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf", "--model-config", "albert-tiny") == 0
    assert AlbertConfig.from_json(tmp_path / "hf" / "config.json") == tiny
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["model_config_from"] == "albert-tiny"

    deeper = tmp_path / "deeper.json"
    deeper.write_text(json.dumps({**tiny.to_dict(), "num_hidden_layers": 12}))
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf2", "--model-config", deeper) == 2
    assert error_lines(caplog) == [
        f"--model-config {deeper}: num_hidden_layers 12, but {ckpt / 'step-00000003'} was trained with "
        f"num_hidden_layers 4 (recorded in {ckpt / 'step-00000003' / 'complete.json'}); leave out --model-config to "
        "export with the checkpoint's own config"
    ]
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf2", "--model-config", "albert-base") == 2
    assert error_lines(caplog)[0].startswith(
        "--model-config albert-base: hidden_size 768, intermediate_size 3072, num_attention_heads 12, "
        "num_hidden_layers 12, but "
    )
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf2", "--model-config", "albert-tinier") == 2
    assert error_lines(caplog)[0].startswith("albert-tinier: no such model config file or shipped config (albert-base")
    assert not (tmp_path / "hf2").exists()


def test_vocabulary_must_be_the_models(ckpt, spm40, spm48, tmp_path, caplog):
    tag_dir = ckpt / "step-00000003"
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf", "--spm-model", spm48) == 2
    assert error_lines(caplog) == [
        f"--spm-model {spm48}: 48 pieces, but the model of {tag_dir} has vocab_size 40; pass "
        f"{ckpt / 'no-data' / 'spiece.model'}"
    ]
    # Same size, another vocabulary: told apart where the checkpoint or its training data recorded the sha256.
    other = another_vocabulary(spm40, tmp_path / "other.model")
    meta = json.loads((tag_dir / "complete.json").read_text())
    (tag_dir / "complete.json").write_text(json.dumps({**meta, "vocab_sha256": sha256(spm40)}))
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf", "--spm-model", other) == 2
    assert error_lines(caplog) == [
        f"--spm-model {other}: sha256 {sha256(other)[:16]}..., but {tag_dir} was trained with the vocabulary "
        f"{sha256(spm40)[:16]}... (recorded in {tag_dir / 'complete.json'}); pass {ckpt / 'no-data' / 'spiece.model'}"
    ]
    data = tmp_path / "shards"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"attributes": {"vocab_sha256": sha256(spm40)}}))
    (tag_dir / "complete.json").write_text(json.dumps({**meta, "data": str(data)}))  # no vocab_sha256 of its own
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf", "--spm-model", other) == 2
    assert f"(recorded in {data / 'manifest.json'}); pass {data / 'spiece.model'}" in error_lines(caplog)[0]
    assert not (tmp_path / "hf").exists()

    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf", "--spm-model", spm40) == 0
    record = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert record["vocabulary"]["verified_against"] == str(data / "manifest.json")


# --- the checkpoint's own state


def test_refuses_a_tag_without_its_completion_marker(tmp_path, caplog):
    cfg = small_config(vocab_size=40)
    write_checkpoint(tmp_path / "ckpt", cfg, step=3)
    write_checkpoint(tmp_path / "ckpt", cfg, step=5)
    (tmp_path / "ckpt" / "step-00000005" / "complete.json").unlink()  # a save killed midway
    partial = tmp_path / "ckpt" / "step-00000005"
    for args in (["--checkpoint", partial], ["--checkpoint", tmp_path / "ckpt", "--tag", "step-00000005"]):
        assert export(caplog, *args, "--output", tmp_path / "hf") == 2
        assert error_lines(caplog) == [
            f"{partial}: no complete.json, so its save did not finish (albert-pretrain writes it last); export "
            "another: complete checkpoints there are step-00000003 (--tag)"
        ]
    assert not (tmp_path / "hf").exists()


def test_refuses_a_truncated_file(ckpt, tmp_path, caplog):
    states = ckpt / "step-00000003" / "mp_rank_00_model_states.pt"
    os.truncate(states, states.stat().st_size // 2)
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf") == 2
    (message,) = error_lines(caplog)
    assert message.startswith(f"{states}: truncated or damaged ({states.stat().st_size} bytes: ")
    assert message.endswith(f"; there is no other complete checkpoint in {ckpt}")


@pytest.mark.integration
def test_cli_error_is_one_line_without_traceback(ckpt, spm48, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.export", "--checkpoint", ckpt, "--output", tmp_path / "hf"]
        + ["--spm-model", spm48],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "ERROR albert-export: --spm-model" in line and "48 pieces" in line


# --- the swap into place, interrupted from outside: a wrapper kills the process


KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import pipeline.export_output
    import pipeline.hf
    from pipeline.export import main

    def die(*args, **kwargs):
        if where == "weights":  # half a model file, then the kill
            with open(args[1], "wb") as f:
                f.write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)

    where = sys.argv.pop(1)
    if where == "weights":
        pipeline.hf.save_file = die
    elif where == "swap":
        pipeline.export_output.swap_into_place = die
    elif where == "aside":  # no atomic exchange: killed once the earlier export is moved aside, before the rename
        pipeline.export_output._exchange = lambda a, b: False
        rename = os.rename

        def rename_then_die(source, dest):
            rename(source, dest)
            if ".replaced-" in str(dest):
                die()

        os.rename = rename_then_die
    sys.exit(main())
""")


def killed_export(where: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, where, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
@pytest.mark.parametrize("where", ["weights", "swap", "aside"])
def test_killed_export_leaves_the_earlier_one_intact(tmp_path, spm40, caplog, where):
    cfg = small_config(vocab_size=40)
    write_checkpoint(tmp_path / "ckpt", cfg, step=3, seed=0)
    out = tmp_path / "hf"
    assert export(caplog, "--checkpoint", tmp_path / "ckpt", "--output", out, "--spm-model", spm40) == 0
    before = tree(out)
    write_checkpoint(tmp_path / "ckpt", cfg, step=5, seed=1)

    proc = killed_export(where, "--checkpoint", tmp_path / "ckpt", "--output", out, "--spm-model", spm40, "--overwrite")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (new,) = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.export-")]  # the new export, beside it
    if where == "aside":  # between two renames: the earlier export whole, under the name it was moved to
        assert not out.exists()
        (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.replaced-")]
        assert tree(aside) == before
    else:
        assert tree(out) == before
    if where != "weights":  # everything was written, record last, under the temporary name
        assert sorted(p.name for p in new.iterdir()) == sorted(before)
        assert json.loads((new / "export.json").read_text())["checkpoint"]["step"] == 5

    # The next export finds the earlier export as it was (one moved aside is put back, under the lock the killed
    # export held: the kernel released it), and with --overwrite replaces it and removes what the killed one left.
    assert export(caplog, "--checkpoint", tmp_path / "ckpt", "--output", out, "--spm-model", spm40) == 2
    assert "holds an earlier export" in error_lines(caplog)[0]
    assert tree(out) == before
    assert export(caplog, "--checkpoint", tmp_path / "ckpt", "--output", out, "--spm-model", spm40, "--overwrite") == 0
    assert json.loads((out / "export.json").read_text())["checkpoint"]["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.lock", "ckpt", "hf"]


@pytest.mark.integration
def test_killed_first_export_leaves_no_output(ckpt, tmp_path):
    out = tmp_path / "hf"
    proc = killed_export("swap", "--checkpoint", ckpt, "--output", out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()


# --- one writer per output: common/output_lock.py with real processes


HOLDER = textwrap.dedent("""
    import sys, time
    from common.output_lock import OutputInUse, hold_output

    folder, start, lock_file, label = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4] or None
    while time.time() < start:  # both racers try at the same moment
        time.sleep(0.001)
    try:
        hold_output(folder, lock_file, label)
    except OutputInUse as e:
        print(e, flush=True)
        sys.exit(3)
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills it)
""")


def start_holder(folder: Path, start: float = 0.0, lock_file: str = ".lock", label: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(start), lock_file, label],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.integration
def test_two_processes_racing_for_one_folder(tmp_path):
    folder = tmp_path / "runs" / "x"
    for _ in range(3):
        start = time.time() + 1.0  # after both have started Python
        racers = [start_holder(folder, start) for _ in range(2)]
        lines = [p.stdout.readline().strip() for p in racers]
        assert sorted(lines)[-1] == "held" and lines.count("held") == 1, lines
        winner, loser = (racers[0], racers[1]) if lines[0] == "held" else (racers[1], racers[0])
        assert loser.wait(timeout=30) == 3
        message = lines[racers.index(loser)]
        assert message.startswith(f"{folder} is in use by pid {winner.pid} on host {socket.gethostname()} since ")
        assert f"(-c {folder} " in message  # the holder's command line
        winner.stdin.close()
        assert winner.wait(timeout=30) == 0


@pytest.mark.integration
def test_a_killed_holder_does_not_block_the_next(tmp_path):
    folder = tmp_path / "x"
    holder = start_holder(folder)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputInUse, match=rf"^{folder} is in use by pid {holder.pid} on host "):
        OutputLock(folder).acquire()
    holder.kill()
    holder.wait(timeout=30)
    with OutputLock(folder) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    following = start_holder(folder)
    assert following.stdout.readline().strip() == "held"
    following.stdin.close()
    assert following.wait(timeout=30) == 0


def test_hold_output_is_held_once_per_process(tmp_path):
    first = hold_output(tmp_path / "y")
    assert hold_output(tmp_path / "y") is first and first.held
    with pytest.raises(OutputInUse, match=f"in use by pid {os.getpid()} "):  # another open file, even here
        OutputLock(tmp_path / "y").acquire()
    first.release()


@pytest.mark.integration
def test_export_refuses_an_output_another_export_is_writing(ckpt, tmp_path, caplog):
    out = tmp_path / "hf"
    holder = start_holder(tmp_path, lock_file=lock_name(out), label=str(out))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert export(caplog, "--checkpoint", ckpt, "--output", out) == 2
        (message,) = error_lines(caplog)
        assert message.startswith(f"{out} is in use by pid {holder.pid} on host {socket.gethostname()} since ")
        assert not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# --- albert-finetune


def test_finetune_refuses_a_tokenizer_of_another_size(tmp_path, spm40, spm48, caplog):
    pytest.importorskip("transformers")
    from pipeline.finetune import main as finetune_main

    write_checkpoint(tmp_path / "ckpt", small_config(vocab_size=48))
    out = tmp_path / "hf"
    assert export(caplog, "--checkpoint", tmp_path / "ckpt", "--output", out, "--spm-model", spm48) == 0
    # a smaller vocabulary, as an earlier albert-export let through (and transformers loads without a word)
    shutil.copyfile(spm40, out / "spiece.model")
    rows = "".join(f"{i}\t{' '.join(WORDS[i % 7 : i % 7 + 5])}\t{'ab'[i % 2]}\n" for i in range(40))
    (tmp_path / "data.tsv").write_text("id\tsentence\tlabel\n" + rows)
    caplog.clear()
    args = ["--model", out, "--data", tmp_path / "data.tsv", "--text-column", "sentence", "--output", tmp_path / "p"]
    assert finetune_main([str(a) for a in args]) == 2
    assert error_lines(caplog) == [
        f"{out}: the tokenizer (spiece.model) has 40 pieces but config.json's vocab_size is 48; export the model "
        "with the vocabulary it was trained on (albert-export --spm-model)"
    ]
    assert not (tmp_path / "p" / "results.json").exists()


# --- real checkpoints of albert-pretrain: two ranks, ZeRO-2


@pytest.fixture(scope="module")
def trained(wiki_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export-run") / "run"
    proc = pretrain(run, wiki_shards, ds_config(2, "fp32"), steps=3, nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


def run_export(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.export", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )


@pytest.mark.slow
def test_export_of_a_real_run(trained, wiki_shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    proc = run_export(
        "--checkpoint", trained / "checkpoints", "--output", out, "--spm-model", wiki_shards / "spiece.model"
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "export.json").read_text())
    assert (record["checkpoint"]["tag"], record["checkpoint"]["step"]) == ("step-00000003", 3)
    assert record["checkpoint"]["metadata"]["world_size"] == 2 and record["model_config"] == TEST_MODEL
    tag_dir = trained / "checkpoints" / "step-00000003"
    assert record["vocabulary"]["verified_against"] == str(tag_dir / "complete.json")  # the checkpoint's record
    assert record["files"] == {name: sha256(out / name) for name in record["files"]}
    hf = transformers.AlbertForPreTraining.from_pretrained(out)
    weights = hf.state_dict()
    for name, value in to_hf_state_dict(final_params(trained)).items():
        assert torch.equal(weights[name], value), name
    assert transformers.AlbertTokenizer.from_pretrained(out).mask_token == "[MASK]"

    again = run_export("--checkpoint", trained / "checkpoints", "--output", out, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "export.json").read_text())["vocabulary"] is None
    assert not (out / "spiece.model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.lock", "hf"]


@pytest.mark.slow
def test_real_run_refuses_another_depth_and_another_vocabulary(
    trained, wiki_shards, spm40, tmp_path, caplog, monkeypatch
):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # should a check fail to refuse, consolidating would set it here
    ckpt, tag_dir = trained / "checkpoints", trained / "checkpoints" / "step-00000003"
    deeper = tmp_path / "deeper.json"
    deeper.write_text(json.dumps({**TEST_MODEL, "num_hidden_layers": 4}))  # no weight changes shape
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf", "--model-config", deeper) == 2
    assert error_lines(caplog) == [
        f"--model-config {deeper}: num_hidden_layers 4, but {tag_dir} was trained with num_hidden_layers 2 (recorded "
        f"in {tag_dir / 'complete.json'}); leave out --model-config to export with the checkpoint's own config"
    ]
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf", "--spm-model", spm40) == 2
    assert error_lines(caplog) == [
        f"--spm-model {spm40}: 40 pieces, but the model of {tag_dir} has vocab_size 4000; pass "
        f"{wiki_shards / 'spiece.model'}"
    ]
    other = another_vocabulary(wiki_shards / "spiece.model", tmp_path / "other.model")
    assert export(caplog, "--checkpoint", ckpt, "--output", tmp_path / "hf", "--spm-model", other) == 2
    assert f"(recorded in {tag_dir / 'complete.json'})" in error_lines(caplog)[0]
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_real_run_refuses_a_missing_or_truncated_rank_file(trained, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    damaged = tmp_path / "checkpoints"
    shutil.copytree(trained / "checkpoints", damaged)
    tag_dir = damaged / "step-00000003"
    rank1 = tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(rank1, 4096)
    assert export(caplog, "--checkpoint", damaged, "--output", tmp_path / "hf") == 2
    (message,) = error_lines(caplog)
    assert message.startswith(f"{rank1}: truncated or damaged (4096 bytes: ")
    rank1.unlink()
    assert export(caplog, "--checkpoint", damaged, "--output", tmp_path / "hf") == 2
    assert error_lines(caplog) == [
        f"{tag_dir}: zero_pp_rank_1_mp_rank_00_optim_states.pt missing (it was saved by 2 ranks); there is no other "
        f"complete checkpoint in {damaged}"
    ]
    assert not (tmp_path / "hf").exists()
