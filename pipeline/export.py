"""albert-export: a DeepSpeed checkpoint of our model -> a Hugging Face ALBERT folder.

    albert-export --checkpoint runs/demo/checkpoints --output runs/demo/hf --spm-model runs/demo/spm.model
    python -m pipeline.export --checkpoint runs/demo/checkpoints/step-00001000 --output hf/

`--checkpoint` is the folder given to `engine.save_checkpoint` (it holds `latest` and one folder
per tag) or one tag folder. Any ZeRO stage (0-3) is consolidated in this one plain process, on
CPU, without a process group: stages 1-3 through DeepSpeed's zero_to_fp32 (the fp32 master
weights), stage 0 from `mp_rank_00_model_states.pt`, and checkpoints of DeepSpeed's BF16_Optimizer
(bf16 at ZeRO-1 with `"data_types": {"grad_accum_dtype": "fp32"}`) by our own reader of their
fp32 partitions, which zero_to_fp32 refuses.

Checked before any work (exit 2, nothing written): an albert-pretrain tag must have its completion
marker (`complete.json`) and every rank's files, none truncated; `--model-config` (a file or a
shipped name) must be the config the checkpoint recorded, up to what a resumed run may change
(dropout, initializer_range); `--spm-model` must have vocab_size pieces and, where the checkpoint
or its training data recorded the vocabulary's sha256, that sha256; the output must be new, empty,
or (with --overwrite) an earlier export whose files are unchanged. Checkpoints written by DeepSpeed
alone (no marker) are exported with a warning.

The model config is the one the checkpoint recorded: `complete.json`'s model_config, else
`model_config.json` in the tag folder or next to the tags (the contract for DeepSpeed-only
checkpoints). Output: see pipeline/export_output.py (written whole into a temporary sibling,
renamed into place; `export.json` records where it came from and the sha256 of each file).
"""

import argparse
import json
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import socket
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from common.inventory import file_sha256
from common.logs import setup_logging
from common.output_lock import LockUnsupported, OutputInUse, OutputLock

from . import export_output as output
from .checkpoint import COMPLETE, PREFIX, TRAINING_ONLY, complete_checkpoints, damage
from .hf import check_spm_model, check_state_dict, export_hf
from .model import AlbertConfig

log = logging.getLogger("albert-export")

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP-style and torch.compile wrappers


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> tuple[Path, str]:
    """(folder holding the tags, tag) for a checkpoint folder or a tag folder."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{p}: no such checkpoint folder")
    if tag is None and (p / "latest").is_file():
        tag = (p / "latest").read_text().strip()
    elif tag is None and (any(p.glob("*model_states.pt")) or p.name.startswith(PREFIX)):
        return p.parent, p.name
    elif tag is None and complete_checkpoints(p):  # albert-pretrain writes `latest` after the first save
        tag = complete_checkpoints(p)[-1].name
    elif tag is None:
        hint = f"; its checkpoints are in {p / 'checkpoints'}" if (p / "checkpoints").is_dir() else ""
        raise ValueError(f"{p}: not a DeepSpeed checkpoint (no 'latest' file and no *model_states.pt){hint}")
    if not (p / tag).is_dir():
        raise ValueError(f"{p / tag}: no such checkpoint tag folder{_other_tags(p, tag)}")
    return p, tag


def _other_tags(root: Path, tag: str) -> str:
    """A hint naming the complete checkpoints of `root` other than `tag`."""
    others = [p.name for p in complete_checkpoints(root) if p.name != tag]
    if not others:
        return f"; there is no other complete checkpoint in {root}"
    return f"; export another: complete checkpoints there are {', '.join(others[-3:])} (--tag)"


def consolidate(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint of any ZeRO stage, loaded on CPU."""
    tag_dir = root / tag
    zero_partitions = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))  # bf16_zero_pp_rank_... too
    if zero_partitions:  # ZeRO 1-3: the fp32 master weights are spread over the optimizer partitions
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # unpickling the optimizer files imports deepspeed
        first = _load_optim_states(zero_partitions[0])
        if ZERO_STAGE not in first and FP32_PARTITIONS in first:
            sd = _consolidate_bf16_optimizer(tag_dir, zero_partitions, first)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:  # ZeRO 0: the whole module is in one file (DeepSpeed pickles more than tensors there)
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = states["module"]
        if any(t.dtype != torch.float32 for t in sd.values()):
            log.warning("%s: weights are stored as %s, exported as float32", tag_dir, next(iter(sd.values())).dtype)
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return {k: v.float() for k, v in sd.items()}


