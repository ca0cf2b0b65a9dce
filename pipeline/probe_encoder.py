"""The frozen encoders `albert-probe` compares, and the representations it takes from them.

Both are transformers' AlbertModel of the folder's config: the pretrained one with the folder's weights, the other
as `albert-finetune` builds its random-init baseline (the same architecture, initialised under the run's seed by
transformers' own initialisation). A text is encoded as `[CLS] pieces [SEP]` (the folder's tokenizer, which
lower-cases where the model was trained on lower-cased text) and represented by the mean of the encoder's last
hidden states over its pieces, [CLS] and [SEP] left out: for a word, the pieces of that one word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .finetune import check_vocabulary_size
from .finetune_loop import PRETRAINED, RANDOM_INIT, AlbertFolder, load_albert_folder, new_model

KINDS = (PRETRAINED, RANDOM_INIT)


@dataclass
class Encoders:
    folder: AlbertFolder
    models: dict[str, Any]  # kind -> transformers' AlbertModel, in eval mode on `device`
    device: torch.device

    @property
    def tokenizer(self) -> Any:
        return self.folder.tokenizer


def load_encoders(path: Path, seed: int, device: torch.device, max_seq_length: int | None = None) -> Encoders:
    """The folder's encoder and a random one of the same architecture (seeded); ModelFolderError for a folder
    that is not a usable ALBERT export."""
    folder = load_albert_folder(path, ["0", "1"], max_seq_length)  # the classification head is not used
    check_vocabulary_size(folder)
    models = {kind: new_model(folder, kind, seed).albert.to(device).eval() for kind in KINDS}
    return Encoders(folder, models, device)


@dataclass(frozen=True)
class Pieces:
    """Texts as `[CLS] pieces [SEP]` ids, truncated to the maximum length."""

    input_ids: list[list[int]]
    truncated: int  # texts that lost pieces to the maximum length


def encode_texts(tokenizer: Any, texts: list[str], max_seq_length: int) -> Pieces:
    full = tokenizer(texts, add_special_tokens=True)["input_ids"]
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_seq_length)["input_ids"]
    return Pieces(ids, sum(len(f) > max_seq_length for f in full))


def word_pieces(tokenizer: Any, word: str) -> list[int]:
    """The piece ids of one word, without [CLS] and [SEP]."""
    return list(tokenizer(word, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def mean_pooled(model: Any, pieces: Pieces, pad_id: int, device: torch.device, batch_size: int = 32) -> np.ndarray:
    """texts x hidden (float64): the mean of the last hidden states over each text's pieces, between [CLS] and
    [SEP]. Texts are batched by length, so padding is little and does not change the result (it is masked)."""
    rows = pieces.input_ids
    if any(len(r) < 3 for r in rows):
        raise ValueError("a text without pieces has no representation")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = np.empty((len(rows), model.config.hidden_size), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        length = max(len(rows[i]) for i in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        pooled = torch.zeros((len(batch), length), dtype=torch.float32)
        for j, i in enumerate(batch):
            n = len(rows[i])
            ids[j, :n] = torch.tensor(rows[i])
            attention[j, :n] = 1
            pooled[j, 1 : n - 1] = 1.0 / (n - 2)  # the pieces, not [CLS] and [SEP]
        hidden = model(input_ids=ids.to(device), attention_mask=attention.to(device)).last_hidden_state
        means = torch.einsum("bld,bl->bd", hidden.float(), pooled.to(device))
        out[batch] = means.double().cpu().numpy()
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of a with the same row of b."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, np.finfo(np.float64).tiny)
