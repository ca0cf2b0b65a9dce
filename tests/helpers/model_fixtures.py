"""Helpers shared by the model tests: small configs, batches, tiny exported models and DeepSpeed subprocesses.

DeepSpeed runs in a fresh subprocess (single-process gloo group) so that its global state
(process group, ZeRO hooks, accelerator) never leaks into the test session.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.distributed import free_port
from pipeline.model import AlbertConfig

REPO = Path(__file__).resolve().parents[2]


def export_tiny_albert(folder: Path, text: list[str], vocab_size: int) -> Path:
    """A tiny random AlbertForPreTraining with a SentencePiece model trained on `text`, exported as albert-export
    does into folder/hf (without export.json); returns that folder."""
    from data_prep.vocab import VocabSettings, train_vocab
    from pipeline.hf import export_hf
    from pipeline.model import AlbertForPreTraining

    spm = train_vocab(text, folder / "vocab" / "spiece", VocabSettings(vocab_size=vocab_size, seed=1))
    cfg = AlbertConfig(
        vocab_size=vocab_size,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    export_hf(AlbertForPreTraining(cfg), cfg, folder / "hf", spm_model=spm)
    return folder / "hf"


def small_config(**overrides) -> AlbertConfig:
    """A model small enough for many forward/backward passes per second."""
    base = dict(
        vocab_size=300,
        embedding_size=16,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return AlbertConfig(**{**base, **overrides})


def make_batch(
    cfg: AlbertConfig, batch: int = 4, seq: int = 24, predictions: int = 6, seed: int = 0, max_id: int | None = None
) -> dict[str, torch.Tensor]:
    """A batch in the HDF5 shard convention, with padded sequences and padded prediction slots."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    lengths[0] = seq  # one full row, the others padded
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, max_id or cfg.vocab_size, (batch, seq), generator=g) * mask
    ids[:, 0] = 2  # [CLS]
    segments = (torch.arange(seq)[None, :] >= (lengths[:, None] // 2)).long() * mask
    positions = torch.zeros(batch, predictions, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(1, predictions + 1, (), generator=g))  # the rest are padding slots
        positions[b, :n] = (torch.randperm(int(lengths[b]) - 1, generator=g)[:n] + 1).sort().values
    labels = torch.randint(5, max_id or cfg.vocab_size, (batch, predictions), generator=g) * (positions > 0)
    return {
        "input_ids": ids,
        "input_mask": mask,
        "segment_ids": segments,
        "masked_lm_positions": positions,
        "masked_lm_ids": labels,
        "next_sentence_labels": torch.randint(0, 2, (batch,), generator=g),
    }


def perturb_(model: torch.nn.Module, std: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter so biases and LayerNorms are non-trivial in comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def run_python(
    args: list[str], timeout: float = 120, distributed: bool = False, pythonpath: str | None = None
) -> subprocess.CompletedProcess:
    """Run `python ARGS` from the repo root; with `distributed`, as rank 0 of a 1-process group;
    `pythonpath` (relative to the repo) is put first on the module search path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / pythonpath), env.get("PYTHONPATH")]))
    if distributed:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"python {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}"
    return proc
