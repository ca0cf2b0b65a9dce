"""`albert-pretrain`: ALBERT pretraining on HDF5 shards with DeepSpeed (ZeRO 0-3, fp16/bf16/fp32, LAMB).

Runs unchanged as a plain process, under torchrun, the `deepspeed` launcher, `srun` or `mpirun`.
The training step is `train()` below: micro-batches from the prefetching loader, forward, backward,
DeepSpeed's step at the accumulation boundary, then (every few steps) metrics, evaluation and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.launchers import launcher_rank
from common.logs import setup_logging

from .engine import build_engine, loss_scale
from .metrics import BatchRecorder, Interval, IntervalSums, Metrics, MfuBasis, PhaseTimer, peak_memory, train_record
from .run_config import Precision, RunConfig, TrainError, check_data_against_model, parse_args, run_config

if TYPE_CHECKING:
    from .identity import DataIdentity
    from .lamb_deepspeed import OptimizerKind

log = logging.getLogger("albert-pretrain")


# --------------------------------------------------------------------------------------------- the loop


class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm's warnings before a time limit or preemption) and SIGINT (Ctrl-C): finish the step,
    save, exit. A second Ctrl-C aborts at once (KeyboardInterrupt, no checkpoint)."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        again = "; Ctrl-C again aborts without saving" if signum == signal.SIGINT else ""
        log.warning("received %s: stopping after this step%s", signal.Signals(signum).name, again)


# What marks a folder as another command's output (a training's own files would mix with it there).
OTHER_OUTPUTS = {
    "manifest.json": "`albert-data shard` (a shard folder)",
    ".corpus.json": "`albert-data corpus` (a corpus folder)",
    "export.json": "`albert-export` (a Hugging Face folder)",
}


def claim_output(output: Path) -> None:
    """One run per --output, and never another command's output folder: rank 0 holds an flock on OUTPUT/.lock for
    the run's life (released by the kernel when the process dies in any way); a second run, or a folder that holds
    shards, a corpus or an export, is refused on every rank in one line. (A user's own files, a config.json say, may
    stay.) Collective."""
    import torch.distributed as dist

    from common.output_lock import LockUnsupported, OutputInUse, hold_output

    error: list[str | None] = [None]
    if dist.get_rank() == 0:
        other = next((name for name in OTHER_OUTPUTS if (output / name).is_file()), None)
        if other:
            error[0] = (
                f"--output {output}: holds the output of {OTHER_OUTPUTS[other]} ({other}); a training writes "
                "checkpoints/, tensorboard/ and metrics.jsonl into its --output: choose a folder of its own"
            )
        else:
            try:
                hold_output(output)
            except (OutputInUse, LockUnsupported) as e:
                error[0] = f"{e}; two runs would write one folder: wait for it to end, or choose another --output"
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise TrainError(error[0])


def evaluate(run: Run, folder: Path, max_batches: int) -> dict[str, float]:
    import torch

    from .data import PretrainingData, to_device

    engine, batch = run.engine, run.config.engine.batch
    pin = run.device.type == "cuda"
    data = PretrainingData(folder, batch.micro, 1, run.rank, batch.world, run.config.seed, pin_memory=pin)
    acc = IntervalSums(run.comm)
    engine.eval()
    try:
        with torch.no_grad():
            for i, b in enumerate(data):
                if i >= min(max_batches, data.micro_batches_per_epoch):
                    break
                acc.add(engine(**to_device(b, run.device)), b)
    finally:
        data.close()
        engine.train()
    r = acc.reduce()
    return {k: r[k] for k in ("loss", "mlm_loss", "sop_loss", "mlm_accuracy", "sop_accuracy", "samples")}


@dataclass(kw_only=True)
class Run:
    """Everything the training loop needs, built by setup()."""

    config: RunConfig
    engine: Any
    data: Any  # PretrainingData
    data_identity: DataIdentity  # what the training shards are, recorded in every checkpoint
    model_config: Any  # AlbertConfig
    optimizer: OptimizerKind  # the optimizer every rank steps with
    rank: int
    resumed: bool
    device: Any  # torch.device of the engine
    comm: Any  # pipeline.comm.Comm on that device
    mfu_basis: MfuBasis  # the step's model FLOPs and the device's peak, for metrics.jsonl's MFU


def setup(args: argparse.Namespace) -> Run:
    """Launch, checks (before any work), model, DeepSpeed engine with our LAMB, and the resume."""
    import torch
    import torch.distributed as dist

    from . import checkpoint as ckpt
    from . import reshard
    from .comm import Comm
    from .data import DataError, PretrainingData
    from .distributed import check_rendezvous, detect_launch, init_distributed
    from .flops import resolve_peak, step_flops
    from .fused import FusedOptions, resolve_fused
    from .identity import DataIdentity, IdentityError, check_resume, check_same_vocabulary
    from .malloc import tune_malloc
    from .metrics import write_run_info
    from .model import AlbertConfig
    from .precision import set_tf32

    launch = detect_launch()
    check_rendezvous(min(args.dist_timeout, 120.0))
    rank, world, _ = init_distributed(launch, args.dist_timeout)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    rendezvous = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    log.info(
        "launcher: %s, %d rank(s), backend %s, rendezvous %s", launch.launcher, world, dist.get_backend(), rendezvous
    )

    claim_output(args.output)
    config = run_config(args, world)
    batch, stage, precision = config.engine.batch, config.engine.zero_stage, config.engine.precision
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        cfg = AlbertConfig.from_name_or_path(config.model_config_name)
        loader: dict[str, Any] = dict(rank=rank, world=world, seed=config.seed, pin_memory=device.type == "cuda")
        data = PretrainingData(
            config.data,
            batch.micro,
            batch.accum,
            skip_bad_shards=config.skip_bad_shards,
            masking=config.masking,
            **loader,
        )
        check_data_against_model(data, cfg, config.data)
        data_identity = DataIdentity.of_manifest(config.data, data.manifest.data)
        if config.eval_data:
            eval_data = PretrainingData(config.eval_data, batch.micro, 1, **loader)
            check_data_against_model(eval_data, cfg, config.eval_data)
            check_same_vocabulary(data_identity, DataIdentity.of_manifest(config.eval_data, eval_data.manifest.data))
    except (ValueError, DataError) as e:
        raise TrainError(str(e)) from None
    if data.skipped_shards:
        log.warning("%d shard(s) skipped as unreadable: %s", len(data.skipped_shards), ", ".join(data.skipped_shards))
    if data.masker is not None:
        mask = data.masker.settings
        log.info(
            "%s: unmasked shards, masked in the loader each epoch: masked_lm_prob %g, ngram %d, max_predictions %d",
            config.data,
            mask.masked_lm_prob,
            mask.ngram,
            mask.max_predictions,
        )
    resume_from = ckpt.resolve_resume(config.resume, config.checkpoints)
    saved = ckpt.check_compatible(resume_from, batch.global_size, cfg.to_dict()) if resume_from else None
    new_data = None
    if resume_from and saved:
        try:  # (a checkpoint of format 1-2 recorded no identity: nothing to compare)
            new_data = check_resume(resume_from, saved.get("data_identity"), data_identity, config.new_data)
        except IdentityError as e:
            raise TrainError(str(e)) from None

    if device.type == "cpu" and config.malloc_tuning:
        log.info("%s", tune_malloc())  # before the model's and the engine's allocations
    log.info("%s", set_tf32(device, enabled=config.tf32))
    torch.manual_seed(config.seed)
    fused = FusedOptions(attention=config.attention, compile=config.compile, fused_lamb=config.fused_lamb)
    init_from = None if resume_from else config.init_from
    engine, optimizer = build_engine(cfg, config.engine, fused, device, config.activation_checkpointing, init_from)
    millions = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()) / 1e6
    log.info(
        f"model: {millions:.2f}M parameters; data: {data.num_examples} examples, {data.steps_per_epoch} steps per epoch "
        f"({data.dropped_per_epoch} left out per epoch); batch {batch.global_size} = {batch.micro} x {batch.accum} x "
        f"{world} rank(s); {precision}, ZeRO-{stage}"
    )
    comm = Comm(engine.device)
    # Every rank resolves its peak at the same moment (a measured one then measures each rank's share of a shared
    # machine); the run's peak is their mean.
    dist.barrier()
    peak = resolve_peak(engine.device, precision.dtype, config.peak_tflops)
    peak_tflops = comm.sum_(comm.tensor([peak.tflops])).item() / world
    flops = step_flops(cfg, batch.global_size, data.seq_len, data.max_predictions)
    mfu_basis = MfuBasis(flops.training, world, peak_tflops)
    log.info(
        "MFU against %.4g TFLOP/s per rank (%s matmuls, %s: %s); %.4g TFLOP of model FLOPs per step",
        peak_tflops,
        peak.matmul,
        peak.source,
        peak.device,
        flops.training / 1e12,
    )
    if rank == 0:
        paths = resolve_fused(cfg, fused, engine.device, stage, precision.dtype, data.seq_len)
        info = run_info(config, engine, optimizer, paths, peak, peak_tflops, flops, resume_from)
        log.info("run info: %s", write_run_info(config.output, info))
    if resume_from and saved:
        if ckpt.same_layout(saved, config.engine, type(engine.optimizer).__name__):
            client = ckpt.load(engine, resume_from)
        else:  # another number of ranks, ZeRO stage or precision: converted per parameter
            was = ckpt.describe_layout(saved["world_size"], saved["zero_stage"], saved["precision"])[0]
            now = ckpt.describe_layout(world, stage, precision)[1]
            fp16_both = saved["precision"] == precision == Precision.FP16
            client = reshard.resume(engine, resume_from, was, now, fp16_both, ckpt.format_version(saved))
        if new_data:
            log.warning("%s", new_data)
        else:
            try:
                data.load_state_dict(client["loader"], plan=ckpt.loader_plan(resume_from, saved))
            except DataError as e:
                raise TrainError(f"{resume_from}: the saved data position cannot continue here: {e}") from None
    return Run(
        config=config,
        engine=engine,
        data=data,
        data_identity=data_identity,
        model_config=cfg,
        optimizer=optimizer.kind,
        rank=rank,
        resumed=resume_from is not None,
        device=engine.device,
        comm=comm,
        mfu_basis=mfu_basis,
    )


def run_info(config: RunConfig, engine, optimizer, paths, peak, peak_tflops: float, flops, resume_from) -> dict:
    """run-info.json: what this run resolved to (layout, optimizer, kernels, device, peak, versions), as data.
    `optimizer`: lamb_deepspeed.OptimizerChoice; `paths`: fused.FusedPaths; `peak`: flops.Peak (this rank's);
    `flops`: flops.StepFlops of the global batch."""
    import dataclasses
    import platform

    import torch

    from .flops import dtype_name
    from .metrics import library_versions

    batch = config.engine.batch
    model_dtype, grad_accum_dtype = engine.get_data_types()  # as DeepSpeed resolved them
    return {
        "layout": {
            "world_size": batch.world,
            "zero_stage": config.engine.zero_stage,
            "precision": config.engine.precision,
            "model_dtype": dtype_name(model_dtype),
            "grad_accum_dtype": dtype_name(grad_accum_dtype),
            "micro_batch": batch.micro,
            "gradient_accumulation": batch.accum,
            "global_batch": batch.global_size,
        },
        "optimizer": {
            "kind": optimizer.kind,
            "description": optimizer.description,  # why this one: FusedLamb's conditions (lamb_deepspeed)
            "deepspeed_wrapper": type(engine.optimizer).__name__,
        },
        "attention": {"implementation": paths.attention, "sdpa_kernels": paths.sdpa_kernels},
        "compile": {"enabled": paths.compiled, "off_reason": paths.compile_off_reason},
        "activation_checkpointing": config.activation_checkpointing,
        "device": {"type": engine.device.type, "name": peak.device, "threads": torch.get_num_threads()},
        "peak": {
            "tflops_per_rank": peak_tflops,
            "source": peak.source,
            "matmul": peak.matmul,
            "rank0_tflops": peak.tflops,
        },
        "model_flops": {
            "per_step": flops.training,
            "forward_by_part": dataclasses.asdict(flops),
        },
        "model_config": config.model_config_name,
        "resumed_from": str(resume_from) if resume_from else None,
        "versions": {"python": platform.python_version(), **library_versions()},
    }


def train(run: Run, stop: StopRequest) -> dict[str, Any]:
    """The loop: one optimizer step per iteration, then metrics, checkpoints and evaluation when due.

    Host syncs: none per micro-batch. The loss, the metric sums and the non-finite flag stay on the device; the
    step's flags (non-finite loss on any rank, a stop signal on any rank) are read once per optimizer step, and the
    metric sums on logging steps only. The phase times follow the same rule (PhaseTimer: CUDA events recorded every
    step, read on logging steps); peak memory is read from the allocator's counters, not the device."""
    import torch

    from . import checkpoint as ckpt
    from . import reshard
    from .data import to_device

    config, engine, data, comm = run.config, run.engine, run.data, run.comm
    batch, precision = config.engine.batch, config.engine.precision
    step = start = engine.global_steps
    metrics = Metrics(config.output, run.rank == 0, resume_step=step if run.resumed else None)
    recording = config.output / f"batches-rank{run.rank}.jsonl"
    recorder = BatchRecorder(recording, step) if config.record_batches else None
    acc = IntervalSums(comm)
    summary: dict[str, Any] = {"start_step": step, "first": None, "last": None}
    if step >= config.max_steps:
        log.info("already at step %d of --max-steps %d: nothing to train", step, config.max_steps)

    names = reshard.lamb_names(engine.module)  # ZeRO-0's optimizer state is saved by position: name it
    meta = ckpt.run_meta(
        config, type(engine.optimizer).__name__, run.model_config.to_dict(), run.data_identity.to_dict()
    )

    def save() -> None:
        state = {"loader": data.state_dict(), "lamb_param_names": names}
        hf_config = run.model_config.to_hf_dict()
        ckpt.save(engine, config.checkpoints, step, state, meta, hf_config, config.keep_checkpoints)

    def run_eval() -> None:
        if config.eval_data:
            r = evaluate(run, config.eval_data, config.eval_batches)
            metrics.log({"split": "eval", "step": step, **r})
            accuracies = f"MLM accuracy {r['mlm_accuracy']:.4f}, SOP accuracy {r['sop_accuracy']:.4f}"
            log.info("eval step %d: loss %.4f, %s", step, r["loss"], accuracies)

    ckpt_note = f"the last good checkpoint is in {config.checkpoints}"
    batches = iter(data)
    timer = PhaseTimer(run.device)
    paused = 0.0  # seconds of the interval spent saving and evaluating: left out of its throughput
    warned_peak = False  # an MFU above 1 was reported

    def outside_interval(action) -> None:
        nonlocal paused
        began = time.perf_counter()
        action()
        paused += time.perf_counter() - began

    logged_step, t_last, data.data_wait = step, time.perf_counter(), 0.0
    while step < config.max_steps:
        # The step's micro-batches are fetched first so that the MLM loss can be normalised by the number of
        # predictions in the whole global batch: then accumulation and data parallelism give exactly the
        # gradient of one large batch (a per-micro-batch mean would weight predictions unevenly).
        micro_batches = [next(batches) for _ in range(batch.accum)]
        counts = [float((b["masked_lm_positions"] > 0).sum()) for b in micro_batches]  # CPU tensors: no sync
        total = comm.sum_(comm.tensor([sum(counts)])).clamp(min=1.0)
        if recorder:
            recorder.write(step + 1, micro_batches)
        bad = torch.zeros((), dtype=torch.bool, device=run.device)
        with timer.phase("forward_backward"):
            for micro, (b, count) in enumerate(zip(micro_batches, counts)):
                out = engine(**to_device(b, run.device))
                weight = (count * batch.global_size / batch.micro / total).to(out.mlm_loss.dtype)
                loss = out.mlm_loss * weight[0] + out.sop_loss
                bad |= ~torch.isfinite(loss.detach())
                acc.add(out, b)
                engine.backward(loss)
                if micro < batch.accum - 1:
                    engine.step()  # DeepSpeed counts micro-steps; it applies the update at the boundary only
        flags = comm.max_(torch.stack([bad.double(), comm.tensor([float(stop.signal is not None)])[0]]))
        # every rank stops at the same step, whichever rank saw the problem or signal: the step's one host read
        nonfinite, stopping = (v > 0 for v in flags.tolist())
        if nonfinite and precision is not Precision.FP16:
            raise TrainError(
                f"step {step + 1}: the loss is not finite (NaN or inf); stopping without applying this step. "
                f"The last good checkpoint is in {config.checkpoints}"
            )
        try:
            with timer.phase("optimizer"):
                engine.step()
        except Exception as e:  # DeepSpeed's fp16 loss scaler raises a bare Exception at its floor
            if "loss scale already at minimum" not in str(e):
                raise
            raise TrainError(f"step {step + 1}: fp16 overflow with the loss scale at its floor; {ckpt_note}") from None
        step = engine.global_steps
        floor = config.engine.min_loss_scale
        if nonfinite and loss_scale(engine, precision) <= floor:
            raise TrainError(
                f"step {step}: fp16 overflow with the loss scale at its floor (min_loss_scale {floor}); {ckpt_note}"
            )
        if step % config.log_interval == 0 or step == config.max_steps or stopping:
            sums = acc.reduce()
            phases = timer.read()
            device_peak, rss_peak = peak_memory(run.device)
            # the slowest rank's waits and phases, the largest rank's peaks
            worst = comm.max_(
                comm.tensor(
                    [data.data_wait, phases["forward_backward"], phases["optimizer"], device_peak or 0, rss_peak]
                )
            ).tolist()
            interval = Interval(
                steps=step - logged_step,
                seconds=time.perf_counter() - t_last - paused,
                data_wait_sec=worst[0],
                forward_backward_sec=worst[1],
                optimizer_sec=worst[2],
                peak_device_memory_bytes=None if device_peak is None else int(worst[3]),
                peak_rss_bytes=int(worst[4]),
            )
            record = train_record(
                engine, sums, interval, run.mfu_basis, data.state.epoch, loss_scale(engine, precision)
            )
            metrics.log(record)
            if record["mfu"] > 1 and run.rank == 0 and not warned_peak:
                warned_peak = True
                log.warning(
                    "MFU %.2f is above 1: the peak of %.4g TFLOP/s per rank is too low (one measured while other work "
                    "ran?); --peak-tflops sets it",
                    record["mfu"],
                    run.mfu_basis.peak_tflops,
                )
            summary["first"] = summary["first"] or record
            summary["last"] = record
            logged_step, t_last, paused, data.data_wait = step, time.perf_counter(), 0.0, 0.0
        if stopping:
            save()
            log.warning("stopped by a signal at step %d; checkpoint saved, resume with --resume auto", step)
            summary["stopped_by_signal"] = True
            break
        if step % config.save_interval == 0 and step < config.max_steps:
            outside_interval(save)
        if config.eval_interval and step % config.eval_interval == 0 and step < config.max_steps:
            outside_interval(run_eval)
    if not summary.get("stopped_by_signal") and step > start:
        save()
        run_eval()
    if step >= config.max_steps and run.rank == 0:
        (config.output / "finished.json").write_text(json.dumps({"step": step}) + "\n")
    data.close()
    metrics.close()
    if recorder:
        recorder.close()
    summary["step"] = step
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopRequest()  # first: a warning that arrives during start-up still ends in a checkpoint
    setup_logging(args.verbose, rank=launcher_rank() or "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    # DeepSpeed JIT-builds its ops with the first `ninja` on PATH; a different one (the venv's or the
    # system's) makes it rebuild under a lock that every rank then waits on. Always use the venv's.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    from common.jsonl import JsonlError

    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import LaunchError, RendezvousError, shutdown_distributed

    run = None
    try:
        run = setup(args)
        summary = train(run, stop)
    except (TrainError, CheckpointError, LaunchError, RendezvousError, JsonlError) as e:
        log.error("%s", e)
        return 2
    except DataError as e:  # a shard that reads badly in the middle of training
        where = run.config.checkpoints if run else args.output
        log.error("%s (run `albert-data verify` on the shard folder); the last good checkpoint is in %s", e, where)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted again: stopped at once, without a checkpoint; the last good one is in %s", args.output)
        return 130
    finally:
        # The loader's read-ahead thread is stopped on every way out: a daemon thread still inside torch or h5py at
        # interpreter exit can abort the process ("terminate called without an active exception") after an error
        # was reported, and the exit status would then be a signal's, not 2.
        if run is not None:
            run.data.close()
        shutdown_distributed()
    if summary.get("first") and summary.get("last"):
        first, last = summary["first"], summary["last"]
        mlm, sop = (f"{first[k]:.3f} -> {last[k]:.3f}" for k in ("mlm_accuracy", "sop_accuracy"))
        where = f"metrics {args.output / 'metrics.jsonl'}, TensorBoard {args.output / 'tensorboard'}"
        log.info("done: step %d; MLM accuracy %s, SOP accuracy %s; %s", summary["step"], mlm, sop, where)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
