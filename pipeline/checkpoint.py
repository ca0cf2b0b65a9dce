"""Checkpoints: DeepSpeed's own files plus a completion marker, so that a half-written one is never resumed.

Layout under `<output>/checkpoints/`:
    step-00000100/            DeepSpeed's files (engine.save_checkpoint with this tag)
    step-00000100/rng-rank<r>.pt   each rank's random generator states
    step-00000100/complete.json    written last, atomically, by rank 0 after every rank has saved
    model_config.json              the model's config (what `albert-export` reads)
    latest                         DeepSpeed's pointer to the newest complete tag

`--resume auto` takes the newest tag with complete.json whose files are still the ones it lists (name, size, sha256:
a file lost, truncated or damaged on disk since the save is named, and the next older intact checkpoint is taken); a
save killed midway leaves a tag without complete.json, which is ignored (and removed by the next save). A save that
fails on any rank (a full disk) fails on every rank with one line, and its partial tag is removed. The last `keep`
complete checkpoints are kept.

complete.json holds the run's layout (ranks, ZeRO stage, precision, batch, optimizer wrapper, model config) and the
checkpoint's `format_version` (FORMAT_VERSION); what older checkpoints lack is filled in by version, here and in
pipeline.reshard, and a newer version than this code knows is refused.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from common.atomic import write_text
from common.inventory import inventory_problems, take_inventory

if TYPE_CHECKING:
    from .run_config import EngineConfig, RunConfig

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
# complete.json's "format_version"; a checkpoint without one is version 1.
#   1: written before checkpoints were numbered; complete.json may lack "micro_batch" and "optimizer_wrapper", the
#      loader position its "plan", the client state "lamb_param_names" (each was added at another time).
#   2: all of them are present.
#   3: complete.json also lists the tag's files ("files": name -> size, sha256) and what the run trained on
#      ("data_identity": pipeline.identity.DataIdentity; "vocab_sha256", for albert-export).
FORMAT_VERSION = 3
# model config keys that a run may change when it resumes: they shape no weight and no computation of the saved state
TRAINING_ONLY = frozenset(
    {"hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob", "initializer_range"}
)
PREFIX = "step-"


class CheckpointError(Exception):
    """A checkpoint that cannot be used as it is; the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not folder.is_dir():
        return []
    tags = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE).is_file()]
    return sorted(tags, key=step_of)


def step_of(tag_dir: Path) -> int:
    """The step a checkpoint folder (step<N>) was written at."""
    return int(tag_dir.name[len(PREFIX) :])


def resolve_resume(mode: str, folder: Path) -> Path | None:
    """`auto`: the newest complete checkpoint in folder whose files are intact (None if there is none); `never`: None;
    else that path, which must be complete and intact. Collective: rank 0 reads the files, every rank gets its
    answer (or its error)."""
    if mode == "never":
        return None
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = _resume_candidate(mode, folder)
        except CheckpointError as e:
            answer[0] = e
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], CheckpointError):
        raise answer[0]
    return answer[0]


def _resume_candidate(mode: str, folder: Path) -> Path | None:
    if mode == "auto":
        complete = complete_checkpoints(folder)
        newest_problems: list[str] = []
        for tag_dir in reversed(complete):
            problems = damage(tag_dir)
            if not problems:
                return tag_dir
            newest_problems = newest_problems or problems
            log.warning("%s is damaged (%s); trying the checkpoint before it", tag_dir, "; ".join(problems[:3]))
        if complete:  # starting over would drop the run's metrics: only on purpose
            raise CheckpointError(
                f"{folder}: every checkpoint is damaged since it was saved (the newest, {complete[-1].name}: "
                f"{'; '.join(newest_problems[:3])}); restore the files, or pass --resume never to start over"
            )
        return None
    path = Path(mode)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(
            f"{path}: not a complete checkpoint (no {COMPLETE}); pass a folder such as {folder}/{tag_for(100)}"
        )
    problems = damage(path)
    if problems:
        raise CheckpointError(
            f"{path}: damaged since it was saved ({'; '.join(problems[:3])}); pass another checkpoint"
        )
    return path


