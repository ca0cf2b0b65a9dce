"""One albert-pretrain run's configuration, decoded and checked once, before any work: its command line
(`parse_args`) and its DeepSpeed JSON config become a frozen `RunConfig` (`run_config`). Its `EngineConfig`
(`engine_config`) holds what the DeepSpeed config decides: batch sizes, ZeRO stage, precision, LAMB's settings and
the final dict DeepSpeed gets. Nothing else in a run reads the DeepSpeed dict.

Each problem is a `TrainError` with a one-line message that says what to change.
"""

from __future__ import annotations

import argparse
import copy
import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.flags import integer, number

from .anomaly import AnomalySettings, OnAnomaly
from .masking import MaskOverrides

if TYPE_CHECKING:
    import torch

EXAMPLE = (
    "torchrun --nproc_per_node 2 -m pipeline.pretrain --deepspeed_config ds_configs/cpu-zero2-bf16-lamb.json "
    "--model-config albert-tiny --data data/shards --eval-data data/eval --output runs/tiny --max-steps 200"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="albert-pretrain",
        description="Pretrain ALBERT (MLM + sentence-order prediction) on shards from `albert-data`, with DeepSpeed.",
        epilog=f"example:\n  {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # slurm/pretrain.sbatch reads --data/--output from the arguments: no abbreviations
    )
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        required=True,
        type=Path,
        help="DeepSpeed JSON config (batch, precision, ZeRO, optimizer, scheduler)",
    )
    p.add_argument(
        "--model-config",
        required=True,
        help="model config JSON (Hugging Face AlbertConfig keys) or a shipped name: albert-tiny, albert-base, ...",
    )
    p.add_argument(
        "--data", required=True, type=Path, help="shard folder with manifest.json (from `albert-data shard`)"
    )
    p.add_argument("--eval-data", type=Path, default=None, help="shard folder for evaluation")
    p.add_argument("--output", required=True, type=Path, help="checkpoints/, tensorboard/, metrics.jsonl go here")
    p.add_argument(
        "--max-steps",
        type=integer(1),
        required=True,
        help="optimizer steps to train in all (a resumed run continues to this step)",
    )
    p.add_argument(
        "--save-interval", type=integer(1), default=1000, help="save a checkpoint every N steps (and at the end)"
    )
    p.add_argument(
        "--eval-interval",
        type=integer(0, note="0: never"),
        default=1000,
        help="evaluate every N steps (and at the end)",
    )
    p.add_argument("--eval-batches", type=integer(1), default=100, help="micro-batches per rank in an evaluation")
    p.add_argument("--log-interval", type=integer(1), default=10, help="write a metrics line every N steps")
    p.add_argument("--seed", type=integer(0, 2**32 - 1), default=42, help="model initialisation and data order")
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (newest complete checkpoint in OUTPUT), never, or a checkpoint folder; one written with other ranks, "
        "ZeRO stage or precision is converted (same global batch and model)",
    )
    p.add_argument("--keep-checkpoints", type=integer(1), default=3, help="complete checkpoints to keep")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from the weights of a Hugging Face ALBERT folder (albert-export output)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute layer activations in backward (long sequences)",
    )
    p.add_argument(
        "--attention",
        choices=["auto", "sdpa", "math"],
        default="auto",
        help="sdpa: scaled_dot_product_attention (fused kernels); math: explicit form; auto: sdpa, except explicit on CPU in bf16",
    )
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the shared layers and MLM head: auto = on CUDA only (no faster on CPU, measured)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off")
    p.add_argument(
        "--no-fused-lamb",
        action="store_true",
        help="use our multi-tensor LAMB also where DeepSpeed's FusedLamb applies (CUDA, ZeRO-0)",
    )
    p.add_argument(
        "--no-malloc-tuning", action="store_true", help="CPU: keep glibc's malloc defaults (see pipeline/malloc.py)"
    )
    p.add_argument(
        "--no-tf32",
        action="store_true",
        help="GPU: fp32 matmuls in full IEEE precision instead of TF32 (Ampere and newer)",
    )
    p.add_argument(
        "--peak-tflops",
        type=number(0.0, 1e6, low_open=True),
        default=None,
        help="the peak TFLOP/s of one device for the run's precision, against which metrics.jsonl's mfu is computed "
        "(default: the data sheet's for a known GPU, else a matmul measured at start-up)",
    )
    p.add_argument(
        "--skip-bad-shards",
        action="store_true",
        help="leave out a shard that is unreadable at start-up or fails to read during training (on every rank, "
        "recorded in OUTPUT/data-skips.json for resumes), with a warning, instead of stopping",
    )
    p.add_argument(
        "--shuffle-window",
        type=integer(1),
        default=None,
        help="rows each rank reads and shuffles at a time (default 8192; memory: a few windows of int64 rows)",
    )
    p.add_argument(
        "--on-anomaly",
        choices=[m.value for m in OnAnomaly],
        default=OnAnomaly.STOP.value,
        help="on a non-finite loss, an fp16 loss scale stuck at its floor or a loss spike: stop (a spike is only "
        "logged), or roll back to the newest checkpoint before the step, leave out its batches and --skip-margin "
        "steps' more, and go on",
    )
    p.add_argument(
        "--spike-factor",
        type=number(0.0, 1e6),
        default=2.0,
        help="a step whose loss is above this times the median of the last --spike-window steps is a spike (0: off)",
    )
    p.add_argument("--spike-window", type=integer(1), default=100, help="steps whose median loss a spike is judged by")
    p.add_argument(
        "--skip-margin",
        type=integer(0),
        default=10,
        help="rollback: optimizer steps' batches left out after the anomalous step's own",
    )
    p.add_argument(
        "--max-rollbacks",
        type=integer(0),
        default=3,
        help="rollback: stop with one line after more than this many rollbacks within --rollback-period steps",
    )
    p.add_argument("--rollback-period", type=integer(1), default=1000, help="see --max-rollbacks")
    p.add_argument(
        "--data-skips",
        type=Path,
        default=None,
        help="leave out the examples listed in this data-skips.json (written by a run's rollbacks and shard skips) "
        "from the start; OUTPUT/data-skips.json is read on every resume anyway",
    )
    p.add_argument(
        "--new-data",
        action="store_true",
        help="resume the model on shards other than the checkpoint's (same vocabulary), from their first example; "
        "without it such a resume is refused",
    )
    p.add_argument(
        "--dist-timeout",
        type=number(0.0, 1e6, low_open=True),
        default=600.0,
        help="seconds to wait for the other ranks",
    )
    p.add_argument(
        "--allow-fp16-on-cpu",
        action="store_true",
        help="testing only: run DeepSpeed's fp16 path on a CPU that lacks fp16 support",
    )
    p.add_argument(
        "--record-batches",
        action="store_true",
        help="write each rank's examples (CRC32 of input_ids) per step to OUTPUT/batches-rank<r>.jsonl",
    )
    masking = p.add_argument_group(
        "dynamic masking",
        "shards made with `albert-data shard --masking dynamic` are masked in the loader, afresh each epoch; these "
        "override the settings their manifest records (refused with statically masked --data)",
    )
    masking.add_argument(
        "--masked-lm-prob",
        type=number(0.0, 1.0, low_open=True, high_open=True),
        default=None,
        help="fraction of each sequence's tokens to predict (default: the manifest's)",
    )
    masking.add_argument(
        "--ngram",
        type=integer(1, 10),
        default=None,
        help="longest n-gram of whole words masked, P(n) ~ 1/n (default: the manifest's)",
    )
    masking.add_argument(
        "--max-predictions-per-seq",
        type=integer(1, 65535 - 3, "and at most the sequence length - 3"),
        default=None,
        help="most predictions per sequence, the MLM head's slots (default: the manifest's)",
    )
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # the deepspeed launcher passes it
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


