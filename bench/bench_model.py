"""Training-step throughput of our ALBERT vs transformers' AlbertForPreTraining, side by side.

Both models get the same batch, the same weights and the same threads; their steps alternate so
that noise from other work on the machine hits both alike, and each model's fastest step is
reported. A step is forward + backward (no optimizer). HF computes MLM logits for the whole
sequence (labels -100 where nothing is masked); ours only at the prediction slots. The machine's matmul peak is
measured in the same run, and model FLOPs utilisation (MFU) counts the matmul FLOPs each model executes
(pipeline.flops.step_flops, the count albert-pretrain reports: ours computes the last layer and the MLM head for
the [CLS] and prediction rows only, HF the whole last layer and the MLM head at every token), x3 for forward +
backward.

Example:
    python bench/bench_model.py --quick
    python bench/bench_model.py --configs albert-base --precisions bf16 --steps 10
"""

import argparse
import logging
import os
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from harness import CPU, make_batch, markdown_table, matmul_peaks, time_steps, train_step  # noqa: E402

from pipeline.flops import step_flops  # noqa: E402
from pipeline.hf import to_hf_state_dict  # noqa: E402
from pipeline.malloc import tune_malloc  # noqa: E402
from pipeline.model import AlbertConfig, AlbertForPreTraining  # noqa: E402

log = logging.getLogger("bench_model")


def hf_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    labels = torch.full_like(batch["input_ids"], -100)
    valid = batch["masked_lm_positions"] > 0
    for b in range(labels.shape[0]):
        labels[b, batch["masked_lm_positions"][b][valid[b]]] = batch["masked_lm_ids"][b][valid[b]]
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["input_mask"],
        "token_type_ids": batch["segment_ids"],
        "labels": labels,
        "sentence_order_label": batch["next_sentence_labels"],
    }


def compare(name: str, bf16: bool, args: argparse.Namespace) -> dict:
    import transformers

    cfg = AlbertConfig.from_name_or_path(name)
    torch.manual_seed(0)
    ours = AlbertForPreTraining(cfg).train()
    hf_cfg = transformers.AlbertConfig(**cfg.to_hf_dict(), classifier_dropout_prob=0.0, attn_implementation="sdpa")
    hf = transformers.AlbertForPreTraining(hf_cfg).train()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)  # same weights (decoder is tied)
    batch = make_batch(cfg, args.batch, args.seq, args.predictions)
    dtype = torch.bfloat16 if bf16 else torch.float32
    steps = {
        "ours": partial(train_step, ours, None, batch, CPU, dtype),
        "hf": partial(train_step, hf, None, hf_inputs(batch), CPU, dtype),
    }
    times = time_steps(steps, args.warmup, args.steps)
    flops = {
        "ours": step_flops(cfg, args.batch, args.seq, args.predictions).training,  # what each really computes
        "hf": step_flops(cfg, args.batch, args.seq, args.predictions, gathered=False).training,
    }
    row = {"config": name, "precision": "bf16 autocast" if bf16 else "fp32", "dtype": "bf16" if bf16 else "fp32"}
    for k, ts in times.items():
        row[f"{k}_tok_s"] = args.batch * args.seq / ts.fastest
        row[f"{k}_flop_s"] = flops[k] / ts.fastest
    row["speedup"] = row["ours_tok_s"] / row["hf_tok_s"]
    log.info(
        "%s %s: ours %.0f tok/s, HF %.0f tok/s (%.2fx)",
        name,
        row["precision"],
        row["ours_tok_s"],
        row["hf_tok_s"],
        row["speedup"],
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="albert-base,albert-tiny", help="comma-separated shipped config names")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--predictions", type=int, default=20, help="max_predictions_per_seq")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (the fastest is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="short run: 3 timed steps, 1 warmup, batch 8")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("%s", tune_malloc())  # as albert-pretrain does on CPU
    if args.quick:
        args.steps, args.warmup, args.batch = 3, 1, 8
    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    if set(precisions) - {"fp32", "bf16"}:
        parser.error(f"--precisions: choose from fp32, bf16, got {args.precisions}")

    # The peak is measured before and after the models (best of both), as other work on a shared
    # machine lowers it for a while; MFU uses the final value.
    peaks = matmul_peaks(["fp32", "bf16"])
    log.info(
        "matmul peak: fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s (%d threads)",
        peaks["fp32"] / 1e9,
        peaks["bf16"] / 1e9,
        args.threads,
    )
    rows = [compare(c, prec == "bf16", args) for c in args.configs.split(",") for prec in precisions]
    peaks = matmul_peaks(["fp32", "bf16"], before=peaks)
    for r in rows:
        for k in ("ours", "hf"):
            r[f"{k}_mfu"] = r[f"{k}_flop_s"] / peaks[r["dtype"]]

    print(
        f"\nbatch {args.batch} x seq {args.seq}, {args.predictions} predictions, {args.threads} threads; "
        f"matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s\n"
    )
    print(
        markdown_table(
            ["config", "precision", "ours tok/s", "HF tok/s", "ours / HF", "ours MFU", "HF MFU"],
            [
                [
                    r["config"],
                    r["precision"],
                    f"{r['ours_tok_s']:.0f}",
                    f"{r['hf_tok_s']:.0f}",
                    f"{r['speedup']:.2f}x",
                    f"{r['ours_mfu']:.1%}",
                    f"{r['hf_mfu']:.1%}",
                ]
                for r in rows
            ],
            numeric={2, 3, 4, 5, 6},
        )
    )


if __name__ == "__main__":
    main()
