"""Hugging Face interop: our AlbertForPreTraining <-> transformers' AlbertForPreTraining folder.

`export_hf` writes config.json, model.safetensors (HF parameter names; the tied decoder is left
out, as transformers saves it) and, given the SentencePiece model, spiece.model plus the
tokenizer files AlbertTokenizer reads. `load_hf` reads such a folder back into our model, e.g.
to continue pretraining from a released ALBERT. transformers itself is not needed for either.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.atomic import atomic_path

from .model import AlbertConfig, AlbertForPreTraining

log = logging.getLogger(__name__)

# Our name prefix -> HF name prefix, first match wins (layers are handled by LAYER_NAMES).
PREFIXES = [
    ("embeddings.norm.", "albert.embeddings.LayerNorm."),
    ("embeddings.", "albert.embeddings."),
    ("embedding_projection.", "albert.encoder.embedding_hidden_mapping_in."),
    ("pooler.", "albert.pooler."),
    ("sop_classifier.", "sop_classifier.classifier."),
    ("mlm_dense.", "predictions.dense."),
    ("mlm_norm.", "predictions.LayerNorm."),
    ("mlm_bias", "predictions.bias"),
]
LAYER_NAMES = {
    "query": "attention.query",
    "attention_dense": "attention.dense",
    "attention_norm": "attention.LayerNorm",
    "ffn": "ffn",
    "ffn_output": "ffn_output",
    "ffn_norm": "full_layer_layer_norm",
}
OUR_LAYER = re.compile(r"groups\.(\d+)\.(\d+)\.(\w+)\.(weight|bias)")
HF_LAYER = re.compile(r"albert\.encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.(.+)\.(weight|bias)")
# In HF checkpoints but not parameters of ours: the tied decoder (= word embeddings and
# predictions.bias) and a position-id buffer older versions saved.
HF_REDUNDANT = {"predictions.decoder.weight", "predictions.decoder.bias", "albert.embeddings.position_ids"}

SPECIAL_PIECES = {0: "<pad>", 1: "<unk>", 2: "[CLS]", 3: "[SEP]", 4: "[MASK]"}
SPECIAL_TOKENS = {
    "bos_token": "[CLS]",
    "eos_token": "[SEP]",
    "unk_token": "<unk>",
    "sep_token": "[SEP]",
    "pad_token": "<pad>",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our parameters to HF's; our fused key_value is split into key and value."""
    out = {}
    for name, t in state_dict.items():
        if m := OUR_LAYER.fullmatch(name):
            g, i, part, kind = m.groups()
            prefix = f"albert.encoder.albert_layer_groups.{g}.albert_layers.{i}."
            if part == "key_value":
                out[f"{prefix}attention.key.{kind}"], out[f"{prefix}attention.value.{kind}"] = t.chunk(2, dim=0)
            elif part in LAYER_NAMES:
                out[f"{prefix}{LAYER_NAMES[part]}.{kind}"] = t
            else:
                raise ValueError(f"unexpected parameter {name!r} in the model state dict")
            continue
        for ours, hf in PREFIXES:
            if name.startswith(ours):
                out[hf + name[len(ours) :]] = t
                break
        else:
            raise ValueError(f"unexpected parameter {name!r} in the model state dict")
    return out


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict`; drops the tied decoder and buffers HF checkpoints may hold."""
    layer_parts = {hf: ours for ours, hf in LAYER_NAMES.items()}
    out, halves = {}, {}
    for name, t in hf_state_dict.items():
        if name in HF_REDUNDANT:
            continue
        if m := HF_LAYER.fullmatch(name):
            g, i, part, kind = m.groups()
            if part in ("attention.key", "attention.value"):
                halves[(g, i, kind, part)] = t
            elif part in layer_parts:
                out[f"groups.{g}.{i}.{layer_parts[part]}.{kind}"] = t
            else:
                raise ValueError(f"unexpected weight {name!r} in the Hugging Face checkpoint")
            continue
        for ours, hf in PREFIXES:
            if name.startswith(hf):
                out[ours + name[len(hf) :]] = t
                break
        else:
            raise ValueError(f"unexpected weight {name!r} in the Hugging Face checkpoint")
    for (g, i, kind, part), t in halves.items():
        if part == "attention.key":
            value = halves.get((g, i, kind, "attention.value"))
            if value is None:
                raise ValueError(f"the Hugging Face checkpoint has a key but no value {kind} in group {g} layer {i}")
            out[f"groups.{g}.{i}.key_value.{kind}"] = torch.cat([t, value], dim=0)
    return out


def check_state_dict(state_dict: dict[str, torch.Tensor], config: AlbertConfig, source: str = "checkpoint") -> None:
    """Refuse a state dict whose names or shapes are not those of `config`'s model."""
    with torch.device("meta"):  # shapes only, nothing allocated
        expected = {k: tuple(v.shape) for k, v in AlbertForPreTraining(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ValueError(
            f"{source}: parameters do not match the model config (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for k, shape in expected.items():
        if got[k] != shape:
            raise ValueError(f"{source}: {k} has shape {list(got[k])} but the model config implies {list(shape)}")


def export_hf(
    state_dict_or_model: dict[str, torch.Tensor] | nn.Module,
    config: AlbertConfig,
    out_dir: str | os.PathLike,
    spm_model: str | os.PathLike | None = None,
    do_lower_case: bool = True,
) -> Path:
    """Write a folder that transformers' AlbertForPreTraining.from_pretrained (and, with
    `spm_model`, AlbertTokenizer.from_pretrained) loads. `do_lower_case` goes to the tokenizer
    config: True (HF's and the released ALBERT's default) when the SentencePiece model was trained
    on lowercased text. Each file is written under a temporary name, then renamed."""
    state_dict = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    check_state_dict(state_dict, config)
    if spm_model is not None:
        check_spm_model(Path(spm_model), config)  # before writing anything
    # safetensors refuses tensors sharing memory (e.g. views of a flat ZeRO buffer): own copies.
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in to_hf_state_dict(state_dict).items()
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config.to_json(out / "config.json")
    if spm_model is not None:
        write_tokenizer(Path(spm_model), config, out, do_lower_case)
    log.info("wrote Hugging Face ALBERT (%d tensors%s) to %s", len(tensors), ", tokenizer" if spm_model else "", out)
    return out


def check_spm_model(spm_model: Path, config: AlbertConfig) -> None:
    """Refuse a SentencePiece model whose special ids are not those AlbertTokenizer expects, or whose piece count is
    not the model's vocab_size."""
    import sentencepiece as spm

    if not spm_model.is_file():
        raise ValueError(f"{spm_model}: no such SentencePiece model file")
    processor = spm.SentencePieceProcessor(model_file=str(spm_model))
    for i, piece in SPECIAL_PIECES.items():
        if processor.get_piece_size() <= i or processor.id_to_piece(i) != piece:
            raise ValueError(
                f"{spm_model}: id {i} must be {piece} for AlbertTokenizer (train with --pad_id=0 --unk_id=1 "
                f"--control_symbols=[CLS],[SEP],[MASK])"
            )
    if processor.get_piece_size() != config.vocab_size:  # ids the model never learned, or embeddings no piece reaches
        raise ValueError(
            f"{spm_model}: {processor.get_piece_size()} pieces but the model's vocab_size is {config.vocab_size}"
        )


def write_tokenizer(spm_model: Path, config: AlbertConfig, out: Path, do_lower_case: bool) -> None:
    """spiece.model, tokenizer_config.json and special_tokens_map.json, as AlbertTokenizer reads them."""
    tokenizer_config = {
        "tokenizer_class": "AlbertTokenizer",
        "do_lower_case": do_lower_case,
        "keep_accents": False,
        "remove_space": True,
        "model_max_length": config.max_position_embeddings,
        **SPECIAL_TOKENS,
    }
    files = {
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(SPECIAL_TOKENS, indent=2) + "\n",
    }
    with atomic_path(out / "spiece.model") as tmp:
        shutil.copyfile(spm_model, tmp)
    for name, text in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)


def load_hf(directory: str | os.PathLike) -> tuple[AlbertConfig, AlbertForPreTraining]:
    """Our config and model from a transformers ALBERT folder (config.json and model.safetensors
    or pytorch_model.bin), e.g. one written by `export_hf` or a released albert-*-v2."""
    folder = Path(directory)
    config = AlbertConfig.from_json(folder / "config.json")
    if (folder / "model.safetensors").is_file():
        hf_state_dict = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        hf_state_dict = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{folder}: no model.safetensors or pytorch_model.bin")
    model = AlbertForPreTraining(config)
    missing, unexpected = model.load_state_dict(from_hf_state_dict(hf_state_dict), strict=False)
    # An AlbertForMaskedLM (or AlbertModel) folder has no SOP head: that one starts fresh.
    fresh = [k for k in missing if k.startswith(("pooler.", "sop_classifier."))]
    if unexpected or len(fresh) < len(missing):
        raise ValueError(
            f"{folder}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if fresh:
        log.warning("%s: no weights for %s; initialised fresh", folder, ", ".join(fresh))
    return config, model