class TrainError(Exception):
    """A setting or input that makes training impossible; reported on one line before any step."""


class Precision(enum.StrEnum):
    """The numeric precision a DeepSpeed config selects (its "fp16" / "bf16" sections; neither: fp32)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights and activations under DeepSpeed."""
        import torch

        return {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[self]


@dataclass(frozen=True)
class BatchSizes:
    """Examples per micro-batch, micro-batches per optimizer step (accumulation), data-parallel ranks."""

    micro: int
    accum: int
    world: int

    @property
    def global_size(self) -> int:
        return self.micro * self.accum * self.world


# FusedLamb's keyword arguments that a DeepSpeed config may carry under "optimizer.params".
FUSED_LAMB_PARAMS = frozenset(
    {"lr", "bias_correction", "betas", "eps", "weight_decay", "max_grad_norm", "max_coeff", "min_coeff"}
)


@dataclass(frozen=True)
class LambSettings:
    """A config's `"optimizer": {"type": "Lamb", "params": {...}}`, in the form our LAMB and FusedLamb take it.

    `params` holds the keyword arguments the config gives (FusedLamb's names, betas as a tuple) other than
    weight_decay, which the optimizer gets per parameter group, and max_grad_norm, which becomes DeepSpeed's
    gradient_clipping (DeepSpeed clips before the step and refuses FusedLamb's own clipping). Parameters the config
    leaves out keep each optimizer's own default."""

    params: dict[str, Any]
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping asked for here

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> LambSettings:
        unknown = set(params) - FUSED_LAMB_PARAMS
        if unknown:
            raise TrainError(f"unsupported Lamb params {sorted(unknown)}; allowed: {sorted(FUSED_LAMB_PARAMS)}")
        rest = dict(params)
        max_grad_norm = float(rest.pop("max_grad_norm", 0.0))
        weight_decay = float(rest.pop("weight_decay", 0.0))
        if "betas" in rest:
            rest["betas"] = tuple(rest["betas"])
        return cls(rest, weight_decay, max_grad_norm)

    @property
    def bias_correction(self) -> bool:
        return bool(self.params.get("bias_correction", True))  # FusedLamb's (and our Lamb's) default


@dataclass(frozen=True)
class EngineConfig:
    """What a DeepSpeed JSON config decides, decoded and checked once (`engine_config`): the engine is built from
    this, and nothing else reads the DeepSpeed dict."""

    batch: BatchSizes
    zero_stage: int
    precision: Precision
    min_loss_scale: float  # fp16: the floor of the dynamic loss scale, as the config gives it (DeepSpeed's default 1)
    grad_accum_dtype: str | None  # "data_types.grad_accum_dtype" as given; None: DeepSpeed's default (the model's)
    optimizer_type: str | None  # the config's "optimizer.type"; None: no optimizer section
    lamb: LambSettings | None  # type Lamb: built by pipeline.lamb_deepspeed; else DeepSpeed builds the config's own
    fp16_on_cpu: bool  # fp16 on a machine without CUDA: DeepSpeed's testing override is needed (--allow-fp16-on-cpu)
    # The dict deepspeed.initialize gets: the config with the batch keys filled, the throughput timer off unless set,
    # WarmupDecayLR's total_num_steps filled and, for Lamb, the optimizer section turned into the engine's settings.
    # Not to be modified: hand DeepSpeed a copy.
    deepspeed: dict[str, Any]


def resolve_batch(ds: dict[str, Any], world: int) -> BatchSizes:
    """DeepSpeed's rule (any two of the three determine the third), checked with messages a user understands."""
    total: int | None = ds.get("train_batch_size")
    micro: int | None = ds.get("train_micro_batch_size_per_gpu")
    accum: int | None = ds.get("gradient_accumulation_steps")
    if micro is None:
        if total is None:
            raise TrainError(
                "DeepSpeed config: set train_micro_batch_size_per_gpu (and train_batch_size or gradient_accumulation_steps)"
            )
        accum = accum or 1
        if total % (accum * world):
            raise TrainError(
                f"train_batch_size {total} is not divisible by gradient_accumulation_steps {accum} x {world} rank(s)"
            )
        micro = total // (accum * world)
    elif accum is None:
        accum = 1 if total is None else total // (micro * world)
        if total is not None and (accum < 1 or total != micro * accum * world):
            raise TrainError(
                f"train_batch_size {total} != micro batch {micro} x {world} rank(s) x some accumulation: choose a multiple of {micro * world}"
            )
    if total is not None and total != micro * accum * world:
        raise TrainError(
            f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps {accum} x {world} rank(s) = {micro * accum * world}"
        )
    return BatchSizes(micro, accum, world)


def _precision(ds: dict[str, Any], stage: int, allow_fp16_on_cpu: bool) -> tuple[Precision, bool]:
    """The config's precision, refusing what cannot work here; and whether it needs the fp16-on-CPU override."""
    import torch

    fp16, bf16 = ds.get("fp16", {}).get("enabled", False), ds.get("bf16", {}).get("enabled", False)
    if fp16 and bf16:
        raise TrainError("DeepSpeed config: fp16 and bf16 are both enabled; choose one")
    if fp16 and stage == 0:
        raise TrainError(
            "fp16 with ZeRO stage 0 is broken in DeepSpeed 0.19 (the loss is never scaled); use ZeRO 1-3 or bf16"
        )
    accum_dtype = str(ds.get("data_types", {}).get("grad_accum_dtype", "")).lower()
    if bf16 and stage == 0 and accum_dtype in ("fp32", "float32", "float"):
        raise TrainError(
            "bf16 with data_types.grad_accum_dtype fp32 needs ZeRO 1-3 (DeepSpeed 0.19 refuses it at ZeRO-0); "
            "use ZeRO-1 or drop the setting"
        )
    fp16_on_cpu = bool(fp16) and not torch.cuda.is_available()
    if fp16_on_cpu and not allow_fp16_on_cpu:
        raise TrainError("fp16 needs a GPU; on CPU use a bf16 or fp32 config (ds_configs/cpu-*.json)")
    return (Precision.FP16 if fp16 else Precision.BF16 if bf16 else Precision.FP32), fp16_on_cpu


def _fill_scheduler(ds: dict[str, Any], max_steps: int | None) -> None:
    """WarmupDecayLR needs total_num_steps: default it to --max-steps (ALBERT: linear warmup, then linear decay to 0)."""
    sched = ds.get("scheduler")
    if sched and sched.get("type") == "WarmupDecayLR":
        params = sched.setdefault("params", {})
        if "total_num_steps" not in params and max_steps is not None:
            params["total_num_steps"] = max_steps
        if "total_num_steps" in params and params.get("warmup_num_steps", 0) >= params["total_num_steps"]:
            raise TrainError(
                f"scheduler: warmup_num_steps {params['warmup_num_steps']} >= total_num_steps {params['total_num_steps']}"
            )


def engine_config(
    ds: dict[str, Any], world: int, max_steps: int | None = None, allow_fp16_on_cpu: bool = False
) -> EngineConfig:
    """Decode and check a DeepSpeed config for `world` data-parallel ranks (`max_steps`: the default of WarmupDecayLR's
    total_num_steps). The caller's dict is not modified. Raises TrainError, one line, on what cannot work."""
    batch = resolve_batch(ds, world)
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    for offload in ("offload_optimizer", "offload_param"):
        device = str((zero.get(offload) or {}).get("device", "none")).lower()
        if device != "none":  # DeepSpeed's offload runs its own CPU Adam/Adagrad kernels, never a client optimizer
            raise TrainError(
                f"DeepSpeed config: zero_optimization.{offload} (device {device}) cannot run with this engine's LAMB "
                "(DeepSpeed offloads only its own optimizers); remove it, and use ZeRO-3 or a smaller micro-batch "
                "to save memory"
            )
    precision, fp16_on_cpu = _precision(ds, stage, allow_fp16_on_cpu)
    final = copy.deepcopy(ds)
    final["train_micro_batch_size_per_gpu"], final["gradient_accumulation_steps"] = batch.micro, batch.accum
    final["train_batch_size"] = batch.global_size
    # DeepSpeed's throughput timer, on by default, synchronises the GPU at every forward and step (two host syncs per
    # micro-batch); metrics.jsonl reports samples/s and tokens/s without it. A config's own "timers" is kept.
    final.setdefault("timers", {"throughput": {"enabled": False}})
    _fill_scheduler(final, max_steps)

    section = ds.get("optimizer") or {}
    optimizer_type = str(section.get("type", "")) if section else None
    lamb = None
    if optimizer_type is not None and optimizer_type.lower() == "lamb":
        # Our LAMB or FusedLamb is built on LAMB's parameter groups and handed to DeepSpeed as a client optimizer:
        # DeepSpeed gets no "optimizer" section, FusedLamb's max_grad_norm as its gradient_clipping, and at ZeRO 1-3
        # permission to wrap an optimizer it has not tested.
        lamb = LambSettings.from_params(dict(section.get("params") or {}))
        del final["optimizer"]
        if lamb.max_grad_norm > 0:
            clipping = float(final.get("gradient_clipping", 0.0))
            if clipping > 0 and clipping != lamb.max_grad_norm:
                raise TrainError(
                    f"optimizer max_grad_norm {lamb.max_grad_norm} contradicts gradient_clipping {clipping}"
                )
            final["gradient_clipping"] = lamb.max_grad_norm
        if stage > 0:
            final["zero_allow_untested_optimizer"] = True
    grad_accum_dtype = ds.get("data_types", {}).get("grad_accum_dtype")
    return EngineConfig(
        batch=batch,
        zero_stage=stage,
        precision=precision,
        min_loss_scale=ds.get("fp16", {}).get("min_loss_scale", 1),
        grad_accum_dtype=None if grad_accum_dtype is None else str(grad_accum_dtype),
        optimizer_type=optimizer_type,
        lamb=lamb,
        fp16_on_cpu=fp16_on_cpu,
        deepspeed=final,
    )


def read_deepspeed_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"{path}: no such DeepSpeed config") from None
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: not valid JSON ({e})") from None