def damage(tag_dir: Path) -> list[str]:
    """What differs in a checkpoint's files from the list its complete.json records (version 3 on; an older one
    records none, and only its completion marker vouches for it)."""
    if not (tag_dir / COMPLETE).is_file():  # (DeepSpeed's own checkpoints: nothing recorded)
        return []
    try:
        meta = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        return [f"{COMPLETE} unreadable ({e})"]
    files = meta.get("files") if isinstance(meta, dict) else None
    return inventory_problems(tag_dir, files) if files else []


def format_version(meta: dict[str, Any]) -> int:
    return int(meta.get("format_version", 1))


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """complete.json of a checkpoint this code can read (a newer format is refused)."""
    meta = json.loads((tag_dir / COMPLETE).read_text())
    version = format_version(meta)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{tag_dir}: checkpoint format version {version}, newer than this albert-pretrain reads ({FORMAT_VERSION}); "
            "resume it with the version that wrote it"
        )
    return meta


def run_meta(
    config: RunConfig, wrapper: str, model_config: dict[str, Any], data_identity: dict[str, str]
) -> dict[str, Any]:
    """What complete.json records of the run that writes it (`wrapper`: DeepSpeed's optimizer wrapper class;
    `data_identity`: pipeline.identity.DataIdentity of its training shards)."""
    engine = config.engine
    return {
        "format_version": FORMAT_VERSION,
        "world_size": engine.batch.world,
        "zero_stage": engine.zero_stage,
        "precision": engine.precision.value,
        "global_batch": engine.batch.global_size,
        "micro_batch": engine.batch.micro,
        "optimizer_wrapper": wrapper,
        "data": str(config.data),
        "model_config": model_config,
        "data_identity": data_identity,
        "vocab_sha256": data_identity["vocab_sha256"],
    }


def check_compatible(tag_dir: Path, global_batch: int, model_config: dict[str, Any]) -> dict[str, Any]:
    """Refuse, before any step, a checkpoint this run cannot continue: another model, another global batch. Another
    number of ranks, micro-batch split or ZeRO stage is fine (see `same_layout`). Returns its metadata."""
    meta = read_meta(tag_dir)
    if meta["global_batch"] != global_batch:
        raise CheckpointError(
            f"{tag_dir}: written with a global batch of {meta['global_batch']}, this run has {global_batch}; the "
            f"learning-rate schedule and the data position count in global batches. Set train_batch_size (or micro "
            f"batch x accumulation x ranks) to {meta['global_batch']}, or start a new run from its weights: "
            f"`albert-export --checkpoint {tag_dir.parent} --output hf/` then `--init-from hf/`"
        )
    saved = meta.get("model_config") or {}
    keys = (set(saved) | set(model_config)) - TRAINING_ONLY
    differ = sorted(k for k in keys if saved.get(k) != model_config.get(k))
    if differ:
        what = ", ".join(f"{k} {saved.get(k)} -> {model_config.get(k)}" for k in differ[:4])
        raise CheckpointError(
            f"{tag_dir}: written for another model ({what}); resume with its model config, or start a new run "
            "(--output elsewhere)"
        )
    return meta


def same_layout(meta: dict[str, Any], config: EngineConfig, wrapper: str) -> bool:
    """Whether DeepSpeed can load the checkpoint's optimizer partitions as they are (else `pipeline.reshard`): the
    same ranks, ZeRO stage, precision and DeepSpeed optimizer wrapper (`wrapper`: this run's). A version-1 checkpoint
    that does not name its wrapper is taken to have this run's."""
    saved_wrapper = meta.get("optimizer_wrapper", wrapper) if format_version(meta) == 1 else meta["optimizer_wrapper"]
    saved = (meta["world_size"], meta["zero_stage"], meta["precision"], saved_wrapper)
    return saved == (config.batch.world, config.zero_stage, config.precision.value, wrapper)


