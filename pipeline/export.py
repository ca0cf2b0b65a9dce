"""albert-export: a DeepSpeed checkpoint of our model -> a Hugging Face ALBERT folder.

    albert-export --checkpoint runs/demo/checkpoints --output runs/demo/hf --spm-model runs/demo/spm.model
    python -m pipeline.export --checkpoint runs/demo/checkpoints/global_step1000 --output hf/

`--checkpoint` is the folder given to `engine.save_checkpoint` (it holds `latest` and one folder
per tag) or one tag folder. Any ZeRO stage (0-3) is consolidated in this one plain process, on
CPU, without a process group: stages 1-3 through DeepSpeed's zero_to_fp32 (the fp32 master
weights), stage 0 from `mp_rank_00_model_states.pt`, and checkpoints of DeepSpeed's BF16_Optimizer
(bf16 at ZeRO-1 with `"data_types": {"grad_accum_dtype": "fp32"}`) by our own reader of their
fp32 partitions, which zero_to_fp32 refuses.

Contract with the training engine: it saves the model's AlbertConfig (`AlbertConfig.to_json`) as
`<checkpoint folder>/model_config.json`, next to the tag folders (a copy inside the tag folder
is also accepted). `--model-config FILE` overrides it.
"""

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path

import torch

from common.logs import setup_logging

from .hf import check_state_dict, export_hf
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
    elif tag is None and any(p.glob("*model_states.pt")):
        return p.parent, p.name
    elif tag is None:
        raise ValueError(f"{p}: not a DeepSpeed checkpoint (no 'latest' file and no *model_states.pt)")
    if not any((p / tag).glob("*model_states.pt")):
        raise ValueError(f"{p / tag}: no *model_states.pt in this checkpoint tag folder")
    return p, tag


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


def find_model_config(root: Path, tag: str, model_config: str | None) -> AlbertConfig:
    if model_config is not None:
        return AlbertConfig.from_json(model_config)
    for candidate in (root / "model_config.json", root / tag / "model_config.json"):
        if candidate.is_file():
            return AlbertConfig.from_json(candidate)
    raise ValueError(f"{root}: no model_config.json next to the checkpoint tags; pass --model-config FILE")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="albert-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="DeepSpeed checkpoint folder (holding 'latest') or a tag folder")
    p.add_argument("--output", required=True, help="folder to write the Hugging Face model into")
    p.add_argument("--spm-model", help="SentencePiece model of the training data, for the tokenizer files")
    p.add_argument("--model-config", help="model config JSON (default: model_config.json next to the tags)")
    p.add_argument("--tag", help="checkpoint tag to export (default: the one in 'latest')")
    p.add_argument(
        "--cased", action="store_true", help="tokenizer does not lowercase (the vocabulary was trained cased)"
    )
    args = p.parse_args(argv)
    setup_logging()
    try:
        root, tag = resolve_checkpoint(args.checkpoint, args.tag)
        config = find_model_config(root, tag, args.model_config)
        log.info("consolidating %s", root / tag)
        state_dict = consolidate(root, tag)
        check_state_dict(state_dict, config, source=str(root / tag))
        export_hf(state_dict, config, args.output, spm_model=args.spm_model, do_lower_case=not args.cased)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
