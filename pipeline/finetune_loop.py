"""The fine-tuning of `albert-finetune`: an ALBERT folder as transformers' AlbertForSequenceClassification and
its SentencePiece tokenizer, token ids, batches, the training loop and predictions, and its progress display.

Both models of the probe are built by `new_model` under the run's seed: the classification head (and anything the
folder lacks) is initialised identically, and the pretrained one then takes the folder's weights.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from .labelled import LabelledSet

log = logging.getLogger("albert-finetune")

PRETRAINED, RANDOM_INIT = "pretrained", "random-init"
HEAD_KEYS = ("classifier.weight", "classifier.bias")
DEFAULT_MAX_SEQ_LENGTH = 128
PROGRESS_INTERVAL_S = 30.0  # log lines when stderr is not a terminal


class ModelFolderError(ValueError):
    """An ALBERT folder that cannot be used; the message names the folder and the problem."""


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning hyperparameters, the same for every model, fold and seed."""

    epochs: int = 3
    lr: float = 3e-5
    batch_size: int = 32
    max_seq_length: int | None = None  # None: DEFAULT_MAX_SEQ_LENGTH, or the model's positions if fewer
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0


@dataclass
class Encoded:
    """A labelled set as token ids: [CLS] text [SEP] (pair [SEP]), unpadded."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    truncated: int


@dataclass
class AlbertFolder:
    """What the probe takes from an ALBERT folder, loaded once for all runs."""

    path: Path
    tokenizer: Any  # transformers' tokenizer of the folder
    config: Any  # transformers.AlbertConfig with the task's labels
    encoder_state: dict[str, torch.Tensor]  # the folder's weights, without the new classification head


def load_albert_folder(folder: Path, classes: list[str], max_seq_length: int | None = None) -> AlbertFolder:
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such folder")
    for name, what in (("config.json", "model config"), ("spiece.model", "SentencePiece model of the tokenizer")):
        if not (folder / name).is_file():
            hint = " (albert-export writes it when given --spm-model)" if name == "spiece.model" else ""
            raise ModelFolderError(f"{folder}: no {name}, the {what}{hint}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the Hub
    from transformers import AlbertForSequenceClassification, AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        config = AutoConfig.from_pretrained(
            folder,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
        )
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder}: config.json cannot be read ({_first_line(e)})") from None
    if config.model_type != "albert":
        raise ModelFolderError(f"{folder}: config.json describes a {config.model_type!r} model, not ALBERT")
    if max_seq_length is not None and max_seq_length > config.max_position_embeddings:
        raise ModelFolderError(
            f"{folder}: --max-seq-length {max_seq_length} exceeds the model's {config.max_position_embeddings} positions"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise ModelFolderError(f"{folder}: the tokenizer cannot be loaded ({_first_line(e)})") from None
    if len(tokenizer) > config.vocab_size:
        raise ModelFolderError(f"{folder}: the tokenizer has {len(tokenizer)} pieces, the model {config.vocab_size}")
    # transformers' own load report would list the pretraining heads left out; the check below says what matters.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # A folder fine-tuned for another number of classes: its head is not used anyway.
        model, info = cast(
            tuple[Any, dict[str, Any]],
            AlbertForSequenceClassification.from_pretrained(
                folder, config=config, output_loading_info=True, ignore_mismatched_sizes=True
            ),
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"{folder}: the weights cannot be loaded ({_first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    missing = set(info["missing_keys"]) - set(HEAD_KEYS)
    if missing - {k for k in missing if k.startswith("albert.pooler.")}:
        raise ModelFolderError(f"{folder}: no weights for {', '.join(sorted(missing)[:5])}; not an ALBERT checkpoint")
    if missing:
        log.warning("%s: no pooler weights; the pooler starts from random initialisation too", folder)
    mismatched = {m[0] if isinstance(m, tuple | list) else m for m in info.get("mismatched_keys") or ()}
    if mismatched - set(HEAD_KEYS):
        raise ModelFolderError(f"{folder}: weights of the wrong shape: {', '.join(sorted(mismatched)[:5])}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in set(HEAD_KEYS) | missing}
    return AlbertFolder(folder, tokenizer, config, state)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def new_model(folder: AlbertFolder, kind: str, seed: int):
    """AlbertForSequenceClassification with the folder's weights (pretrained) or none (random-init); the head and
    everything not loaded are initialised from `seed`, identically for both kinds."""
    from transformers import AlbertForSequenceClassification

    torch.manual_seed(seed)
    model = AlbertForSequenceClassification(folder.config)
    if kind == PRETRAINED:
        missing, unexpected = model.load_state_dict(folder.encoder_state, strict=False)
        if unexpected or not set(missing) <= set(HEAD_KEYS) | {k for k in missing if k.startswith("albert.pooler.")}:
            raise RuntimeError(f"loading the encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


# ---------------------------------------------------------------------------------------------------------------
# Tokens, batches, training and prediction


def encode(tokenizer, data: LabelledSet, max_seq_length: int) -> Encoded:
    """[CLS] text [SEP] (pair [SEP]) ids and segment ids, truncated to max_seq_length (longest text first)."""
    pairs = data.pairs
    full = tokenizer(data.texts, pairs, add_special_tokens=True)["input_ids"]
    truncated = sum(len(ids) > max_seq_length for ids in full)
    enc = tokenizer(data.texts, pairs, truncation=True, max_length=max_seq_length, return_token_type_ids=True)
    return Encoded(enc["input_ids"], enc["token_type_ids"], truncated)


def collate(enc: Encoded, idx, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    rows = [enc.input_ids[i] for i in idx]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for j, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[j, :n] = torch.tensor(enc.input_ids[i])
        types[j, :n] = torch.tensor(enc.token_type_ids[i])
        mask[j, :n] = 1
    return {"input_ids": ids.to(device), "token_type_ids": types.to(device), "attention_mask": mask.to(device)}


def steps_per_run(n_train: int, settings: FinetuneSettings) -> int:
    return settings.epochs * math.ceil(n_train / settings.batch_size)


def train(
    model,
    enc: Encoded,
    y: np.ndarray,
    idx: np.ndarray,
    settings: FinetuneSettings,
    seed: int,
    pad_id: int,
    device,
    progress,
):
    """Fine-tune in place; returns the mean training loss of the last epoch."""
    from transformers import get_linear_schedule_with_warmup

    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    total = steps_per_run(len(idx), settings)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(y)
    model.to(device).train()
    epoch_loss = math.nan
    for _ in range(settings.epochs):
        order = idx[torch.randperm(len(idx), generator=generator).numpy()]
        losses = []
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            out = model(**collate(enc, batch, pad_id, device), labels=labels[torch.as_tensor(batch)].to(device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            progress.step(losses[-1])
        epoch_loss = float(np.mean(losses))
    return epoch_loss


@torch.inference_mode()
def predict(model, enc: Encoded, idx: np.ndarray, batch_size: int, pad_id: int, device) -> np.ndarray:
    """Class probabilities (len(idx) x classes), float64."""
    model.to(device).eval()
    out = []
    for start in range(0, len(idx), batch_size):
        logits = model(**collate(enc, idx[start : start + batch_size], pad_id, device)).logits
        out.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
    return np.concatenate(out)


class Progress:
    """A tqdm bar over all optimizer steps on a terminal; a log line every PROGRESS_INTERVAL_S seconds otherwise."""

    def __init__(self, total: int, interval_s: float = PROGRESS_INTERVAL_S):
        self.total, self.done, self.interval_s, self.what = total, 0, interval_s, ""
        self.start = self.last = time.monotonic()
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="step", desc="fine-tuning", dynamic_ncols=True) if tty else None

    def run(self, what: str) -> None:
        self.what = what
        if self.bar is not None:
            self.bar.set_description(what)

    def step(self, loss: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            elapsed = now - self.start
            log.info(
                "step %d/%d (%.0f%%) %s: loss %.4f; %.0f s elapsed, about %.0f s left",
                self.done,
                self.total,
                100 * self.done / self.total,
                self.what,
                loss,
                elapsed,
                elapsed * (self.total - self.done) / self.done,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def logging(self):
        """Route log lines around the bar while it is shown."""
        if self.bar is None:
            return nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()