def describe_layout(world_size: int, zero_stage: int, precision: str) -> tuple[str, str]:
    """A layout in words, as a checkpoint's ("2-rank ZeRO-2 (bf16)") and as a run's ("1 rank with ZeRO-0 (bf16)")."""
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    return f"{world_size}-rank ZeRO-{zero_stage} ({precision})", f"{ranks} with ZeRO-{zero_stage} ({precision})"


def loader_plan(tag_dir: Path, meta: dict[str, Any]) -> dict[str, int] | None:
    """The plan the saved loader position counts in where the position may not name one (version 1): the writer's
    ranks and micro-batch (complete.json's, else from its DeepSpeed config) and the loader's default window. None
    from version 2 on, where every position names its plan."""
    if format_version(meta) >= 2:
        return None
    micro = meta.get("micro_batch")
    if micro is None:
        states = torch.load(
            next(iter(sorted(tag_dir.glob("*model_states.pt")))), map_location="cpu", mmap=True, weights_only=False
        )
        micro = int(states["ds_config"]["train_micro_batch_size_per_gpu"])
    from .data import DEFAULT_WINDOW

    return {"world": meta["world_size"], "micro": micro, "window": max(1, DEFAULT_WINDOW // micro) * micro}


def _rng_state() -> dict[str, Any]:
    """Every generator a step may draw from: torch's CPU one, the rank's CUDA device's (dropout on the GPU), numpy's,
    Python's. "cuda" is None on a run without CUDA."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if torch.cuda.is_available():
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        else:
            log.warning(
                "the checkpoint holds no CUDA random state (written without a GPU): dropout draws on the GPU "
                "start from the seed, not where the run stopped"
            )


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save(engine, folder: Path, step: int, client_state: dict, meta: dict, model_config: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. A failure on any rank (a full disk) is raised
    on every rank as one CheckpointError, the partial tag removed and the last good checkpoint untouched."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tag_dir = folder / tag
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a save of this step that was killed midway
            shutil.rmtree(tag_dir)
    dist.barrier()
    error = None
    try:
        engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), tag_dir / f"rng-rank{rank}.pt")
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError ("unexpected pos ...")
        error = f"rank {rank}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    _raise_together(error, folder, tag_dir, step)
    if rank == 0:
        try:
            _write_json(folder / "model_config.json", model_config)
            files = take_inventory(tag_dir, exclude=frozenset({COMPLETE}))
            _write_json(tag_dir / COMPLETE, {**meta, "step": step, "tag": tag, "files": files})
            write_text(folder / "latest", tag)  # DeepSpeed's own pointer, for its tools and albert-export
        except OSError as e:
            error = f"rank 0: {e}"
    _raise_together(error, folder, tag_dir, step)
    if rank == 0:
        for old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in folder.glob(f"{PREFIX}*"):
            if partial.is_dir() and not (partial / COMPLETE).exists():
                shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    log.info("saved checkpoint %s", tag_dir)
    return tag_dir


def _raise_together(error: str | None, folder: Path, tag_dir: Path, step: int) -> None:
    """Every rank learns whether any rank's part of the save failed; if so, all raise the same one line (the
    partial tag removed, so that the space it took is free again)."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    good = complete_checkpoints(folder)
    kept = f"the last good checkpoint, {good[-1]}, is intact" if good else "no earlier checkpoint exists"
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    need = sum(f.stat().st_size for f in good[-1].rglob("*") if f.is_file()) if good else 0
    space = f"{free / 2**20:.1f} MB free there, a checkpoint takes about {need / 2**20:.1f} MB; " if need else ""
    raise CheckpointError(
        f"{folder}: saving step {step} failed ({failed[0]}); {space}{kept}. Free space (or fix the folder) and run "
        "the same command to resume"
    )


def load(engine, tag_dir: Path) -> dict:
    """Collective. Restores model, optimizer, scheduler and RNG states from a checkpoint of this run's layout;
    returns the client state."""
    _, client_state = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    load_rng(tag_dir)
    log.info("resumed from %s", tag_dir)
    return client_state


def load_rng(tag_dir: Path) -> bool:
    """This rank's random generator states, where the checkpoint has a file for this rank."""
    rng = tag_dir / f"rng-rank{dist.get_rank()}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return rng.exists()