# DeepSpeed's BF16_Optimizer (what the engine uses for bf16 at ZeRO-1 when "data_types" sets grad_accum_dtype fp32,
# as the shipped GPU config does) saves optimizer files without the "zero_stage" key, and DeepSpeed 0.19.8's
# zero_to_fp32 refuses them ("... is not a zero checkpoint"). Their layout is ZeRO-1's, so we read it ourselves:
# each param group's parameters, in param_shapes' order, concatenated into one flat buffer, padded at its end to a
# multiple of 2 x world size and split evenly over the ranks; rank r's fp32 copy of its piece is
# single_partition_of_fp32_groups[group] in bf16_zero_pp_rank_<r>_mp_rank_00_optim_states.pt.
ZERO_STAGE = "zero_stage"
FP32_PARTITIONS = "single_partition_of_fp32_groups"
BF16_OPTIM_FILE = re.compile(r"bf16_zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def _load_optim_states(path: Path) -> dict:
    """The optimizer_state_dict of one rank's optimizer file (mmap: only the tensors read are paged in)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]


def _consolidate_bf16_optimizer(tag_dir: Path, files: list[Path], first: dict) -> dict[str, torch.Tensor]:
    ranks = {}
    for f in files:
        m = BF16_OPTIM_FILE.fullmatch(f.name)
        if m is None or m.group(2) != "00":
            raise ValueError(
                f"{f}: not a BF16_Optimizer partition of model-parallel rank 00 (tensor parallelism is not supported)"
            )
        ranks[int(m.group(1))] = f
    world = len(ranks)
    if sorted(ranks) != list(range(world)):
        raise ValueError(f"{tag_dir}: optimizer files of ranks {sorted(ranks)}, expected ranks 0..{world - 1}")
    states = [first if ranks[r] == files[0] else _load_optim_states(ranks[r]) for r in range(world)]
    for r, osd in enumerate(states):
        counts = osd.get("partition_count")
        if FP32_PARTITIONS not in osd or not counts or any(count != world for count in counts):
            raise ValueError(
                f"{ranks[r]}: written as one of {counts} partitions, but {tag_dir} holds {world} optimizer files"
            )
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    model_states = torch.load(model_file, map_location="cpu", weights_only=False)
    group_shapes = model_states.get("param_shapes")
    if not group_shapes or any(len(osd[FP32_PARTITIONS]) != len(group_shapes) for osd in states):
        raise ValueError(
            f"{model_file}: param_shapes has {len(group_shapes or [])} parameter groups, the optimizer files "
            f"{[len(osd[FP32_PARTITIONS]) for osd in states]}"
        )
    align = 2 * world
    paddings = states[-1].get("group_paddings") or [None] * len(group_shapes)  # the last rank holds the padding
    sd = {}
    for g, shapes in enumerate(group_shapes):
        parts = [osd[FP32_PARTITIONS][g] for osd in states]
        for r, part in enumerate(parts):
            if part.dtype != torch.float32 or part.numel() != parts[0].numel():
                raise ValueError(
                    f"{ranks[r]}: group {g}'s fp32 partition is {part.dtype} x {part.numel()}, rank 0's {parts[0].dtype} x {parts[0].numel()}"
                )
        numel = sum(math.prod(shape) for shape in shapes.values())
        padding = world * parts[0].numel() - numel
        if padding != -numel % align or paddings[g] != padding:
            raise ValueError(
                f"{ranks[world - 1]}: parameter group {g} has {world} partitions of {parts[0].numel()} values "
                f"(padding {paddings[g]}), but its {len(shapes)} parameters in "
                f"{model_file.name} hold {numel}, padded to a multiple of {align}: {numel + (-numel % align)}"
            )
        flat = torch.cat(parts)
        offset = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            sd[name] = flat.narrow(0, offset, n).view(shape)
            offset += n
    names = set(model_states["buffer_names"])
    sd.update((k, v) for k, v in model_states["module"].items() if k in names)
    for name, source in model_states["shared_params"].items():  # tied parameters: saved once
        sd[name] = sd[source]
    return sd


@dataclass(frozen=True)
class Source:
    """The checkpoint tag being exported; `meta` is its complete.json (None for a checkpoint of DeepSpeed alone)."""

    root: Path
    tag: str
    meta: dict[str, Any] | None

    @property
    def tag_dir(self) -> Path:
        return self.root / self.tag

    @property
    def step(self) -> int | None:
        if self.meta and isinstance(self.meta.get("step"), int):
            return self.meta["step"]
        digits = re.search(r"(\d+)$", self.tag)
        return int(digits.group(1)) if digits else None


# One rank's file of a sharded checkpoint: zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt, bf16_ too.
RANK_FILE = re.compile(r"(.*pp_rank_)(\d+)(_mp_rank_\d+_(?:model|optim)_states\.pt)")
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the module (and at ZeRO-0 the optimizer), saved by rank 0


def inspect_checkpoint(path: str | os.PathLike, tag: str | None) -> Source:
    """Refuse, naming it, a tag whose save did not finish or whose files are missing or truncated."""
    root, tag = resolve_checkpoint(path, tag)
    tag_dir = root / tag
    marker = tag_dir / COMPLETE
    ours = tag.startswith(PREFIX) or bool(complete_checkpoints(root))
    meta = None
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text())
        except ValueError as e:
            raise ValueError(f"{marker}: not valid JSON ({e}){_other_tags(root, tag)}") from None
    elif ours:
        raise ValueError(
            f"{tag_dir}: no {COMPLETE}, so its save did not finish (albert-pretrain writes it last)"
            f"{_other_tags(root, tag)}"
        )
    else:
        log.warning(
            "%s: no %s (not written by albert-pretrain): whether every rank saved its files cannot be checked",
            tag_dir,
            COMPLETE,
        )
    check_tag_files(tag_dir, meta, _other_tags(root, tag))
    if problems := damage(tag_dir):  # a checkpoint that lists its files (format 3 on): sizes and sha256s
        raise ValueError(f"{tag_dir}: damaged since it was saved ({'; '.join(problems[:3])}){_other_tags(root, tag)}")
    return Source(root, tag, meta)


def check_tag_files(tag_dir: Path, meta: dict[str, Any] | None, hint: str = "") -> None:
    """Every rank's model and optimizer files that the save recorded in `meta` are there, and none is truncated."""
    world, stage = (meta.get("world_size"), meta.get("zero_stage")) if meta else (None, None)
    families: dict[tuple[str, str], set[int]] = {}
    for path in tag_dir.iterdir():
        if m := RANK_FILE.fullmatch(path.name):
            families.setdefault((m.group(1), m.group(3)), set()).add(int(m.group(2)))
    for (before, after), ranks in sorted(families.items()):
        expected = set(range(world if isinstance(world, int) else max(ranks) + 1))
        if missing := sorted(expected - ranks):
            names = ", ".join(f"{before}{r}{after}" for r in missing[:3])
            raise ValueError(f"{tag_dir}: {names} missing (it was saved by {len(expected)} ranks){hint}")
    required = []
    if isinstance(stage, int) and stage >= 1 and not any(after.endswith("optim_states.pt") for _, after in families):
        required.append(f"the ZeRO-{stage} optimizer partitions (*_optim_states.pt) of {world} rank(s)")
    if stage == 3:
        if not any(after.endswith("model_states.pt") for _, after in families):
            required.append(f"the ZeRO-3 model states (zero_pp_rank_*_model_states.pt) of {world} rank(s)")
    elif stage is not None and not (tag_dir / MODEL_STATES).is_file():
        required.append(MODEL_STATES)
    elif not any(tag_dir.glob("*model_states.pt")):
        required.append("*model_states.pt")
    if required:
        raise ValueError(f"{tag_dir}: {'; '.join(required)} missing{hint}")
    for path in sorted(tag_dir.glob("*_states.pt")):
        check_not_truncated(path, hint)


def check_not_truncated(path: Path, hint: str = "") -> None:
    """torch.save writes a zip archive whose directory is at its end: a truncated file has none. (Files of the
    older, pickle-only format are not checked.)"""
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    size = path.stat().st_size
    if size < 2:
        raise ValueError(f"{path}: empty or truncated ({size} bytes){hint}")
    if not is_zip:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: truncated or damaged ({size} bytes: {e}){hint}") from None


def recorded_model_config(source: Source) -> tuple[dict[str, Any] | None, str]:
    """The model config the checkpoint was saved with, normalised, and where it was read."""
    if source.meta and isinstance(source.meta.get("model_config"), dict):
        where = str(source.tag_dir / COMPLETE)
        return AlbertConfig.from_dict(source.meta["model_config"], source=where).to_dict(), where
    for candidate in (source.tag_dir / "model_config.json", source.root / "model_config.json"):
        if candidate.is_file():
            return AlbertConfig.from_json(candidate).to_dict(), str(candidate)
    return None, ""


def choose_model_config(source: Source, given: str | None) -> AlbertConfig:
    """The checkpoint's own config; `given` (--model-config) only where it is that config, up to the keys a resumed
    run may change (pipeline.checkpoint.TRAINING_ONLY), which it then sets."""
    recorded, where = recorded_model_config(source)
    if given is None:
        if recorded is None:
            raise ValueError(
                f"{source.root}: no model_config.json next to the checkpoint tags; pass --model-config FILE"
            )
        return AlbertConfig.from_dict(recorded, source=where)
    config = AlbertConfig.from_name_or_path(given)
    if recorded is None:
        return config
    ours = config.to_dict()
    differ = sorted(k for k in (set(recorded) | set(ours)) if recorded.get(k) != ours.get(k))
    shaping = [k for k in differ if k not in TRAINING_ONLY]
    if shaping:
        more = f" (and {len(shaping) - 4} more)" if len(shaping) > 4 else ""
        ours_text = ", ".join(f"{k} {ours.get(k)}" for k in shaping[:4]) + more
        theirs_text = ", ".join(f"{k} {recorded.get(k)}" for k in shaping[:4]) + more
        raise ValueError(
            f"--model-config {given}: {ours_text}, but {source.tag_dir} was trained with {theirs_text} (recorded in "
            f"{where}); leave out --model-config to export with the checkpoint's own config"
        )
    if differ:
        log.info("--model-config %s sets %s (the checkpoint's config otherwise)", given, ", ".join(differ))
    return config


@dataclass(frozen=True)
class Vocabulary:
    path: Path
    sha256: str
    pieces: int
    verified_against: str | None  # where the sha256 it matched was recorded; None when nothing recorded one


def recorded_vocab_sha256(source: Source) -> tuple[str | None, str]:
    """The sha256 of the vocabulary the checkpoint was trained with: its metadata's vocab_sha256, else that of the
    training data's manifest.json (when the data folder is still where the run read it)."""
    meta = source.meta or {}
    if isinstance(meta.get("vocab_sha256"), str):
        return meta["vocab_sha256"], str(source.tag_dir / COMPLETE)
    if isinstance(meta.get("data"), str):
        manifest = Path(meta["data"]) / "manifest.json"
        try:
            digest = json.loads(manifest.read_text()).get("attributes", {}).get("vocab_sha256")
        except (OSError, ValueError, AttributeError):
            return None, ""
        if isinstance(digest, str):
            return digest, str(manifest)
    return None, ""


def check_vocabulary(spm_model: str, config: AlbertConfig, source: Source) -> Vocabulary:
    """Refuse a SentencePiece model that is not the one the checkpoint was trained with, as far as can be told."""
    import sentencepiece as spm

    path = Path(spm_model)
    if not path.is_file():
        raise ValueError(f"--spm-model {path}: no such file")
    try:
        pieces = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise ValueError(f"--spm-model {path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    data = (source.meta or {}).get("data")
    fix = f"pass {Path(data) / 'spiece.model'}" if data else "pass the vocabulary its training data was made with"
    if pieces != config.vocab_size:
        raise ValueError(
            f"--spm-model {path}: {pieces} pieces, but the model of {source.tag_dir} has vocab_size "
            f"{config.vocab_size}; {fix}"
        )
    digest = file_sha256(path)
    expected, where = recorded_vocab_sha256(source)
    if expected is not None and digest != expected:
        raise ValueError(
            f"--spm-model {path}: sha256 {digest[:16]}..., but {source.tag_dir} was trained with the vocabulary "
            f"{expected[:16]}... (recorded in {where}); {fix}"
        )
    if expected is None:
        log.info("%s records no vocabulary sha256: only the piece count of %s was checked", source.tag_dir, path)
    check_spm_model(path, config)  # the special pieces AlbertTokenizer expects
    return Vocabulary(path, digest, pieces, where or None)


def provenance(args: argparse.Namespace, argv: list[str], source: Source, config: AlbertConfig, vocab) -> dict:
    """What export.json records besides the files' hashes."""
    return {
        "written": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "command": shlex.join(["albert-export", *argv]),
        "checkpoint": {
            "folder": str(source.root.resolve()),
            "tag": source.tag,
            "step": source.step,
            "complete_marker": source.meta is not None,
            "metadata": source.meta,
        },
        "model_config": config.to_dict(),
        "model_config_from": args.model_config or "the checkpoint",
        "vocabulary": None
        if vocab is None
        else {
            "source": str(vocab.path.resolve()),
            "sha256": vocab.sha256,
            "pieces": vocab.pieces,
            "verified_against": vocab.verified_against,
        },
        "do_lower_case": not args.cased,
    }


# What a damaged checkpoint file raises while it is unpickled, past the checks above.
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError)


def export(args: argparse.Namespace, argv: list[str]) -> None:
    source = inspect_checkpoint(args.checkpoint, args.tag)
    config = choose_model_config(source, args.model_config)
    vocab = check_vocabulary(args.spm_model, config, source) if args.spm_model else None
    out = Path(args.output)
    output.check_output(out, args.overwrite)
    log.info("consolidating %s", source.tag_dir)
    try:
        state_dict = consolidate(source.root, source.tag)
    except UNREADABLE as e:
        log.debug("consolidating %s", source.tag_dir, exc_info=True)
        raise ValueError(f"{source.tag_dir}: cannot be read ({str(e).splitlines()[0]})") from None
    check_state_dict(state_dict, config, source=str(source.tag_dir))
    # Nothing is written before this point. The lock (a file beside the output) keeps a second export out of the
    # same output until this one has finished; under it, what a killed export left can be removed safely.
    lock = OutputLock(out.parent, output.lock_name(out), label=str(out))
    try:
        lock.acquire()
    except LockUnsupported as e:
        log.warning("%s; exporting without the lock that keeps two exports out of %s", e, out)
    try:
        if lock.held:
            output.remove_leftovers(out)
        output.check_output(out, args.overwrite)  # again: another export may have finished meanwhile
        tmp = output.temporary_folder(out)
        try:
            export_hf(state_dict, config, tmp, spm_model=vocab.path if vocab else None, do_lower_case=not args.cased)
            record = output.write_record(tmp, provenance(args, argv, source, config, vocab))
            replaces = output.check_output(out, args.overwrite)  # the earlier export may have been edited meanwhile
            output.swap_into_place(tmp, out, replaces)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    log.info("exported %s (step %s) to %s: %s", source.tag_dir, source.step, out, ", ".join(record["files"]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="albert-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="DeepSpeed checkpoint folder (holding 'latest') or a tag folder")
    p.add_argument("--output", required=True, help="folder to write the Hugging Face model into (new or empty)")
    p.add_argument("--spm-model", help="SentencePiece model of the training data, for the tokenizer files")
    p.add_argument(
        "--model-config",
        help="model config, a JSON file or a shipped name (albert-base, ...); must be the checkpoint's own, up to "
        "dropout and initializer_range (default: the config the checkpoint recorded)",
    )
    p.add_argument("--tag", help="checkpoint tag to export (default: the one in 'latest')")
    p.add_argument(
        "--cased", action="store_true", help="tokenizer does not lowercase (the vocabulary was trained cased)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --output (only one whose files are unchanged; never another folder)",
    )
    args = p.parse_args(argv)
    setup_logging()
    try:
        export(args, argv)
    except (ValueError, OSError, OutputInUse) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
