"""Training-step throughput of the plain vs the fused paths (pipeline/fused.py), one process.

For each config and precision: the plain model (explicit attention, eager) and the fused one
(SDPA or "auto" attention, torch.compile'd shared layer and MLM head), same weights, same batch.
Their steps alternate so that noise from other work hits both alike; each path's fastest step is
reported. A step is forward + backward + our LAMB's step. Compile time (the first step) is reported
apart. MFU is against the matmul peak measured in the same run (bench/harness.py).

Example:
    python bench/bench_fused.py --configs albert-tiny --precisions fp32 --steps 3
"""

import argparse
import copy
import logging
from functools import partial

import torch
import torch._dynamo
from harness import make_batch, markdown_table, matmul_peaks, time_steps, timed, train_step

from pipeline.flops import step_flops
from pipeline.fused import PLAIN, FusedOptions, apply_fused
from pipeline.lamb import Lamb, lamb_param_groups
from pipeline.malloc import tune_malloc
from pipeline.model import AlbertConfig, AlbertForPreTraining

log = logging.getLogger("bench_fused")


def compare(name: str, bf16: bool, args: argparse.Namespace, device: torch.device, seq: int, batch_size: int) -> dict:
    cfg = AlbertConfig.from_name_or_path(name)
    # Dynamo keeps compiled graphs per code object, across models: without a reset, the shared layer's forward would
    # reach its recompile limit (8) after a few rows and later "fused" rows would silently run eagerly.
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = AlbertForPreTraining(cfg).to(device).train()
    fused = copy.deepcopy(plain)
    apply_fused(plain, PLAIN, device)
    for line in apply_fused(fused, FusedOptions(attention=args.attention, compile="on"), device):
        log.info("%s: %s", name, line)
    batch = make_batch(cfg, batch_size, seq, args.predictions, device=device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    steps = {
        k: partial(train_step, m, Lamb(lamb_param_groups(m, 0.01), lr=1e-4), batch, device, dtype)
        for k, m in (("plain", plain), ("fused", fused))
    }
    first = {k: timed(step, device)[0] for k, step in steps.items()}  # fused: includes compiling
    times = time_steps(steps, args.warmup, args.steps, device)
    flops = step_flops(cfg, batch_size, seq, args.predictions).training
    row = {
        "config": name,
        "dtype": "bf16" if bf16 else "fp32",
        "compile_s": first["fused"] - first["plain"],
        "seq": seq,
        "batch": batch_size,
    }
    for k, ts in times.items():
        row[f"{k}_ms"] = 1000 * ts.fastest
        row[f"{k}_tok_s"] = batch_size * seq / ts.fastest
        row[f"{k}_flop_s"] = flops / ts.fastest
    log.info(
        "%s %s seq %d: plain %.1f ms, fused %.1f ms (first fused step +%.0f s)",
        name,
        row["dtype"],
        seq,
        row["plain_ms"],
        row["fused_ms"],
        row["compile_s"],
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="albert-tiny,albert-base", help="comma-separated shipped config names")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument(
        "--attention", default="auto", choices=["auto", "sdpa", "math"], help="the fused run's attention"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--long-seq",
        type=int,
        default=512,
        help="also albert-base at this length (batch scaled to the same tokens); 0: no",
    )
    parser.add_argument("--predictions", type=int, default=20, help="max_predictions_per_seq")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (the fastest is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        log.info("%s", tune_malloc())  # as albert-pretrain does on CPU
    precisions = args.precisions.split(",")
    if set(precisions) - {"fp32", "bf16"}:
        parser.error(f"--precisions: choose from fp32, bf16, got {args.precisions}")

    peak = matmul_peaks(["fp32", "bf16"], device)
    runs = [(c, prec, args.seq, args.batch) for c in args.configs.split(",") for prec in precisions]
    if args.long_seq and "albert-base" in args.configs.split(","):
        runs += [
            ("albert-base", prec, args.long_seq, max(1, args.batch * args.seq // args.long_seq)) for prec in precisions
        ]
    rows = [compare(c, prec == "bf16", args, device, seq, b) for c, prec, seq, b in runs]
    # Other work on a shared machine lowers the peak for a while: best of before and after.
    peak = matmul_peaks(["fp32", "bf16"], device, before=peak)

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"\n{where}; {args.predictions} predictions per sequence; step = fwd + bwd + LAMB; "
        f"matmul peak fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s\n"
    )
    cells = [
        [
            r["config"],
            r["dtype"],
            f"{r['batch']} x {r['seq']}",
            f"{r['plain_ms']:.1f}",
            f"{r['fused_ms']:.1f}",
            f"{r['plain_tok_s']:.0f}",
            f"{r['fused_tok_s']:.0f}",
            f"{r['plain_ms'] / r['fused_ms']:.2f}x",
            f"{r['plain_flop_s'] / peak[r['dtype']]:.1%}",
            f"{r['fused_flop_s'] / peak[r['dtype']]:.1%}",
            f"{r['compile_s']:.0f}",
        ]
        for r in rows
    ]
    print(
        markdown_table(
            [
                "config",
                "precision",
                "batch x seq",
                "plain ms",
                "fused ms",
                "plain tok/s",
                "fused tok/s",
                "speed-up",
                "plain MFU",
                "fused MFU",
                "compile s",
            ],
            cells,
            numeric=set(range(3, 11)),
        )
    )


if __name__ == "__main__":
    main()
