"""Launching real `albert-pretrain` runs (plain process, torchrun, deepspeed launcher, mpirun) from tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from pipeline.distributed import free_port

TEST_MODEL = {
    "vocab_size": 4000,
    "embedding_size": 32,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_hidden_groups": 1,
    "inner_group_num": 1,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "hidden_act": "gelu_new",
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
}


def ds_config(
    stage: int = 2, precision: str = "fp32", micro: int = 4, accum: int = 1, lr: float = 2e-3, warmup: int = 2, **extra
) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "Lamb", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup, "warmup_type": "linear"},
        },
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000000,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "min_loss_scale": 1}
    cfg.update(extra)
    return cfg


def write_configs(folder: Path, ds: dict, model: dict | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ds.json").write_text(json.dumps(ds))
    (folder / "model.json").write_text(json.dumps(model or TEST_MODEL))
    return folder / "ds.json", folder / "model.json"


def pretrain(
    out: Path,
    data: Path,
    ds: dict,
    steps: int,
    nproc: int = 1,
    launcher: str | None = None,
    extra: list[str] = (),
    env: dict | None = None,
    timeout: float = 300,
    model: dict | None = None,
    wait: bool = True,
    script: Path | None = None,
    start_new_session: bool = False,
):
    """Run albert-pretrain; returns the CompletedProcess (or the Popen when wait=False). `script`: a Python file run
    in each rank instead of `-m pipeline.pretrain` (a wrapper that calls pipeline.pretrain.main)."""
    ds_path, model_path = write_configs(out / "configs", ds, model)
    args = [
        "--deepspeed_config",
        str(ds_path),
        "--model-config",
        str(model_path),
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        str(steps),
        "--log-interval",
        "1",
        "--save-interval",
        "1000",
        "--eval-interval",
        "0",
        *extra,
    ]
    launcher = launcher or ("torchrun" if nproc > 1 else "plain")
    port = str(free_port())
    entry = [str(script)] if script else ["-m", "pipeline.pretrain"]
    if launcher == "plain":
        cmd = [sys.executable, *entry, *args]
    elif launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            port,
            *entry,
            *args,
        ]
    elif launcher == "deepspeed":
        entry = [str(script)] if script else ["--module", "pipeline.pretrain"]
        cmd = [
            shutil.which("deepspeed", path=str(Path(sys.executable).parent)),
            "--num_gpus",
            str(nproc),
            "--master_port",
            port,
            *entry,
            *args,
        ]
    elif launcher == "mpirun":
        cmd = [
            shutil.which("mpirun"),
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(nproc),
            "-x",
            "MASTER_PORT=" + port,
            sys.executable,
            *entry,
            *args,
        ]
    else:
        raise ValueError(launcher)
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": port,
        **(env or {}),
    }
    if launcher in ("plain", "mpirun"):
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            full_env.pop(k, None)
    if not wait:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=start_new_session,  # a process group of its own, to signal as a terminal does
        )
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def metrics(out: Path, split: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [m for m in lines if m.get("split", "train") == split]


def final_params(out: Path) -> dict:
    """The consolidated fp32 weights of the newest complete checkpoint under out/checkpoints, as `albert-export`
    reads them (pipeline.export.consolidate, any ZeRO stage). In a child process: consolidating imports DeepSpeed,
    whose accelerator is chosen once per process, and sets DS_ACCELERATOR=cpu in its environment, which would
    otherwise stay in the test process and reach the runs it launches later."""
    code = (
        "import sys, torch; from pathlib import Path; from pipeline.checkpoint import complete_checkpoints;"
        "from pipeline.export import consolidate;"
        "t = complete_checkpoints(Path(sys.argv[1]))[-1]; torch.save(consolidate(t.parent, t.name), sys.argv[2])"
    )
    dest = out / "final_params.pt"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out / "checkpoints"), str(dest)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    import torch

    return torch.load(dest)
