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
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.launchers import launcher_rank
from common.logs import setup_logging

from .anomaly import AnomalyDetector, OnAnomaly, TooManyRollbacks
from .engine import build_engine, loss_scale
from .metrics import (
    ANOMALY,
    BatchRecorder,
    HostSyncCounter,
    Interval,
    IntervalSums,
    Metrics,
    MfuBasis,
    PhaseTimer,
    comm_time,
    lamb_stats,
    peak_memory,
    record_compile_counters,
    train_record,
)
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
    detector: AnomalyDetector  # the loss history and rollbacks so far (pipeline/anomaly.py)
    lamb: Any  # the torch optimizer LAMB steps with (ours records its trust ratios), or None where DeepSpeed built it


def load_checkpoint(engine, config: RunConfig, tag_dir: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """Collective: a checkpoint of this run's layout by DeepSpeed's own load, one of another layout (ranks, ZeRO
    stage, precision) converted per parameter. Returns the client state."""
    from . import checkpoint as ckpt
    from . import reshard

    if ckpt.same_layout(saved, config.engine, type(engine.optimizer).__name__):
        return ckpt.load(engine, tag_dir)
    world, stage, precision = config.engine.batch.world, config.engine.zero_stage, config.engine.precision
    was = ckpt.describe_layout(saved["world_size"], saved["zero_stage"], saved["precision"])[0]
    now = ckpt.describe_layout(world, stage, precision)[1]
    fp16_both = saved["precision"] == precision == Precision.FP16
    return reshard.resume(engine, tag_dir, was, now, fp16_both, ckpt.format_version(saved))


def known_skips(config: RunConfig, resume_from: Path | None, identity: DataIdentity) -> list[dict[str, Any]]:
    """The examples earlier runs left out (data-skips.json of --data-skips, of OUTPUT and of the folder the
    checkpoint comes from); refused in one line when recorded for other shards."""
    from . import data_skips

    files = [config.data_skips] if config.data_skips else []
    if resume_from is not None:
        files += [folder / data_skips.FILE for folder in dict.fromkeys([config.output, resume_from.parent.parent])]
    try:
        return [skip for f in files if f.is_file() for skip in data_skips.read(f, identity.to_dict(), config.seed)]
    except data_skips.SkipsFileError as e:
        raise TrainError(str(e)) from None


def setup(args: argparse.Namespace) -> Run:
    """Launch, checks (before any work), model, DeepSpeed engine with our LAMB, and the resume."""
    import torch
    import torch.distributed as dist

    from . import checkpoint as ckpt
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
        window: dict[str, Any] = {"window": config.shuffle_window} if config.shuffle_window else {}
        data = PretrainingData(
            config.data,
            batch.micro,
            batch.accum,
            skip_bad_shards=config.skip_bad_shards,
            **window,
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
    if config.data_skips and not config.data_skips.is_file():
        raise TrainError(f"--data-skips {config.data_skips}: no such file")
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
    detector = AnomalyDetector(config.anomaly)
    if resume_from and saved:
        client = load_checkpoint(engine, config, resume_from, saved)
        if new_data:
            log.warning("%s", new_data)
        else:
            try:
                data.load_state_dict(client["loader"], plan=ckpt.loader_plan(resume_from, saved))
            except DataError as e:
                raise TrainError(f"{resume_from}: the saved data position cannot continue here: {e}") from None
            detector.load_state_dict(client.get("anomaly"))
    margin = config.anomaly.skip_margin + 1
    if config.anomaly.on_anomaly is OnAnomaly.ROLLBACK and margin >= data.steps_per_epoch:
        raise TrainError(
            f"--skip-margin {config.anomaly.skip_margin}: a rollback would leave out {margin} steps' batches, not fewer "
            f"than an epoch of {config.data} ({data.steps_per_epoch} steps); choose a smaller margin"
        )
    try:
        data.add_skips(known_skips(config, None if new_data else resume_from, data_identity))
    except DataError as e:
        raise TrainError(f"the examples to leave out cannot be applied: {e}") from None
    if data.skips:
        log.info("%d skip(s) of examples known: %s", len(data.skips), describe_skips(data.skips.values()))
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
        detector=detector,
        lamb=optimizer.optimizer,
    )


def describe_skips(skips) -> str:
    parts = []
    for s in skips:
        what = f"shard {s['shard']}" if s["kind"] == "shard" else f"micro-batches {s['at']}-{s['until'] - 1} per rank"
        parts.append(f"{what} of epoch {s['epoch']} (step {s['step']}: {s['cause']})")
    return "; ".join(parts)


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
    step's flags and mean loss (non-finite loss on any rank, a stop signal on any rank, the loss for the spike test)
    are read once per optimizer step, in one all-reduce, and the metric sums on logging steps only. The phase times
    follow the same rule (PhaseTimer: CUDA events recorded every step, read on logging steps); peak memory is read
    from the allocator's counters, not the device. With --skip-bad-shards, one more flag is read before the forward
    (a shard that fails to read on one rank must stop every rank before its collectives)."""
    import torch

    from . import checkpoint as ckpt
    from . import data_skips, reshard
    from .data import DataError, LoaderState, to_device

    config, engine, data, comm, detector = run.config, run.engine, run.data, run.comm, run.detector
    batch, precision = config.engine.batch, config.engine.precision
    rollback = config.anomaly.on_anomaly is OnAnomaly.ROLLBACK
    step = start = engine.global_steps
    metrics = Metrics(config.output, run.rank == 0, resume_step=step if run.resumed else None)
    recording = config.output / f"batches-rank{run.rank}.jsonl"
    recorder = BatchRecorder(recording, step) if config.record_batches else None
    acc = IntervalSums(comm)
    summary: dict[str, Any] = {"start_step": step, "first": None, "last": None, "rollbacks": 0}
    if step >= config.max_steps:
        log.info("already at step %d of --max-steps %d: nothing to train", step, config.max_steps)

    batches = iter(data)
    timer = PhaseTimer(run.device)
    syncs = HostSyncCounter.for_device(run.device)  # host syncs per step on CUDA
    paused = 0.0  # seconds of the interval spent saving and evaluating: left out of its throughput
    logged_step, t_last = step, time.perf_counter()
    names = reshard.lamb_names(engine.module)  # ZeRO-0's optimizer state is saved by position: name it
    meta = ckpt.run_meta(
        config, type(engine.optimizer).__name__, run.model_config.to_dict(), run.data_identity.to_dict()
    )

    def save() -> None:
        state = {"loader": data.state_dict(), "lamb_param_names": names, "anomaly": detector.state_dict()}
        hf_config = run.model_config.to_hf_dict()
        ckpt.save(engine, config.checkpoints, step, state, meta, hf_config, config.keep_checkpoints)

    def save_skips() -> None:
        """OUTPUT/data-skips.json: this run's skips (the file of an earlier run on other data is replaced)."""
        if run.rank == 0:
            skips, identity = list(data.skips.values()), run.data_identity.to_dict()
            data_skips.write(config.output / data_skips.FILE, skips, identity, config.seed)

    def rollback_target(failed_step: int) -> Path | None:
        """Rank 0's choice, broadcast: the newest intact checkpoint of this data before `failed_step`, one further
        back when the last rollback went to it. The checkpoints after it (an abandoned history) are removed."""
        import torch.distributed as dist

        chosen: list[str | None] = [None]
        if run.rank == 0:
            mine = run.data_identity.to_dict()
            before = [
                c
                for c in ckpt.complete_checkpoints(config.checkpoints)
                if ckpt.step_of(c) < failed_step
                and ckpt.read_meta(c).get("data_identity") == mine
                and not ckpt.damage(c)
            ]
            if detector.rollbacks and len(before) > 1 and ckpt.step_of(before[-1]) == detector.rollbacks[-1]["to_step"]:
                before = before[:-1]
            if before:
                chosen[0] = str(before[-1])
                for later in ckpt.complete_checkpoints(config.checkpoints):
                    if ckpt.step_of(later) > ckpt.step_of(before[-1]):
                        shutil.rmtree(later, ignore_errors=True)
        dist.broadcast_object_list(chosen, src=0)
        return Path(chosen[0]) if chosen[0] else None

    def run_eval() -> None:
        if config.eval_data:
            r = evaluate(run, config.eval_data, config.eval_batches)
            metrics.log({"split": "eval", "step": step, **r})
            accuracies = f"MLM accuracy {r['mlm_accuracy']:.4f}, SOP accuracy {r['sop_accuracy']:.4f}"
            log.info("eval step %d: loss %.4f, %s", step, r["loss"], accuracies)

    # fp16: the steps DeepSpeed skipped on an overflow in a row so far, each with where its batches started
    overflowed: list[tuple[int, LoaderState]] = []

    def roll_back(failed_step: int, cause: str, loss: float, positions: list[dict]) -> None:
        """Collective: reload the newest checkpoint before `failed_step` (one further back when the last rollback
        went to it), leave out the batches of the anomalous steps (read from `positions`, the first `failed_step`'s)
        and of --skip-margin steps after the last, log it, and go on from there."""
        nonlocal step, acc, logged_step, t_last, paused, batches
        target = rollback_target(failed_step)
        if target is None:
            raise TrainError(
                f"step {failed_step}: {cause}; no intact checkpoint of this data before it to roll back to"
            )
        to_step = ckpt.step_of(target)
        try:
            detector.rolled_back(failed_step, cause, loss, to_step)
        except TooManyRollbacks as e:
            raise TrainError(
                f"step {failed_step}: {cause}; {e}. The last good checkpoint is in {config.checkpoints}"
            ) from None
        # each step's batches where it read them (a spiral may run across a known skip), the margin after the last
        skips = [s for p in positions[:-1] for s in data.window_skips(p, batch.accum, failed_step, cause)]
        skips += data.window_skips(positions[-1], (config.anomaly.skip_margin + 1) * batch.accum, failed_step, cause)
        rollbacks = list(detector.rollbacks)
        client = load_checkpoint(engine, config, target, ckpt.read_meta(target))
        # DeepSpeed counts micro-steps itself, and not in checkpoints: a step that raised (the fp16 loss scale at its
        # floor) left the count short, and the accumulation boundary would then fall on the wrong micro-batch
        engine.micro_steps = engine.global_steps * batch.accum
        data.load_state_dict(client["loader"])
        detector.load_state_dict(client.get("anomaly"))
        detector.rollbacks = rollbacks
        data.add_skips(skips)
        save_skips()
        left_out = sum(s["until"] - s["at"] for s in skips) * batch.micro * batch.world
        event = {"split": ANOMALY, "step": failed_step, "cause": cause, "loss": loss, "action": "rollback"}
        metrics.rewind(to_step)
        if recorder:
            recorder.rewind(to_step)
        metrics.log({**event, "to_step": to_step, "examples_left_out": left_out, "skips": skips})
        log.warning(
            "step %d: %s; rolled back to %s (step %d), leaving out %d examples: %s",
            failed_step,
            cause,
            target,
            to_step,
            left_out,
            describe_skips(skips),
        )
        step = logged_step = engine.global_steps
        acc, t_last, paused, data.data_wait = IntervalSums(comm), time.perf_counter(), 0.0, 0.0
        timer.read()
        batches = iter(data)
        overflowed.clear()
        summary["rollbacks"] += 1

    def agree_on_bad_shards(failed: str | None) -> list[str]:
        """Collective: the shards that failed to read on any rank in this step's fetch."""
        import torch.distributed as dist

        if not comm.sum_(comm.tensor([float(failed is not None)])).item():
            return []
        names: list[str | None] = [None] * batch.world
        dist.all_gather_object(names, failed)
        return sorted({n for n in names if n})

    ckpt_note = f"the last good checkpoint is in {config.checkpoints}"
    if (
        rollback
        and step < config.max_steps
        and not any(
            ckpt.read_meta(c).get("data_identity") == run.data_identity.to_dict()
            for c in ckpt.complete_checkpoints(config.checkpoints)
        )
    ):
        save()  # a good state to come back to before the first interval's checkpoint (also after --new-data)
    save_skips()
    warned_peak = False  # an MFU above 1 was reported

    def outside_interval(action) -> None:
        nonlocal paused
        began = time.perf_counter()
        action()
        paused += time.perf_counter() - began

    def roll_back_overflows(loss: float) -> None:
        """fp16 overflows down to the loss scale's floor (the last of `overflowed`): the spiral began at its first
        overflow, so the rollback goes to a checkpoint before that, and leaves out the batches of every overflowed
        step."""
        first, floor_step = overflowed[0][0], overflowed[-1][0]
        cause = (
            f"fp16 overflow at every step from {first} to {floor_step}, the loss scale down to its floor "
            f"(min_loss_scale {config.engine.min_loss_scale})"
        )
        roll_back(first, cause, loss, [data.position(at) for _, at in overflowed])

    t_last, data.data_wait = time.perf_counter(), 0.0
    while step < config.max_steps:
        syncs.begin_step()
        step_start = data.state.copy()  # where this step's batches start: a skip of them is recorded from here
        # The step's micro-batches are fetched first so that the MLM loss can be normalised by the number of
        # predictions in the whole global batch: then accumulation and data parallelism give exactly the
        # gradient of one large batch (a per-micro-batch mean would weight predictions unevenly).
        if config.skip_bad_shards:
            failed = None
            try:
                micro_batches = [next(batches) for _ in range(batch.accum)]
            except DataError as e:
                if e.path is None:
                    raise
                failed, reason = e.path.name, str(e)
            bad_shards = agree_on_bad_shards(failed)
            if bad_shards:
                if failed:
                    log.warning("rank %d: %s", run.rank, reason)
                position = data.position(step_start)
                data.load_state_dict({**position, "plan": asdict(data.plan)})
                found = [data_skips.shard_skip(position, data.plan, n, step + 1, "unreadable") for n in bad_shards]
                data.add_skips(found)
                save_skips()
                metrics.log({"split": ANOMALY, "step": step + 1, "cause": "unreadable shard", "shards": bad_shards})
                log.warning(
                    "step %d: shard(s) %s failed to read; left out from here on (--skip-bad-shards)",
                    step + 1,
                    ", ".join(bad_shards),
                )
                batches = iter(data)
                continue
        else:
            micro_batches = [next(batches) for _ in range(batch.accum)]
        counts = [float((b["masked_lm_positions"] > 0).sum()) for b in micro_batches]  # CPU tensors: no sync
        total = comm.sum_(comm.tensor([sum(counts)])).clamp(min=1.0)
        if recorder:
            recorder.write(step + 1, micro_batches)
        bad = torch.zeros((), dtype=torch.bool, device=run.device)
        step_loss = torch.zeros((), dtype=torch.float64, device=run.device)
        with timer.phase("forward_backward"):
            for micro, (b, count) in enumerate(zip(micro_batches, counts)):
                out = engine(**to_device(b, run.device))
                weight = (count * batch.global_size / batch.micro / total).to(out.mlm_loss.dtype)
                loss = out.mlm_loss * weight[0] + out.sop_loss
                bad |= ~torch.isfinite(loss.detach())
                step_loss += loss.detach().double()
                acc.add(out, b)
                engine.backward(loss)
                if micro < batch.accum - 1:
                    engine.step()  # DeepSpeed counts micro-steps; it applies the update at the boundary only
        signal_flag = comm.tensor([float(stop.signal is not None)])[0]
        flags = comm.sum_(torch.stack([bad.double(), signal_flag, step_loss]))
        # every rank stops at the same step, whichever rank saw the problem or signal: the step's one host read
        nonfinite_count, signals, loss_sum = flags.tolist()
        nonfinite, stopping = nonfinite_count > 0, signals > 0
        mean_loss = loss_sum / (batch.accum * batch.world)  # the global batch's MLM + SOP loss
        if precision is Precision.FP16:  # an overflow is the loss scaler's business; a spike is checked
            cause = None if nonfinite else detector.check(step + 1, mean_loss, False)
        else:
            cause = detector.check(step + 1, mean_loss, nonfinite)
        if cause and rollback:
            engine.step()  # applied, then undone by the reload: the step's gradients are cleared as usual
            roll_back(step + 1, cause, mean_loss, [data.position(step_start)])
            continue
        if cause and nonfinite:
            raise TrainError(
                f"step {step + 1}: the loss is not finite (NaN or inf); stopping without applying this step. "
                f"The last good checkpoint is in {config.checkpoints}"
            )
        if cause:  # a spike, with --on-anomaly stop: logged, applied
            metrics.log({"split": ANOMALY, "step": step + 1, "cause": cause, "loss": mean_loss, "action": "none"})
            log.warning("step %d: %s (--on-anomaly rollback would roll back)", step + 1, cause)
        try:
            with timer.phase("optimizer"):
                engine.step()
        except Exception as e:  # DeepSpeed's fp16 loss scaler raises a bare Exception at its floor
            if "loss scale already at minimum" not in str(e):
                raise
            if not rollback:
                raise TrainError(
                    f"step {step + 1}: fp16 overflow with the loss scale at its floor; {ckpt_note}"
                ) from None
            engine.optimizer.zero_grad(set_to_none=True)  # (DeepSpeed raised before clearing them)
            overflowed.append((step + 1, step_start))
            roll_back_overflows(mean_loss)
            continue
        # fp16: DeepSpeed skips a step whose gradients overflowed (the loss finite or not) and halves the scale
        overflow = precision is Precision.FP16 and not engine.was_step_applied()
        if overflow:
            overflowed.append((step + 1, step_start))
        else:
            overflowed.clear()
        step = engine.global_steps
        syncs.end_step()
        if run.rank == 0 and step == start + 1:
            record_compile_counters(config.output)  # torch.compile's graphs, breaks and fallbacks, into run-info.json
        floor = config.engine.min_loss_scale
        if overflow and loss_scale(engine, precision) <= floor:
            cause = f"fp16 overflow with the loss scale at its floor (min_loss_scale {floor})"
            if not rollback:
                raise TrainError(f"step {step}: {cause}; {ckpt_note}")
            roll_back_overflows(mean_loss)
            continue
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
            record |= lamb_stats(run.lamb, comm, record["grad_norm"]) | syncs.read() | comm_time()
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
    syncs.close()
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