@dataclass(frozen=True)
class RunConfig:
    """One albert-pretrain run's settings: the command line's values and its DeepSpeed config, decoded and checked
    once (`run_config`), before any work. Everything the run does reads them from here."""

    engine: EngineConfig
    model_config_name: str  # --model-config: a shipped name or a model config file
    data: Path
    eval_data: Path | None
    output: Path
    max_steps: int
    save_interval: int
    eval_interval: int
    eval_batches: int
    log_interval: int
    seed: int
    resume: str  # auto | never | a checkpoint folder
    keep_checkpoints: int
    init_from: Path | None
    activation_checkpointing: bool
    attention: str
    compile: str
    fused_lamb: bool
    malloc_tuning: bool
    tf32: bool
    skip_bad_shards: bool
    shuffle_window: int | None  # rows of a rank's share shuffled together; None: pipeline.data's default
    record_batches: bool
    peak_tflops: float | None  # --peak-tflops: the device's peak for MFU; None: looked up or measured (pipeline.flops)
    new_data: bool  # a resume may continue on other shards (of the same vocabulary), from their start
    anomaly: AnomalySettings  # what an anomalous step is and what the run does about it (pipeline/anomaly.py)
    data_skips: Path | None  # --data-skips: examples to leave out from the start
    masking: MaskOverrides  # dynamic masking of --data: what the flags override of the manifest's settings

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"


