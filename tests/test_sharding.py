"""The `shard` step on real text: schema, statistics, determinism (workers, MPI ranks), resume, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, SHARD_ARGS

from data_prep.inspection import inspect_shard, verify_folder
from data_prep.shards import FIELDS, Manifest, read_shard
from data_prep.vocab import Vocab


def cli(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, cwd=REPO, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def shard_cmd(corpus: Path, spm: Path, out: Path, *extra: str) -> list[str]:
    return [
        "shard",
        "--input",
        str(corpus),
        "--spm-model",
        str(spm),
        "--output",
        str(out),
        *SHARD_ARGS,
        "--no-progress",
        *extra,
    ]


def shas(folder: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in Manifest.load(folder).shards}


def all_records(folder: Path) -> np.ndarray:
    return np.concatenate([read_shard(folder / s["name"]) for s in Manifest.load(folder).shards])


def test_manifest_and_schema(wiki_shards, spm_model):
    m = Manifest.load(wiki_shards).data
    assert m["num_examples"] == sum(s["num_examples"] for s in m["shards"]) > 3000
    assert m["vocab"]["sha256"] == Vocab(spm_model).sha256
    assert m["settings"]["dupe_factor"] == 2 and m["settings"]["seed"] == 7
    assert (wiki_shards / "spiece.model").read_bytes() == spm_model.read_bytes()
    with h5py.File(wiki_shards / m["shards"][0]["name"]) as f:
        assert sorted(f.keys()) == sorted(FIELDS)
        assert f["input_ids"].dtype == np.uint16 and f["input_ids"].shape[1] == 128
        assert f["masked_lm_positions"].shape[1] == 20 and f["next_sentence_labels"].ndim == 1
        assert f["input_ids"].compression == "gzip"
        assert f.attrs["sentence_task"] == "sop" and f.attrs["sop_label_swapped"] == 1
        assert f.attrs["vocab_sha256"] == m["vocab"]["sha256"] and f.attrs["schema_version"] == 1
        # an NVIDIA-style reader: every dataset as a whole numpy array, same row count
        arrays = [np.asarray(f[k][:]) for k in FIELDS]
        assert len({len(a) for a in arrays}) == 1
    assert verify_folder(wiki_shards) == []


def test_statistics_on_real_text(wiki_shards):
    recs = all_records(wiki_shards)
    vocab = Vocab(wiki_shards / "spiece.model")
    lengths = recs["input_mask"].sum(1).astype(np.int64)
    pos = recs["masked_lm_positions"].astype(np.int64)
    real = pos > 0
    # masked fraction: min(20, max(1, round(0.15 * length))) predictions per example
    budget = np.minimum(20, np.maximum(1, np.rint(lengths * 0.15)))
    assert (real.sum(1) == budget).mean() > 0.97
    assert abs(real.sum() / (lengths - 3).sum() - 0.15) < 0.01
    # SOP balance
    assert abs(recs["next_sentence_labels"].mean() - 0.5) < 0.03
    # 80/10/10
    rows, cols = np.nonzero(real)
    shown = recs["input_ids"][rows, pos[rows, cols]].astype(np.int64)
    original = recs["masked_lm_ids"][rows, cols].astype(np.int64)
    assert abs((shown == vocab.mask_id).mean() - 0.8) < 0.02
    assert abs(((shown != vocab.mask_id) & (shown != original)).mean() - 0.1) < 0.015
    # whole words: a masked continuation piece has its word's previous piece masked too
    ids = recs["input_ids"].astype(np.int64).copy()
    ids[rows, pos[rows, cols]] = original
    masked = np.zeros_like(ids, dtype=bool)
    masked[rows, pos[rows, cols]] = True
    cont = masked & ~vocab.is_word_start[ids] & ~np.isin(ids, [vocab.cls_id, vocab.sep_id, 0])
    cont[:, 1] = False  # a segment may start with a truncated word
    r, c = np.nonzero(cont)
    prev_special = np.isin(ids[r, c - 1], [vocab.cls_id, vocab.sep_id])
    assert (masked[r, c - 1] | prev_special).all()
    nxt = np.clip(pos[rows, cols] + 1, 0, ids.shape[1] - 1)
    follows = ~vocab.is_word_start[ids[rows, nxt]] & ~np.isin(ids[rows, nxt], [vocab.cls_id, vocab.sep_id, 0])
    assert masked[rows[follows], nxt[follows]].all()
    # the n-gram histogram recorded while masking favours short n-grams, n <= 3
    hist = Manifest.load(wiki_shards).data["stats"]["examples"]["ngram_hist"]
    assert len(hist) == 4 and hist[1] > hist[2] > hist[3] > 0


def test_same_shards_with_two_workers(wiki_corpus, spm_model, wiki_shards, tmp_path):
    proc = cli(*shard_cmd(wiki_corpus, spm_model, tmp_path / "w2", "--workers", "2"), check=True)
    assert shas(tmp_path / "w2") == shas(wiki_shards)
    n = Manifest.load(wiki_shards).data["num_examples"]
    assert f"-> {n} examples" in proc.stderr and "examples/s" in proc.stderr  # the summary
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr


@pytest.mark.mpi
def test_same_shards_with_two_mpi_ranks(wiki_corpus, spm_model, wiki_shards, tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "OpenMPI is installed by `make test` (.ci/system-deps.sh)"
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m", "data_prep"]
    proc = subprocess.run(
        cmd + shard_cmd(wiki_corpus, spm_model, tmp_path / "mpi"), capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "MPI: 2 ranks" in proc.stderr  # really two ranks, not two singletons
    assert shas(tmp_path / "mpi") == shas(wiki_shards)


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["examples", "shards"])
def test_killed_run_resumes_to_the_same_shards(stage, wiki_corpus, spm_model, wiki_shards, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", *shard_cmd(wiki_corpus, spm_model, out)],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    marker = (
        (lambda: list((out / ".work" / "spill").glob("f*.bin")))
        if stage == "examples"
        else (lambda: list(out.glob("shard-*.h5")))
    )
    deadline = time.time() + 120
    while not marker() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    refused = cli(*shard_cmd(wiki_corpus, spm_model, out))
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume"), check=True)
    assert shas(out) == shas(wiki_shards)
    assert not (out / ".work").exists() and verify_folder(out) == []


def test_resume_of_a_finished_output_checks_it_and_succeeds(wiki_corpus, spm_model, wiki_shards, tmp_path):
    """--resume on a finished folder (manifest.json, no .work): nothing redone, exit 0; the same command with other
    settings, or a folder that lost a shard, is refused with a message."""
    out = tmp_path / "done"
    shutil.copytree(wiki_shards, out)
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    proc = cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert "shards already complete" in proc.stderr and "examples/s" not in proc.stderr  # no summary: no work
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before and shas(out) == shas(wiki_shards)
    other = cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume", "--seed", "8"))
    assert (
        other.returncode == 2
        and "already complete, but made with other settings" in other.stderr
        and "Traceback" not in other.stderr
    )
    # the same files named another way, from another folder, are the same run
    respelled = os.path.relpath(wiki_corpus, tmp_path)
    assert (
        subprocess.run(
            [sys.executable, "-m", "data_prep", *shard_cmd(respelled, spm_model, out, "--resume")],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        ).returncode
        == 0
    )
    # an input rewritten in place since (here: the manifest remembers another size) is not
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["inputs"][0]["bytes"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    changed = cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume"))
    was = manifest["inputs"][0]
    assert (
        changed.returncode == 2
        and f"made with other inputs ({was['path']}: {was['bytes']} bytes then" in changed.stderr
    ), changed.stderr
    manifest["inputs"][0]["bytes"] -= 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    first = Manifest.load(out).shards[0]["name"]
    (out / first).unlink()
    lost = cli(*shard_cmd(wiki_corpus, spm_model, out, "--resume"))
    assert (
        lost.returncode == 2
        and f"missing or of another size: {first}" in lost.stderr
        and "Traceback" not in lost.stderr
    )


@pytest.mark.integration
@pytest.mark.parametrize("var", ["SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_launched_processes_that_mpi_runs_alone_are_refused(var, wiki_corpus, spm_model, tmp_path):
    """A launcher says 2 processes were started, but mpi4py (real, here a singleton) sees a world of 1: each would do
    the whole work alone (srun without --mpi=pmix, mpi4py built against another MPI). Refused before any work."""
    launchers = ("SLURM_", "OMPI_", "PMI_", "PMIX_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launchers)} | {var: "2"}
    mode = (
        "on" if var.startswith("SLURM") else "auto"
    )  # srun tasks are MPI ranks when asked (slurm/prep.sbatch: --mpi on)
    proc = cli(*shard_cmd(wiki_corpus, spm_model, tmp_path / "out", "--mpi", mode), env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert (
        f"{var}=2: 2 processes were started, but MPI sees a world of 1" in proc.stderr and "--mpi=pmix" in proc.stderr
    ), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    assert "MPI rank 0 of 1" in proc.stdout  # the rank's own line, as in a Slurm job's log
    code = (
        "import sys; from data_prep.mpi import get_world; w = get_world(sys.argv[1]); print(w.size, w.comm is not None)"
    )
    if var.startswith("SLURM"):
        # in auto mode, srun tasks without an MPI plugin are independent single-process runs
        alone = subprocess.run(
            [sys.executable, "-c", code, "auto"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert alone.returncode == 0 and alone.stdout.split("\n")[-2] == "1 False", alone.stdout + alone.stderr
    # a batch script's SLURM_NTASKS (the job's tasks, python started once without srun) is no such count
    env = {k: v for k, v in env.items() if k != var} | {"SLURM_NTASKS": "2"}
    ok = subprocess.run(
        [sys.executable, "-c", code, "on"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert ok.returncode == 0 and ok.stdout.split("\n")[-2] == "1 True", ok.stdout + ok.stderr


def test_missing_input_is_a_one_line_error(spm_model, tmp_path):
    proc = cli(*shard_cmd(tmp_path / "nope", spm_model, tmp_path / "out"))
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_vocabulary_without_control_symbols_is_refused(wiki_corpus, tmp_path):
    import sentencepiece as spm

    text = [line for f in sorted(wiki_corpus.iterdir()) for line in f.read_text().splitlines() if line][:5000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(tmp_path / "plain"), vocab_size=500, minloglevel=2
    )
    proc = cli(*shard_cmd(wiki_corpus, tmp_path / "plain.model", tmp_path / "out"))
    assert proc.returncode == 2 and "[CLS]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists(), "refused before any work"


def test_vocabulary_too_large_for_uint16_is_refused(spm_model, wiki_corpus, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(spm_model.read_bytes())
    for i in range(70000 - len(proto.pieces)):
        proto.pieces.add(piece=f"\u2581filler{i}", score=-50.0, type=pb.ModelProto.SentencePiece.NORMAL)
    big = tmp_path / "big.model"
    big.write_bytes(proto.SerializeToString())
    proc = cli(*shard_cmd(wiki_corpus, big, tmp_path / "out"))
    assert proc.returncode == 2 and "uint16" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_reports_each_problem(wiki_shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(wiki_shards, bad)
    names = [s["name"] for s in Manifest.load(bad).shards]
    with h5py.File(bad / names[0], "r+") as f:
        pos = f["masked_lm_positions"][:]
        pos[3, 0] = 0 if pos[3, 1] == 0 else pos[3, 0]
        sep_at = int(f["input_mask"][5].sum()) - 1
        pos[5, 0] = sep_at  # a prediction on the final [SEP]
        f["masked_lm_positions"][...] = pos
        ids = f["input_ids"][:]
        ids[7, 1] = 65000  # outside a 4000-piece vocabulary
        f["input_ids"][...] = ids
    (bad / names[1]).unlink()
    problems = verify_folder(bad)
    text = "\n".join(problems)
    assert f"{names[0]}: sha256 differs" in text
    assert "input_ids out of the vocabulary: 1 rows (first: row 7)" in text
    assert "masked position on [CLS]/[SEP]" in text or "masked positions not strictly increasing" in text
    assert f"{names[1]}: missing" in text
    proc = cli("verify", str(bad))
    assert proc.returncode == 1 and len(proc.stdout.strip().splitlines()) == len(problems)


def test_inspect_shows_text_masks_and_statistics(wiki_shards):
    lines = inspect_shard(wiki_shards / Manifest.load(wiki_shards).shards[0]["name"], num_examples=2)
    text = "\n".join(lines)
    assert text.count("-- example") == 2 and "[MASK]{" in text and "[CLS]" in text and "[SEP]" in text
    assert (
        "masked fraction:" in text
        and "SOP:" in text
        and "padding fraction:" in text
        and "masked spans in words" in text
    )


def test_albert_tokenizer_gives_the_same_ids(spm_model, wiki_corpus, tmp_path):
    from transformers import AlbertTokenizer

    shutil.copy(spm_model, tmp_path / "spiece.model")
    tok = AlbertTokenizer.from_pretrained(str(tmp_path))
    vocab = Vocab(spm_model)
    lines = [line for line in sorted(wiki_corpus.iterdir())[0].read_text().splitlines() if line][:2000]
    ours, lengths = vocab.encode(lines, 100_000)
    theirs = [tok.encode(s, add_special_tokens=False) for s in lines]
    assert np.split(ours, np.cumsum(lengths)[:-1])[0].tolist() == theirs[0]
    same = sum(a.tolist() == b for a, b in zip(np.split(ours, np.cumsum(lengths)[:-1]), theirs))
    assert same == len(lines)
    assert tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "[MASK]", "<pad>", "<unk>"]) == [2, 3, 4, 0, 1]


def test_more_shards_than_examples_gives_valid_empty_shards(spm_model, tmp_path):
    corpus = tmp_path / "tiny.txt"
    doc = "The first sentence is here.\nA second one follows it.\nThen a third sentence.\nAnd the fourth ends it.\n"
    corpus.write_text("\n".join([doc] * 3))
    out = tmp_path / "out"
    cli(
        "shard",
        "--input",
        str(corpus),
        "--spm-model",
        str(spm_model),
        "--output",
        str(out),
        "--num-shards",
        "20",
        "--dupe-factor",
        "1",
        "--no-progress",
        check=True,
    )
    shards = Manifest.load(out).shards
    assert len(shards) == 20 and 0 < sum(s["num_examples"] for s in shards) < 20
    empty = next(s for s in shards if s["num_examples"] == 0)
    assert len(read_shard(out / empty["name"])) == 0
    assert verify_folder(out) == []


def test_one_big_file_is_shared_by_the_workers(wiki_corpus, spm_model, tmp_path):
    """A single input file is cut into pieces (one task each): same shards with 1 or 2 workers, and the
    same documents and sentences as reading the file whole."""
    big = tmp_path / "one.txt"
    big.write_text("".join(f.read_text() + "\n" for f in sorted(wiki_corpus.iterdir())))
    runs = {}
    for name, piece_mb, workers in (("whole", "1000", "1"), ("w1", "0.1", "1"), ("w2", "0.1", "2")):
        proc = cli(
            *shard_cmd(big, spm_model, tmp_path / name, "--piece-mb", piece_mb, "--workers", workers), check=True
        )
        runs[name] = Manifest.load(tmp_path / name).data
        assert ("1 input files in 1 pieces" in proc.stderr) == (name == "whole"), proc.stderr
    assert shas(tmp_path / "w1") == shas(tmp_path / "w2")
    counts = {
        n: (m["stats"]["documents"], m["stats"]["sentences"], m["stats"]["read"]["files"]) for n, m in runs.items()
    }
    assert counts["whole"] == counts["w1"] == counts["w2"]
    assert runs["w1"]["settings"]["piece_bytes"] == int(0.1 * (1 << 20))
