"""slurm/*.sbatch for real: a Slurm cluster of two emulated nodes on this machine (tests/slurm/local-slurm.sh:
Debian's slurmctld + 2 slurmd + munge), jobs submitted with `sbatch` on tiny data and a tiny model.

- prep.sbatch: 2 MPI ranks (srun --mpi=pmix) on 2 nodes; the shards verify and equal a single-process run;
- pretrain.sbatch: 2 ranks on 2 nodes over gloo (CPU mode), and the GPU mode on fake GPUs (Gres backed by
  /dev/null copies: the allocation, one task per GPU and CUDA_VISIBLE_DEVICES are real, the GPUs are not);
- warned (`scancel --signal=USR1`): a checkpoint, the job requeues itself, resumes and reaches --max-steps,
  having seen every example exactly once per epoch, in the order of an uninterrupted run;
- a missing data folder and unreachable nodes fail fast with a clear message in the job's log.

Needs root (the daemons) and Debian packages that the harness installs when missing (.ci/system-deps.sh).
The cluster is stopped when the module's tests are done.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO
from helpers.engine_helpers import TEST_MODEL, ds_config

HARNESS = REPO / "tests" / "slurm" / "local-slurm.sh"
SLURM_ROOT = Path(os.environ.get("LOCAL_SLURM_ROOT", "/var/tmp/albert-slurm"))
PREP = REPO / "slurm" / "prep.sbatch"
PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
FAKE_GPUS = 2
MICRO = 32  # x 2 ranks = a global batch of 64
SEED = 42  # albert-pretrain's default --seed (the data order)
PREP_JOB = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=20"]
CPU_JOB = ["--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=20"]
IMPOSSIBLE = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "ReqNodeNotAvail", "InvalidQOS"}
END_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


# --------------------------------------------------------------------------------------------- the cluster


class Cluster:
    def __init__(self, env: dict[str, str]):
        self.env = env

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, check=False, capture_output=True, text=True, timeout=60, **kw)
        if check:
            assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}"
        return proc

    def submit(
        self,
        script: Path | str,
        log: Path,
        sbatch_opts: list[str],
        args: list[str] = (),
        env: dict | None = None,
        cwd: Path | None = None,
    ) -> str:
        proc = subprocess.run(
            ["sbatch", "--parsable", f"--output={log}", *sbatch_opts, str(script), *args],
            env={**self.env, **(env or {})},
            cwd=cwd or log.parent,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, log: Path, timeout: float = 600, until=None) -> dict[str, str]:
        """Poll until the job ends (or until(info) is true); on a timeout cancel it and fail with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info) if until else info.get("JobState") in END_STATES:
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason") in IMPOSSIBLE:
                self.run("scancel", job_id, check=False)
                pytest.fail(f"job {job_id} can never start on this cluster (Reason={info['Reason']})")
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        pytest.fail(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s; log:\n{read(log)}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def private_extensions_dir(dest: Path) -> Path:
    """Jobs get their own TORCH_EXTENSIONS_DIR, seeded with the ops already built in the user's cache: a rank that
    Slurm kills while it holds an op's build lock (srun --kill-on-bad-exit, scancel) then never blocks other runs."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if "TORCH_EXTENSIONS_DIR" in os.environ:
        shared = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    else:  # as torch.utils.cpp_extension names it: ~/.cache/torch_extensions/py311_cpu (or _cu128 ...)
        accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        shared = (
            Path(get_default_build_root())
            / f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}"
        )
    if shared.is_dir():
        for op in shared.iterdir():
            if op.is_dir() and not (op / "lock").exists() and any(op.glob("*.so")):
                shutil.copytree(op, dest / op.name, dirs_exist_ok=True)  # with the mtimes: ninja finds nothing to do
    dest.mkdir(parents=True, exist_ok=True)
    # Build (or check) the op now, with the jobs' ninja (the venv's, first on PATH once the job activates the venv):
    # a build inside a job would cost the job a minute, and a ninja of another version rebuilds everything.
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(dest),
        "DS_ACCELERATOR": "cpu",
        "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    code = "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests start slurmctld/slurmd/munged and need root (CI runs them as root)")
    # Another test session on this machine may use the same cluster: each holds a shared lock while it does,
    # and the last one out (the one that gets the exclusive lock) stops the daemons.
    SLURM_ROOT.mkdir(parents=True, exist_ok=True)
    users = open(SLURM_ROOT / "sessions.lock", "a")
    fcntl.flock(users, fcntl.LOCK_SH)
    env = {
        **os.environ,
        "LOCAL_SLURM_ROOT": str(SLURM_ROOT),
        "LOCAL_SLURM_NODES": "2",
        "LOCAL_SLURM_FAKE_GPUS": str(FAKE_GPUS),
    }
    try:
        proc = subprocess.run(
            ["bash", str(HARNESS), "start"], env=env, check=False, capture_output=True, text=True, timeout=900
        )
        if proc.returncode == 3:
            pytest.skip(f"Slurm packages could not be installed: {proc.stderr.strip().splitlines()[-1:]}")
        assert proc.returncode == 0, f"local Slurm cluster did not start:\n{proc.stdout}{proc.stderr}"
        env["SLURM_CONF"] = str(SLURM_ROOT / "slurm.conf")
        env["TORCH_EXTENSIONS_DIR"] = str(private_extensions_dir(tmp_path_factory.mktemp("torch_extensions")))
        env["PYTHONUNBUFFERED"] = "1"
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        c = Cluster(env)
        nodes = c.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
        assert [n.split()[0] for n in nodes if n] == ["node1", "node2"], nodes
        yield c
    finally:
        fcntl.flock(users, fcntl.LOCK_UN)
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            subprocess.run(
                ["bash", str(HARNESS), "stop"], env=env, check=False, capture_output=True, text=True, timeout=120
            )
        except BlockingIOError:
            pass  # still in use by another session, which stops it
        finally:
            users.close()


def rank_lines(log: str) -> dict[int, str]:
    """Each rank's own first line ("[rank R] node N host H ..."): rank -> node name."""
    return {int(r): node for r, node in re.findall(r"^\[rank (\d+)\] node (\S+) host ", log, re.MULTILINE)}


# --------------------------------------------------------------------------------------------- data preparation


@pytest.fixture(scope="module")
def prepared(cluster, wiki_corpus, spm_model, tmp_path_factory):
    """slurm/prep.sbatch on the 4-file Wikipedia corpus: 2 nodes x 1 MPI rank, 2 shards."""
    work = tmp_path_factory.mktemp("slurm-prep")
    out, log = work / "shards", work / "prep.log"
    t0 = time.monotonic()
    env = {"INPUT": str(wiki_corpus), "SPM_MODEL": str(spm_model), "OUTPUT": str(out), "NUM_SHARDS": "2"}
    job = cluster.submit(PREP, log, PREP_JOB, ["--dupe-factor", "1", "--seed", "7"], env=env)
    info = cluster.wait(job, log, timeout=300)
    return {
        "job": job,
        "info": info,
        "log": log,
        "out": out,
        "seconds": time.monotonic() - t0,
        "cluster": cluster,
        "env": env,
    }


def test_prep_job_two_mpi_ranks_on_two_nodes_same_shards_as_one_process(prepared, wiki_corpus, spm_model, tmp_path):
    """2 nodes x 1 rank; then the same job again on the finished folder."""
    from data_prep.cli import main

    log = read(prepared["log"])
    assert prepared["info"]["JobState"] == "COMPLETED" and prepared["info"]["ExitCode"] == "0:0", log
    # the ranks' own lines: one MPI world of 2, on two different nodes
    assert re.search(r"^\[rank 0\] node node1 host \S+: MPI rank 0 of 2$", log, re.MULTILINE), log
    assert re.search(r"^\[rank 1\] node node2 host \S+: MPI rank 1 of 2$", log, re.MULTILINE), log
    assert "MPI: 2 ranks" in log and "all shards verified" in log, log
    out = prepared["out"]
    assert (
        subprocess.run(
            [sys.executable, "-m", "data_prep", "verify", str(out), "--no-progress"], cwd=REPO, check=False
        ).returncode
        == 0
    )
    # a single process with the same settings makes the same bytes
    single = tmp_path / "single"
    args = [
        "shard",
        "--input",
        str(wiki_corpus),
        "--spm-model",
        str(spm_model),
        "--output",
        str(single),
        "--num-shards",
        "2",
        "--dupe-factor",
        "1",
        "--seed",
        "7",
        "--mpi",
        "off",
        "--no-progress",
    ]
    assert main(args) == 0
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, single))
    assert a["num_examples"] == b["num_examples"] > 0
    assert [(s["name"], s["sha256"]) for s in a["shards"]] == [(s["name"], s["sha256"]) for s in b["shards"]]
    for s in a["shards"]:
        assert (out / s["name"]).read_bytes() == (single / s["name"]).read_bytes()
    # submitted again on the finished folder: the ranks find it complete (albert-data shard --resume) and redo
    # nothing; then it is verified
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    log2 = tmp_path / "again.log"
    job = cluster_submit_prep(prepared, log2, {"OUTPUT": str(out)})
    info = prepared["cluster"].wait(job, log2, timeout=120)
    text = read(log2)
    assert info["JobState"] == "COMPLETED" and "--resume" in text and "shards already complete" in text, text
    assert "all shards verified" in text and "examples/s" not in text, text  # no summary line: no work done
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before


