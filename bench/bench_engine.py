"""Training throughput of `albert-pretrain` itself: 2 ranks under DeepSpeed (torchrun, gloo, ZeRO-2, our
LAMB, real shards), plain vs fused paths, and the share of step time spent waiting for data.

For each model config and precision, two runs of `albert-pretrain` on the same shards: plain
(`--attention math --compile off`) and fused (`--attention auto --compile on`); with --malloc-defaults also the
plain path with glibc's malloc defaults (`--no-malloc-tuning`, see pipeline/malloc.py). Each logs every step to
metrics.jsonl; the first `--skip` steps (start-up, compiling) are left out, and the table gives the median
step time, tokens per second, MFU (the model FLOPs per step albert-pretrain reports in metrics.jsonl over the step
time, against an n x n matmul's FLOP/s measured with all cores in this run) and the data wait: the slowest rank's time
blocked on the loader, as a share of the step time. The model's vocabulary is set to the shards'.

Shards: `--data DIR` (from `albert-data shard`), or the demo's data made once under --work.

Example:
    python bench/bench_engine.py --configs albert-tiny --precisions bf16 --steps 12
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from harness import markdown_table, matmul_peaks

from data_prep.demo_data import prepare_demo_data
from pipeline.distributed import torchrun_pretrain
from pipeline.model import AlbertConfig

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_engine")
PATHS = {"plain": ["--attention", "math", "--compile", "off"], "fused": ["--attention", "auto", "--compile", "on"]}
GLIBC = [*PATHS["plain"], "--no-malloc-tuning"]  # --malloc-defaults: plain with glibc's malloc


def ds_config(precision: str, micro: int, out: Path) -> Path:
    cfg = json.loads((REPO / "ds_configs" / "cpu-zero2-bf16-lamb.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["bf16"]["enabled"] = precision == "bf16"
    cfg["scheduler"]["params"]["warmup_num_steps"] = 1  # must stay below the (few) steps of a benchmark
    out.write_text(json.dumps(cfg))
    return out


def run(name: str, precision: str, path: str, data: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    manifest = json.loads((data / "manifest.json").read_text())
    cfg = AlbertConfig.from_name_or_path(name)
    cfg.vocab_size = manifest["vocab"]["vocab_size"]
    model_cfg = work / f"{name}.json"
    cfg.to_json(model_cfg)
    out = work / f"{name}-{precision}-{path}"
    cmd = torchrun_pretrain(
        args.ranks,
        [
            "--deepspeed_config",
            str(ds_config(precision, args.micro, work / f"ds-{precision}.json")),
            "--model-config",
            str(model_cfg),
            "--data",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            str(args.steps),
            "--log-interval",
            "1",
            "--save-interval",
            str(10**9),
            "--eval-interval",
            "0",
            *({**PATHS, "glibc": GLIBC}[path]),
        ],
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // args.ranks)), "DS_ACCELERATOR": "cpu"}
    log.info("%s %s %s: %s", name, precision, path, " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"albert-pretrain failed ({name} {precision} {path}):\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("split", "train") == "train"]


def summarise(records: list[dict], global_batch: int, skip: int) -> dict:
    rows = records[skip:]
    if not rows:
        raise SystemExit(f"no steps left after skipping {skip}: raise --steps")
    step_s = [global_batch / r["samples_per_sec"] for r in rows]  # one step per record (--log-interval 1)
    step = statistics.median(step_s)
    return {
        "step_ms": 1000 * step,
        "tokens_s": statistics.median(r["tokens_per_sec"] for r in rows),
        "flop_s": rows[-1]["model_flops_per_step"] / step,  # the run's own count (pipeline.flops.step_flops)
        "wait": sum(r["data_wait_sec"] for r in rows) / sum(step_s),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="albert-tiny,albert-base", help="comma-separated shipped config names")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--data", type=Path, default=None, help="shard folder; default: the demo's data, made under --work")
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-engine", help="data and runs go here")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--micro", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=3, help="first steps left out (start-up, compiling)")
    p.add_argument("--malloc-defaults", action="store_true", help="also the plain path with glibc's malloc defaults")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.skip >= args.steps:
        p.error("--skip must be below --steps")
    precisions = args.precisions.split(",")
    if set(precisions) - {"fp32", "bf16"}:
        p.error(f"--precisions: choose from fp32, bf16, got {args.precisions}")
    data = args.data or prepare_demo_data(args.work / "data").train
    attrs = json.loads((data / "manifest.json").read_text())["attributes"]
    seq = attrs["max_seq_length"]
    global_batch = args.micro * args.ranks

    peak = matmul_peaks(["fp32", "bf16"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-", dir=args.work if args.work.exists() else None) as tmp:
        for name in args.configs.split(","):
            for precision in precisions:
                r = {
                    k: summarise(run(name, precision, k, data, args, Path(tmp)), global_batch, args.skip)
                    for k in [*PATHS, *(["glibc"] if args.malloc_defaults else [])]
                }
                rows.append((name, precision, r))
    peak = matmul_peaks(["fp32", "bf16"], before=peak)

    print(
        f"\n{args.ranks} ranks (torchrun, gloo, ZeRO-2, our LAMB), micro-batch {args.micro} per rank x seq {seq}, "
        f"{torch.get_num_threads()} cores; median of steps {args.skip + 1}-{args.steps}; matmul peak fp32 "
        f"{peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s\n"
    )
    glibc = args.malloc_defaults
    headers = [
        "config",
        "precision",
        "plain ms",
        "fused ms",
        "speed-up",
        "fused tok/s",
        "plain MFU",
        "fused MFU",
        "data wait plain",
        "data wait fused",
        *(["plain, glibc malloc ms", "our malloc vs glibc's"] if glibc else []),
    ]
    cells = []
    for name, precision, r in rows:
        pl, fu, pk = r["plain"], r["fused"], peak[precision]
        cells.append(
            [
                name,
                precision,
                f"{pl['step_ms']:.0f}",
                f"{fu['step_ms']:.0f}",
                f"{pl['step_ms'] / fu['step_ms']:.2f}x",
                f"{fu['tokens_s']:.0f}",
                f"{pl['flop_s'] / pk:.1%}",
                f"{fu['flop_s'] / pk:.1%}",
                f"{pl['wait']:.2%}",
                f"{fu['wait']:.2%}",
                *([f"{r['glibc']['step_ms']:.0f}", f"{r['glibc']['step_ms'] / pl['step_ms']:.2f}x"] if glibc else []),
            ]
        )
    print(markdown_table(headers, cells, numeric=set(range(2, len(headers)))))


if __name__ == "__main__":
    main()