def run_config(args: argparse.Namespace, world: int) -> RunConfig:
    """The run's configuration from albert-pretrain's arguments, its DeepSpeed JSON and the number of ranks."""
    ds = read_deepspeed_config(args.deepspeed_config)
    return RunConfig(
        engine=engine_config(ds, world, args.max_steps, args.allow_fp16_on_cpu),
        model_config_name=args.model_config,
        data=args.data,
        eval_data=args.eval_data,
        output=args.output,
        max_steps=args.max_steps,
        save_interval=args.save_interval,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        log_interval=args.log_interval,
        seed=args.seed,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        init_from=args.init_from,
        activation_checkpointing=args.activation_checkpointing,
        attention=args.attention,
        compile=args.compile,
        fused_lamb=not args.no_fused_lamb,
        malloc_tuning=not args.no_malloc_tuning,
        tf32=not args.no_tf32,
        skip_bad_shards=args.skip_bad_shards,
        shuffle_window=args.shuffle_window,
        record_batches=args.record_batches,
        peak_tflops=args.peak_tflops,
        new_data=args.new_data,
        anomaly=anomaly_settings(args),
        data_skips=args.data_skips,
        masking=MaskOverrides(args.masked_lm_prob, args.ngram, args.max_predictions_per_seq),
    )


