"""albert-export: a DeepSpeed checkpoint of our model -> a Hugging Face ALBERT folder.

    albert-export --checkpoint runs/demo/checkpoints --output runs/demo/hf --spm-model runs/demo/spm.model
    python -m pipeline.export --checkpoint runs/demo/checkpoints/global_step1000 --output hf/

`--checkpoint` is the folder given to `engine.save_checkpoint` (it holds `latest` and one folder
per tag) or one tag folder. Any ZeRO stage (0-3) is consolidated in this one plain process, on
CPU, without a process group: stages 1-3 through DeepSpeed's zero_to_fp32 (the fp32 master
weights), stage 0 from `mp_rank_00_model_states.pt`.

Contract with the training engine: it saves the model's AlbertConfig (`AlbertConfig.to_json`) as
`<checkpoint folder>/model_config.json`, next to the tag folders (a copy inside the tag folder
is also accepted). `--model-config FILE` overrides it.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

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
    zero_partitions = list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))  # bf16_zero_pp_rank_... too
    if zero_partitions:  # ZeRO 1-3: the fp32 master weights are spread over the optimizer partitions
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:  # ZeRO 0: the whole module is in one file (DeepSpeed pickles more than tensors there)
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = states["module"]
        if any(t.dtype != torch.float32 for t in sd.values()):
            log.warning("%s: weights are stored as %s, exported as float32", tag_dir, next(iter(sd.values())).dtype)
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return {k: v.float() for k, v in sd.items()}


def find_model_config(root: Path, tag: str, model_config: str | None) -> AlbertConfig:
    if model_config is not None:
        return AlbertConfig.from_json(model_config)
    for candidate in (root / "model_config.json", root / tag / "model_config.json"):
        if candidate.is_file():
            return AlbertConfig.from_json(candidate)
    raise ValueError(f"{root}: no model_config.json next to the checkpoint tags; pass --model-config FILE")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albert-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DeepSpeed checkpoint folder (holding 'latest') or a tag folder")
    p.add_argument("--output", required=True, help="folder to write the Hugging Face model into")
    p.add_argument("--spm-model", help="SentencePiece model of the training data, for the tokenizer files")
    p.add_argument("--model-config", help="model config JSON (default: model_config.json next to the tags)")
    p.add_argument("--tag", help="checkpoint tag to export (default: the one in 'latest')")
    p.add_argument("--cased", action="store_true", help="tokenizer does not lowercase (the vocabulary was trained cased)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
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
