"""Training-step throughput of our ALBERT vs transformers' AlbertForPreTraining, side by side.

Both models get the same batch, the same weights and the same threads; their steps alternate so
that noise from other work on the machine hits both alike, and each model's fastest step is
reported. A step is forward + backward (no optimizer). HF computes MLM logits for the whole
sequence (labels -100 where nothing is masked); ours only at the masked positions. The machine's matmul peak is measured in the same run, and
model FLOPs utilisation (MFU) counts the matmul FLOPs each model executes (model_flops: ours computes
the last layer for the [CLS] and predicted rows only, HF the whole layer), x3 for forward + backward.

Example:
    python bench/bench_model.py --quick
    python bench/bench_model.py --configs albert-base --precisions bf16 --steps 10
"""

import argparse
import contextlib
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipeline.hf import to_hf_state_dict  # noqa: E402
from pipeline.malloc import tune_malloc  # noqa: E402
from pipeline.model import AlbertConfig, AlbertForPreTraining  # noqa: E402

log = logging.getLogger("bench_model")


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 5, device: torch.device | str = "cpu") -> float:
    """Best FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peaks(precisions: list[str], device: torch.device | str = "cpu", before: dict[str, float] | None = None) -> dict[str, float]:
    """{precision: FLOP/s} of a large matmul; with `before` (measured before the models), the better of the two:
    other work on a shared machine lowers the peak for a while."""
    return {k: max(matmul_peak(PRECISIONS[k], device=device), (before or {}).get(k, 0.0)) for k in precisions}


def model_flops(cfg: AlbertConfig, batch: int, seq: int, predictions: int, gathered_last_layer: bool = True) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward). gathered_last_layer: as our model
    runs it, the last layer's queries, attention output and FFN for the [CLS] and prediction rows only (keys
    and values for all tokens); False: the full last layer, as transformers' model computes it."""
    H, E, I, V = cfg.hidden_size, cfg.embedding_size, cfg.intermediate_size, cfg.vocab_size
    layers = cfg.num_hidden_layers * cfg.inner_group_num
    qo, kv, ffn, attention = 2 * 2 * H * H, 2 * 2 * H * H, 2 * 2 * H * I, 2 * 2 * seq * H  # per row
    layer = seq * (qo + kv + ffn + attention)
    last = seq * kv + (1 + predictions) * (qo + ffn + attention) if gathered_last_layer else layer
    per_sequence = seq * 2 * E * H + (layers - 1) * layer + last + predictions * (2 * H * E + 2 * E * V)
    return 3 * batch * per_sequence