def anomaly_settings(args: argparse.Namespace) -> AnomalySettings:
    settings = AnomalySettings(
        on_anomaly=OnAnomaly(args.on_anomaly),
        spike_factor=args.spike_factor,
        spike_window=args.spike_window,
        skip_margin=args.skip_margin,
        max_rollbacks=args.max_rollbacks,
        rollback_period=args.rollback_period,
    )
    if settings.on_anomaly is OnAnomaly.ROLLBACK and args.keep_checkpoints < 2:
        raise TrainError(
            "--on-anomaly rollback needs --keep-checkpoints 2 or more (a second anomaly soon after a rollback goes back "
            "one checkpoint further)"
        )
    return settings


def check_data_against_model(data, cfg, source: Path) -> None:
    if data.sentence_task != "sop":
        raise TrainError(
            f"{source}: sentence task {data.sentence_task!r}; this model trains sentence-order prediction (sop)"
        )
    if data.vocab_size != cfg.vocab_size:
        raise TrainError(
            f"{source}: the shards' vocabulary has {data.vocab_size} pieces but the model config says vocab_size {cfg.vocab_size}"
        )
    if data.seq_len > cfg.max_position_embeddings:
        raise TrainError(
            f"{source}: sequences of {data.seq_len} tokens exceed the model's max_position_embeddings {cfg.max_position_embeddings}"
        )