def cluster_submit_prep(prepared, log: Path, env: dict, args: list[str] = ("--dupe-factor", "1", "--seed", "7")) -> str:
    return prepared["cluster"].submit(PREP, log, PREP_JOB, list(args), env={**prepared["env"], **env})


def test_prep_job_prepare_command_corpus_on_rank0_then_shards_on_all(prepared, wiki_corpus, spm_model, tmp_path):
    """PREP_COMMAND=prepare: rank 0 writes the corpus (the vocabulary is given), then both ranks make the shards,
    byte-identical to a single-process `albert-data prepare`.

    VERIFY=0: these settings make one example with no masked prediction ("[CLS] documentary . [SEP] germany .
    [SEP]": a budget of 1 token, every word 2 pieces), which `albert-data verify` reports - a data_prep issue
    that a single process shows as well; the Slurm side is what this test checks."""
    from data_prep.cli import main

    out, log = tmp_path / "data", tmp_path / "prepare.log"
    args = ["--spm-model", str(spm_model), "--num-files", "4", "--dupe-factor", "1", "--seed", "7"]
    job = cluster_submit_prep(prepared, log, {"PREP_COMMAND": "prepare", "OUTPUT": str(out), "VERIFY": "0"}, args)
    info = prepared["cluster"].wait(job, log, timeout=300)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert rank_lines(text) == {0: "node1", 1: "node2"} and "MPI rank 1 of 2" in text and "MPI: 2 ranks" in text, text
    assert len(list((out / "corpus").glob("*.txt"))) == 4
    single = tmp_path / "single"
    assert (
        main(
            [
                "prepare",
                "--input",
                str(wiki_corpus),
                "--output",
                str(single),
                "--num-shards",
                "2",
                "--mpi",
                "off",
                "--no-progress",
                *args,
            ]
        )
        == 0
    )
    a, b = (json.loads((d / "shards" / "manifest.json").read_text()) for d in (out, single))
    assert a["num_examples"] == b["num_examples"] > 0
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