def make_batch(cfg: AlbertConfig, batch: int, seq: int, predictions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pretraining-like batch: ~10% short sequences, 15% of tokens masked (at most `predictions`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)
    lengths = torch.where(torch.rand(batch, generator=g) < 0.1, torch.randint(seq // 4, seq, (batch,), generator=g), seq)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    positions = torch.zeros(batch, predictions, dtype=torch.long)
    for b in range(batch):
        n = min(predictions, max(1, round(0.15 * int(lengths[b]))))
        positions[b, :n] = (torch.randperm(int(lengths[b]) - 2, generator=g)[:n] + 1).sort().values
    return {
        "input_ids": ids * mask, "input_mask": mask, "segment_ids": (torch.arange(seq)[None, :] >= lengths[:, None] // 2).long() * mask,
        "masked_lm_positions": positions, "masked_lm_ids": torch.randint(5, cfg.vocab_size, (batch, predictions), generator=g) * (positions > 0),
        "next_sentence_labels": torch.randint(0, 2, (batch,), generator=g),
    }


def hf_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    labels = torch.full_like(batch["input_ids"], -100)
    valid = batch["masked_lm_positions"] > 0
    for b in range(labels.shape[0]):
        labels[b, batch["masked_lm_positions"][b][valid[b]]] = batch["masked_lm_ids"][b][valid[b]]
    return {"input_ids": batch["input_ids"], "attention_mask": batch["input_mask"], "token_type_ids": batch["segment_ids"],
            "labels": labels, "sentence_order_label": batch["next_sentence_labels"]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], device: torch.device,
               dtype: torch.dtype = torch.float32, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One training step of our model (the benchmarks' unit): autocast forward unless fp32, backward (through
    `scaler`'s loss scale if given), optimizer step; returns the loss."""
    with autocast(device, dtype):
        loss = model(**batch).loss
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def step_time(model: torch.nn.Module, inputs: dict, bf16: bool) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**inputs).loss
    loss.backward()
    return time.perf_counter() - t


def compare(name: str, bf16: bool, args: argparse.Namespace) -> dict:
    import transformers

    cfg = AlbertConfig.from_name_or_path(name)
    torch.manual_seed(0)
    ours = AlbertForPreTraining(cfg).train()
    hf_cfg = transformers.AlbertConfig(**cfg.to_hf_dict(), classifier_dropout_prob=0.0, attn_implementation="sdpa")
    hf = transformers.AlbertForPreTraining(hf_cfg).train()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)  # same weights (decoder is tied)
    batch = make_batch(cfg, args.batch, args.seq, args.predictions)
    runs = {"ours": (ours, batch), "hf": (hf, hf_inputs(batch))}
    times = {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        for k, (model, inputs) in (runs.items() if i % 2 == 0 else reversed(runs.items())):
            dt = step_time(model, inputs, bf16)
            if i >= args.warmup:
                times[k].append(dt)
    flops = {"ours": model_flops(cfg, args.batch, args.seq, args.predictions),  # what each really computes
             "hf": model_flops(cfg, args.batch, args.seq, args.predictions, gathered_last_layer=False)}
    row = {"config": name, "precision": "bf16 autocast" if bf16 else "fp32", "dtype": "bf16" if bf16 else "fp32"}
    for k, ts in times.items():
        t = min(ts)  # noise from other work only ever adds time: the fastest step is the cleanest
        row[f"{k}_tok_s"] = args.batch * args.seq / t
        row[f"{k}_flop_s"] = flops[k] / t
    row["speedup"] = row["ours_tok_s"] / row["hf_tok_s"]
    log.info("%s %s: ours %.0f tok/s, HF %.0f tok/s (%.2fx)", name, row["precision"], row["ours_tok_s"], row["hf_tok_s"], row["speedup"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="albert-base,albert-tiny", help="comma-separated shipped config names")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--predictions", type=int, default=20, help="max_predictions_per_seq")
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (the fastest is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="short run: 3 timed steps, 1 warmup, batch 8")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("%s", tune_malloc())  # as albert-pretrain does on CPU
    if args.quick:
        args.steps, args.warmup, args.batch = 3, 1, 8
    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    if set(precisions) - {"fp32", "bf16"}:
        p.error(f"--precisions: choose from fp32, bf16, got {args.precisions}")

    # The peak is measured before and after the models (best of both), as other work on a shared
    # machine lowers it for a while; MFU uses the final value.
    peaks = matmul_peaks(["fp32", "bf16"])
    log.info("matmul peak: fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s (%d threads)", peaks["fp32"] / 1e9, peaks["bf16"] / 1e9, args.threads)
    rows = [compare(c, prec == "bf16", args) for c in args.configs.split(",") for prec in precisions]
    peaks = matmul_peaks(["fp32", "bf16"], before=peaks)
    for r in rows:
        for k in ("ours", "hf"):
            r[f"{k}_mfu"] = r[f"{k}_flop_s"] / peaks[r["dtype"]]

    print(f"\nbatch {args.batch} x seq {args.seq}, {args.predictions} predictions, {args.threads} threads; "
          f"matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s\n")
    print("| config | precision | ours tok/s | HF tok/s | ours / HF | ours MFU | HF MFU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['precision']} | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | "
              f"{r['speedup']:.2f}x | {r['ours_mfu']:.1%} | {r['hf_mfu']:.1%} |")


if __name__ == "__main__":
    main()