# --------------------------------------------------------------------------------------------- pretraining


def write_configs(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ds.json").write_text(json.dumps(ds_config(2, "fp32", micro=MICRO, warmup=2)))
    (folder / "model.json").write_text(json.dumps(TEST_MODEL))
    return {"DS_CONFIG": str(folder / "ds.json"), "MODEL_CONFIG": str(folder / "model.json")}


def metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1] if line.strip()]  # whole lines only


def test_pretrain_job_cpu_two_ranks_on_two_nodes(cluster, prepared, tmp_path):
    out, log = tmp_path / "run", tmp_path / "pretrain.log"
    env = {
        "ALBERT_CPU": "1",
        "DATA": str(prepared["out"]),
        "OUTPUT": str(out),
        "MAX_STEPS": "4",
        "LOG_INTERVAL": "1",
        **write_configs(tmp_path / "configs"),
    }
    # submitted as the README says, from the repository root with a relative path
    job = cluster.submit("slurm/pretrain.sbatch", log, CPU_JOB, ["--record-batches"], env=env, cwd=REPO)
    info = cluster.wait(job, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert f"repo {REPO}, python {REPO}/.venv/bin/python" in text, text  # the repository's venv
    assert "cpu mode, 2 node(s) [node[1-2]] x 1 task(s) = 2 rank(s)" in text, text
    assert rank_lines(text) == {0: "node1", 1: "node2"}, text
    # the ranks' own rendezvous (pipeline/distributed.py): the first node, 20000 + job id % 20000
    assert f"launcher: srun, 2 rank(s), backend gloo, rendezvous node1:{20000 + int(job) % 20000}" in text, text
    # each rank trained: its own record of the examples of every step
    for r in (0, 1):
        steps = [json.loads(line)["step"] for line in (out / f"batches-rank{r}.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
    assert metrics_steps(out) == [1, 2, 3, 4]
    done = json.loads((out / "checkpoints" / "step-00000004" / "complete.json").read_text())
    assert done["world_size"] == 2
    assert json.loads((out / "finished.json").read_text())["step"] == 4
    assert any((out / "tensorboard").iterdir())
    # submitted again: nothing left to do, no srun
    log2 = tmp_path / "again.log"
    info = cluster.wait(cluster.submit(PRETRAIN, log2, CPU_JOB, env=env), log2, timeout=120)
    assert info["JobState"] == "COMPLETED" and "already finished" in read(log2) and not rank_lines(read(log2))


def test_pretrain_job_resubmitted_on_fewer_nodes_resumes(cluster, prepared, tmp_path):
    """2 nodes x 1 rank for 3 steps, then the same job on 1 node: the checkpoint is converted (same global batch: the
    config fixes train_batch_size, accumulation follows the ranks) and the run continues to step 5."""
    out, configs = tmp_path / "run", write_configs(tmp_path / "configs")
    ds = json.loads(Path(configs["DS_CONFIG"]).read_text())
    del ds["gradient_accumulation_steps"]
    ds["train_batch_size"] = 2 * MICRO
    Path(configs["DS_CONFIG"]).write_text(json.dumps(ds))
    env = {"ALBERT_CPU": "1", "DATA": str(prepared["out"]), "OUTPUT": str(out), "LOG_INTERVAL": "1", **configs}
    log = tmp_path / "two.log"
    info = cluster.wait(cluster.submit(PRETRAIN, log, CPU_JOB, env={**env, "MAX_STEPS": "3"}), log)
    assert info["JobState"] == "COMPLETED" and metrics_steps(out) == [1, 2, 3], read(log)
    (out / "finished.json").unlink()  # the run goes on to a later --max-steps
    log = tmp_path / "one.log"
    one_node = ["--nodes=1", *CPU_JOB[1:]]
    info = cluster.wait(
        cluster.submit(PRETRAIN, log, one_node, ["--record-batches"], env={**env, "MAX_STEPS": "5"}), log
    )
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert "resuming at step 3 from a checkpoint of 2 rank(s) (ZeRO-2) on 1 rank(s): the training converts it" in text
    assert "resuming a 2-rank ZeRO-2 (fp32) checkpoint on 1 rank with ZeRO-2 (fp32)" in text, text
    assert metrics_steps(out) == [1, 2, 3, 4, 5]
    assert json.loads((out / "checkpoints" / "step-00000005" / "complete.json").read_text())["world_size"] == 1


def shard_examples(folder: Path) -> Counter:
    """CRC32 of every example's input_ids, as the engine's --record-batches computes it (int64 rows)."""
    seen: Counter = Counter()
    manifest = json.loads((folder / "manifest.json").read_text())
    for s in manifest["shards"]:
        with h5py.File(folder / s["name"], "r") as f:
            ids = f["input_ids"][:].astype(np.int64)
        seen.update(zlib.crc32(row.tobytes()) for row in ids)
    return seen


def uninterrupted_order(folder: Path, steps: int, world: int = 2) -> dict[int, list[list[int]]]:
    """What each rank's loader yields for steps 1..steps without any interruption: rank -> per step CRC32s."""
    from pipeline.data import PretrainingData

    order = {}
    for rank in range(world):
        data = PretrainingData(folder, MICRO, 1, rank, world, SEED)
        it = iter(data)
        order[rank] = [[zlib.crc32(row.numpy().tobytes()) for row in next(it)["input_ids"]] for _ in range(steps)]
        data.close()
    return order


def test_pretrain_job_warned_checkpoints_requeues_and_resumes_sample_exact(cluster, prepared, tmp_path):
    data = prepared["out"]
    n = json.loads((data / "manifest.json").read_text())["num_examples"]
    per_epoch = n // (MICRO * 2)
    dropped = n - per_epoch * MICRO * 2
    max_steps = per_epoch + 12  # one whole epoch, then into the next
    out, log = tmp_path / "run", tmp_path / "pretrain.log"
    env = {
        "ALBERT_CPU": "1",
        "DATA": str(data),
        "OUTPUT": str(out),
        "MAX_STEPS": str(max_steps),
        "LOG_INTERVAL": "1",
        "SAVE_INTERVAL": "100000",
        **write_configs(tmp_path / "configs"),
    }
    job = cluster.submit(PRETRAIN, log, CPU_JOB, ["--record-batches", "--keep-checkpoints", "5"], env=env)

    # training is under way: warn the job as Slurm does before its time limit (--signal=USR1@...)
    deadline = time.monotonic() + 400
    while len(metrics_steps(out)) < 2:
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), read(log)
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", job)

    # the job saves, exits and requeues itself: same job ID, pending again
    info = cluster.wait(
        job, log, timeout=300, until=lambda i: i.get("Restarts") == "1" or i.get("JobState") in END_STATES
    )
    text = read(log)
    assert info.get("Restarts") == "1", text
    stopped = re.search(r"stopped by a signal at step (\d+); checkpoint saved", text)
    assert stopped, text
    stop_step = int(stopped.group(1))
    assert 2 <= stop_step < max_steps, text
    assert f"requeueing job {job} to resume" in text, text
    assert (out / "checkpoints" / f"step-{stop_step:08d}" / "complete.json").exists()
    # Slurm holds a requeued job for about 2 minutes (BeginTime) so that the old run's job credential, revoked with
    # one-second resolution, cannot be confused with the new one's; a few seconds are enough here: start it then
    if info.get("JobState") != "COMPLETED":
        info = cluster.wait(
            job, log, timeout=60, until=lambda i: i.get("JobState") in {"PENDING", "RUNNING"} | END_STATES
        )
        time.sleep(3)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)  # fails if it already started

    info = cluster.wait(job, log, timeout=600)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text
    assert f"job {job} (albert-pretrain) restart 1: cpu mode" in text, text
    assert f"resumed from {out}/checkpoints/step-{stop_step:08d}" in text, text
    assert json.loads((out / "finished.json").read_text())["step"] == max_steps
    assert metrics_steps(out) == list(range(1, max_steps + 1))
    assert (out / "checkpoints" / f"step-{max_steps:08d}" / "complete.json").exists()

    # every step's examples, per rank, exactly as an uninterrupted run would have seen them
    recorded = {
        r: [json.loads(line) for line in (out / f"batches-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    }
    expected = uninterrupted_order(data, max_steps)
    for r in (0, 1):
        assert [rec["step"] for rec in recorded[r]] == list(range(1, max_steps + 1))
        assert [rec["examples"] for rec in recorded[r]] == expected[r], f"rank {r} saw other examples after the restart"
    # and each epoch saw every example once, except the documented remainder (fewer than one global batch)
    every = shard_examples(data)
    assert sum(every.values()) == n
    for epoch in range(2):
        steps = range(epoch * per_epoch, min((epoch + 1) * per_epoch, max_steps))
        seen = Counter(crc for r in (0, 1) for s in steps for crc in recorded[r][s]["examples"])
        assert not seen - every, f"epoch {epoch}: an example seen more often than it exists"
        if epoch == 0:
            assert sum(seen.values()) == per_epoch * MICRO * 2 and sum((every - seen).values()) == dropped < MICRO * 2


def test_pretrain_job_gpu_mode_one_task_per_gpu(cluster, prepared, tmp_path):
    """The default (GPU) mode on nodes with 2 fake GPUs each: --gpus-per-node=1 gives 1 task per node that sees
    its GPU in CUDA_VISIBLE_DEVICES. torch finds no CUDA here, so the ranks still train over gloo on the CPU."""
    out, log = tmp_path / "run", tmp_path / "pretrain.log"
    env = {
        "DATA": str(prepared["out"]),
        "OUTPUT": str(out),
        "MAX_STEPS": "3",
        "LOG_INTERVAL": "1",
        **write_configs(tmp_path / "configs"),
    }
    job = cluster.submit(
        PRETRAIN,
        log,
        ["--nodes=2", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=20"],
        env=env,
    )
    info = cluster.wait(job, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert "gpu mode, 2 node(s) [node[1-2]] x 1 task(s) = 2 rank(s), 1 CPU(s)/task, GPUs/node 1" in text, text
    assert rank_lines(text) == {0: "node1", 1: "node2"}, text
    assert len(re.findall(r"^\[rank \d\] node node\d host \S+ local rank 0 of 2 GPUs 0$", text, re.MULTILINE)) == 2, (
        text
    )
    assert metrics_steps(out) == [1, 2, 3]


def test_pretrain_job_scancel_saves_a_checkpoint_and_is_not_requeued(cluster, prepared, tmp_path):
    """`scancel JOBID` (SIGTERM to the batch script and the ranks): the ranks save before KillWait runs out; the
    script waits for them and does not requeue; the checkpoint is there to resume from."""
    out, log = tmp_path / "run", tmp_path / "pretrain.log"
    env = {
        "ALBERT_CPU": "1",
        "DATA": str(prepared["out"]),
        "OUTPUT": str(out),
        "MAX_STEPS": "100000",
        "LOG_INTERVAL": "1",
        **write_configs(tmp_path / "configs"),
    }
    job = cluster.submit(PRETRAIN, log, CPU_JOB, env=env)
    deadline = time.monotonic() + 400
    while len(metrics_steps(out)) < 2:
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), read(log)
        time.sleep(0.1)
    cluster.run("scancel", job)
    info = cluster.wait(job, log, timeout=120)
    time.sleep(1)  # the batch script's last lines
    text = read(log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", text
    stopped = re.search(r"stopped by a signal at step (\d+); checkpoint saved", text)
    assert stopped and "received SIGTERM" in text, text
    assert (out / "checkpoints" / f"step-{int(stopped.group(1)):08d}" / "complete.json").exists()
    assert "stopped by SIGTERM with a checkpoint; resubmit the same command to continue" in text, text


# --------------------------------------------------------------------------------------------- failing fast


def test_pretrain_job_missing_data_fails_fast(cluster, tmp_path):
    log = tmp_path / "pretrain.log"
    env = {
        "ALBERT_CPU": "1",
        "DATA": str(tmp_path / "no-such-shards"),
        "OUTPUT": str(tmp_path / "run"),
        **write_configs(tmp_path / "c"),
    }
    t0 = time.monotonic()
    info = cluster.wait(cluster.submit(PRETRAIN, log, CPU_JOB, env=env), log, timeout=120)
    text = read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", text
    assert f"ERROR: DATA={tmp_path / 'no-such-shards'}: no manifest.json there" in text, text
    assert not rank_lines(text)  # refused before any srun
    assert time.monotonic() - t0 < 60


def test_pretrain_job_nodes_cannot_reach_rank0_fails_fast(cluster, prepared, tmp_path):
    """Rank 0's address is one no node can reach (TEST-NET-1): rank 1 gives up after DIST_TIMEOUT with a clear
    message, srun ends rank 0 at once, and the job fails without waiting for the process-group timeout."""
    out, log = tmp_path / "run", tmp_path / "pretrain.log"
    env = {
        "ALBERT_CPU": "1",
        "DATA": str(prepared["out"]),
        "OUTPUT": str(out),
        "MAX_STEPS": "2",
        "RDZV_ADDR": "192.0.2.1",
        "DIST_TIMEOUT": "10",
        **write_configs(tmp_path / "configs"),
    }
    t0 = time.monotonic()
    job = cluster.submit(PRETRAIN, log, CPU_JOB, env=env)
    info = cluster.wait(job, log, timeout=300)
    elapsed = time.monotonic() - t0
    text = read(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text
    assert rank_lines(text) == {0: "node1", 1: "node2"}, text
    port = 20000 + int(job) % 20000  # RDZV_ADDR only: the port is the ranks' default
    assert "rendezvous 192.0.2.1:<20000 + job id % 20000>" in text, text  # the job's line
    assert f"rank 1: cannot reach rank 0 at 192.0.2.1:{port} within 10 s" in text, text
    assert "training failed" in text and "not requeued" in text, text
    assert not (out / "checkpoints").exists()
    assert elapsed < 180, f"took {elapsed:.0f} s"


# --------------------------------------------------------------------------------------------- without a cluster
# The scripts' shell logic, run by hand with the variables Slurm would set (no daemons, no root).


def run_bash(script: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in {"GPUS_PER_NODE", "REPO", "ALBERT_CPU"}
    }
    return subprocess.run(
        ["bash", "-c", script],
        env={**clean, **env},
        cwd=cwd or REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "env, gpus",
    [
        ({"SLURM_GPUS_PER_NODE": "4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, "4"),  # --gpus-per-node=a100:4
        ({"SLURM_GPUS_PER_NODE": "a100:2,v100:2"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:4(IDX:0-3)"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "0"}, "0"),  # --gpus-per-node=0: CPU mode
        ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS": "4", "SLURM_JOB_GPUS": "0,1"}, "2"),  # --gpus=4 or --gres=gpu:2
        ({"GPUS_PER_NODE": "h100:8", "SLURM_GPUS_PER_NODE": "unreadable"}, "8"),
        ({}, "0"),  # a job without GPUs
    ],
)
def test_gpus_per_node_reads_the_forms_slurm_sets(env, gpus):
    proc = run_bash(". slurm/common.sh && gpus_per_node", env)
    assert proc.returncode == 0 and proc.stdout == gpus + "\n", proc.stdout + proc.stderr


def test_option_value_is_the_one_argparse_keeps():
    proc = run_bash(
        '. slurm/common.sh && option_value --output d --data x --output a "b c" --output=e && option_value --output d --outputs z'
        " && option_value --data d --data",
        {},
    )
    assert proc.stdout.split("\n") == ["e", "d", "", ""], proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"SLURM_GPUS_PER_NODE": "a100:four"},
            "ERROR: cannot read the GPUs per node from SLURM_GPUS_PER_NODE=a100:four",
        ),
        ({"SLURM_GPUS": "16"}, "ERROR: the job has GPUs (SLURM_GPUS=16) but not their number per node"),
        ({"SLURM_JOB_GPUS": "0,1"}, "ERROR: the job has GPUs (SLURM_JOB_GPUS=0,1) but not their number per node"),
        (
            {"SLURM_STEP_GPUS": "0"},
            "ERROR: the job has GPUs (SLURM_STEP_GPUS=0) but not their number per node",
        ),  # GPU index 0
    ],
)
def test_pretrain_job_with_gpus_it_cannot_count_stops(env, message, tmp_path):
    """Not CPU mode in silence: the job stops with a message; ALBERT_CPU=1 still chooses CPU mode."""
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "nodeA", "DATA": str(tmp_path / "none"), **env}
    proc = run_bash(f"bash {PRETRAIN}", job)
    assert proc.returncode == 2 and message in proc.stdout and "GPUS_PER_NODE=N" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    assert " mode, " not in proc.stdout
    proc = run_bash(f"bash {PRETRAIN}", {**job, "ALBERT_CPU": "1"})
    assert proc.returncode == 2 and "cpu mode, 1 node(s) [nodeA]" in proc.stdout and "ERROR: DATA=" in proc.stdout, (
        proc.stdout
    )


def test_scripts_find_common_sh_as_a_spool_copy_or_say_they_cannot(tmp_path):
    """Under sbatch a script runs as a copy in Slurm's spool folder: slurm/common.sh is found from the submission
    folder (or REPO), else the job stops with a clear message."""
    spool = tmp_path / "spool"
    spool.mkdir()
    for script in (PREP, PRETRAIN):
        shutil.copy(script, spool / "slurm_script")
        lost = run_bash("bash slurm_script", {"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(spool)}, cwd=spool)
        assert lost.returncode == 2 and f"[{script.name}] ERROR: slurm/common.sh not found" in lost.stdout, (
            lost.stdout + lost.stderr
        )
        assert "set REPO" in lost.stdout
        manual = run_bash(f"bash {script}", {})
        assert manual.returncode == 2 and "ERROR: submit with sbatch" in manual.stdout, manual.stdout + manual.stderr
    job = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "nodeA",
        "ALBERT_CPU": "1",
        "DATA": str(tmp_path / "none"),
        "MASTER_ADDR": "stale",
    }
    for where in ({"SLURM_SUBMIT_DIR": str(REPO)}, {"SLURM_SUBMIT_DIR": str(spool), "REPO": str(REPO)}):
        found = run_bash("bash slurm_script", {**job, **where}, cwd=spool)
        assert found.returncode == 2 and f"repo {REPO}, python " in found.stdout, found.stdout + found.stderr
        assert (
            "rendezvous <first node>:<20000 + job id % 20000>" in found.stdout
            and f"ERROR: DATA={tmp_path / 'none'}: no manifest.json" in found.stdout
        )
    given = run_bash(
        "bash slurm_script",
        {**job, "SLURM_SUBMIT_DIR": str(REPO), "RDZV_ADDR": "ib-node", "RDZV_PORT": "31000"},
        cwd=spool,
    )
    assert "rendezvous ib-node:31000" in given.stdout, given.stdout


def test_first_host_without_scontrol(monkeypatch):
    """Inside a container scontrol is usually missing: the node list is read by hand, suffixes kept."""
    from pipeline.distributed import first_host

    monkeypatch.setenv("PATH", "/nonexistent")
    cases = {
        "node[1-2],gpu7": "node1",
        "node[01-04]-ib": "node01-ib",
        "rack[1-2]-n[03,07]-ib,gpu7": "rack1-n03-ib",
        "gpu7": "gpu7",
        "node1,node2": "node1",
        "n[5]": "n5",
    }
    assert {k: first_host(k) for k in cases} == cases


def test_prep_job_passes_the_dedup_variables_to_prepare(tmp_path):
    """DEDUP, DEDUP_MIN_REPEATS, EXCLUDE_OVERLAP and OVERLAP_NGRAM reach `albert-data prepare` (srun replaced by a
    script that writes its command line); a missing evaluation file stops the job with its name."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_SRUN_LOG"\n')
    srun.chmod(0o755)
    raw, first, second = tmp_path / "raw.txt", tmp_path / "eval1.txt", tmp_path / "eval2.txt"
    for path in (raw, first, second):
        path.write_text("A sentence.\nAnother one.\n")
    job = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "nodeA",
        "REPO": str(REPO),
        "VENV": "",
        "PYTHON": sys.executable,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
        "PREP_COMMAND": "prepare",
        "INPUT": str(raw),
        "OUTPUT": str(tmp_path / "data"),
        "VERIFY": "0",
        "DEDUP": "paragraphs",
        "DEDUP_MIN_REPEATS": "5",
        "EXCLUDE_OVERLAP": f"{first} {second}",
        "OVERLAP_NGRAM": "8",
    }
    proc = run_bash(f"bash {PREP}", job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = (tmp_path / "srun.log").read_text().splitlines()
    command = args[args.index("data_prep") + 1 :]
    for flag, value in (("--dedup", "paragraphs"), ("--dedup-min-repeats", "5"), ("--overlap-ngram", "8")):
        assert command[command.index(flag) + 1] == value, command
    assert command[command.index("--exclude-overlap") + 1 : command.index("--overlap-ngram")] == [
        str(first),
        str(second),
    ]
    assert cli_accepts(command)
    missing = run_bash(f"bash {PREP}", {**job, "EXCLUDE_OVERLAP": str(tmp_path / "nothing.txt")})
    assert missing.returncode == 2 and f"EXCLUDE_OVERLAP: {tmp_path / 'nothing.txt'} does not exist" in missing.stdout


def cli_accepts(command: list[str]) -> bool:
    """albert-data's parser takes the command line the job built."""
    from data_prep.cli import build_parser

    args = build_parser().parse_args(command)
    return args.dedup == "paragraphs" and args.exclude_overlap and args.overlap_ngram == 8
