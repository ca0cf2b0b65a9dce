"""ALBERT for pretraining (MLM + sentence-order prediction), plain PyTorch, no distributed code.

The architecture follows google-research/albert and is weight-compatible with Hugging Face's
`AlbertForPreTraining` (see pipeline/hf.py for the name mapping):

- factorized embeddings: vocab x E tables, LayerNorm, then a dense E -> H projection;
- cross-layer sharing: `num_hidden_groups` groups of `inner_group_num` layers; pass i of
  `num_hidden_layers` runs group int(i / (num_hidden_layers / num_hidden_groups));
- post-LayerNorm blocks, attention through `F.scaled_dot_product_attention` (fused kernels
  where the hardware has them) with a boolean padding mask; on CPU in bf16 an explicit form,
  faster there (see `attention`; `set_attention` forces one; pipeline/fused.py adds torch.compile);
- heads: SOP on the pooled [CLS]; MLM tied to the word embeddings, evaluated only at
  `masked_lm_positions`.

Speed: the heads read only the [CLS] row and the masked rows, so the last encoder layer
computes queries, the attention output and the FFN for those rows only (keys and values
still see every token). Mathematically identical to running the full layer.

Weight initialisation and DeepSpeed ZeRO-3
------------------------------------------
The constructor initialises the weights (`init_weights()`). Under `deepspeed.zero.Init`
the parameters are already partitioned to empty tensors when that runs, so the
initialisation is lost; redo it after construction with the parameters gathered, module
by module (one module's weights in memory at a time):

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AlbertForPreTraining(config)
    for m in model.modules():
        with deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False)), modifier_rank=0):
            init_albert_weights(m, config.initializer_range)

Every rank must run the loop (the gather is collective); rank 0's values are kept.
"""

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.atomic import atomic_path

CONFIG_DIR = Path(__file__).parent / "configs"

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": partial(F.gelu, approximate="tanh"),  # ALBERT's default (tanh approximation)
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),  # same function, HF's other name
    "gelu": F.gelu,
    "relu": F.relu,
}

# Keys Hugging Face writes into an ALBERT config.json that do not change our model (or that we
# check below): accepted and ignored so that a transformers checkpoint's config loads as is.
HF_EXTRA_KEYS = {
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "classifier_dropout_prob",
    "tie_word_embeddings",
    "position_embedding_type",
    "chunk_size_feed_forward",
    "down_scale_factor",
    "gap_size",
    "net_structure_type",
    "num_memory_blocks",
    "layers_to_keep",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "torchscript",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "tokenizer_class",
    "prefix",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "pruned_heads",
    "use_cache",
    "task_specific_params",
    "_attn_implementation",
}
# HF keys that would describe a different model than ours: value they must have if present.
HF_REQUIRED_VALUES = {
    "model_type": "albert",
    "tie_word_embeddings": True,
    "position_embedding_type": "absolute",
    "down_scale_factor": 1,
    "gap_size": 0,
    "net_structure_type": 0,
    "num_memory_blocks": 0,
}


@dataclass
class AlbertConfig:
    """Model hyper-parameters, with Hugging Face's AlbertConfig key names. Defaults: albert-base."""

    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_hidden_groups: int = 1
    inner_group_num: int = 1
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = cast(type, f.type)  # the fields' annotations are classes: no postponed evaluation here
            ok = (isinstance(value, expected) or (expected is float and isinstance(value, int))) and not isinstance(
                value, bool
            )
            if not ok:
                raise ValueError(f"{f.name}: expected {expected.__name__}, got {value!r}")
            if f.type is int and value < 1:
                raise ValueError(f"{f.name}: must be at least 1, got {value}")
            if f.type is float:
                object.__setattr__(self, f.name, float(value))  # JSON may say 0 for 0.0
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_hidden_layers % self.num_hidden_groups:
            raise ValueError(
                f"num_hidden_groups: {self.num_hidden_groups} does not divide num_hidden_layers {self.num_hidden_layers}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act: {self.hidden_act!r} is not supported (choose from {', '.join(ACTIVATIONS)})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        for name in ("layer_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "AlbertConfig":
        """Build from a dict with HF key names; `source` names the origin in error messages."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        ours = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - ours - HF_EXTRA_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} (not an ALBERT config key)")
        for key, expected in HF_REQUIRED_VALUES.items():
            if key in d and d[key] is not None and d[key] != expected:
                raise ValueError(f"{source}: {key}: unsupported value {d[key]!r} (this model needs {expected!r})")
        try:
            return cls(**{k: v for k, v in d.items() if k in ours})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "AlbertConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_name_or_path(cls, name: str | os.PathLike) -> "AlbertConfig":
        """A shipped config by name (albert-tiny, albert-base, ... albert-xxlarge) or a JSON file."""
        path = Path(name)
        if not path.exists():
            path = CONFIG_DIR / f"{name}.json"
        if not path.exists():
            names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
            raise ValueError(f"{name}: no such model config file or shipped config ({names})")
        return cls.from_json(path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict:
        """Our keys plus what transformers needs to build AlbertForPreTraining from config.json."""
        return {
            "architectures": ["AlbertForPreTraining"],
            "model_type": "albert",
            **self.to_dict(),
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "tie_word_embeddings": True,
        }

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the HF-compatible dict (loadable by `from_json` and by transformers), atomically."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


@dataclass
class PreTrainingOutput(dict):
    """Losses are None when their labels were not given; accuracies are detached tensors.

    Also a dict of the same fields (kept in sync both ways): DeepSpeed ZeRO-3 finds the output
    tensors of a module only in tuples, lists and dicts, to hook its backward pass on them."""

    mlm_logits: torch.Tensor  # [batch, predictions, vocab] (predictions = seq len without positions)
    sop_logits: torch.Tensor  # [batch, 2]
    loss: torch.Tensor | None = None  # mlm_loss + sop_loss (the sum of those given)
    mlm_loss: torch.Tensor | None = None  # mean over non-padding predictions
    sop_loss: torch.Tensor | None = None
    mlm_accuracy: torch.Tensor | None = None
    sop_accuracy: torch.Tensor | None = None

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        super().__setitem__(name, value)

    def __setitem__(self, name, value):
        super().__setitem__(name, value)
        super().__setattr__(name, value)


def init_albert_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """ALBERT's initialisation of the parameters `module` owns directly (not its children's):
    weights normal(0, initializer_range), biases 0, LayerNorm scale 1. Call it for every module."""
    with torch.no_grad():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, initializer_range)
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, AlbertForPreTraining):
            module.mlm_bias.zero_()


class Embeddings(nn.Module):
    def __init__(self, cfg: AlbertConfig):
        super().__init__()
        E = cfg.embedding_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, E)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, E)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, E)
        self.norm = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.dropout = cfg.hidden_dropout_prob

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(segment_ids)
            + self.position_embeddings(positions)
        )
        return F.dropout(self.norm(x), self.dropout, self.training)


ATTENTION_IMPLS = ("auto", "sdpa", "math")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, impl: str = "auto"
) -> torch.Tensor:
    """Softmax attention, q [B, nh, R, d], k and v [B, nh, L, d], mask broadcastable to [B, nh, R, L]
    (True = attend) or None (attend everywhere: what makes the flash kernel eligible). "sdpa": PyTorch's fused kernels (flash / memory-efficient on CUDA, the fused
    CPU kernel on CPU); "math": the explicit form (two matmuls and a softmax); "auto": SDPA except
    on CPU in bf16, where the fused kernel's backward takes over twice the time of the explicit
    form at L = 128-512 (torch 2.13, measured)."""
    if impl == "math" or (impl == "auto" and q.device.type == "cpu" and q.dtype == torch.bfloat16):
        return explicit_attention(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def explicit_attention(q, k, v, mask, dropout_p: float = 0.0) -> torch.Tensor:
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1)
    return F.dropout(probs, dropout_p) @ v


class AlbertLayer(nn.Module):
    """Post-LN block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: AlbertConfig):
        super().__init__()
        H = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(H, H)
        self.key_value = nn.Linear(H, 2 * H)  # fused; hf.py splits it into HF's key and value
        self.attention_dense = nn.Linear(H, H)
        self.attention_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.ffn = nn.Linear(H, cfg.intermediate_size)
        self.ffn_output = nn.Linear(cfg.intermediate_size, H)
        self.ffn_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.dropout = cfg.hidden_dropout_prob
        self.attention_dropout = cfg.attention_probs_dropout_prob
        self.attention_impl = "auto"  # see `attention`; set with AlbertForPreTraining.set_attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, H]; mask [B, 1, 1, L] bool, True = real token, or None without padding; rows [B, R]: if given, compute
        only those rows of the output ([B, R, H]), keys and values still from all L tokens."""
        B, L, H = x.shape
        q_in = x if rows is None else x.gather(1, rows[:, :, None].expand(-1, -1, H))
        q = self.query(q_in).unflatten(-1, (self.n_head, -1)).transpose(1, 2)  # [B, nh, R, d]
        k, v = self.key_value(x).view(B, L, 2, self.n_head, -1).permute(2, 0, 3, 1, 4)  # [B, nh, L, d] each
        a = attention(q, k, v, mask, self.attention_dropout if self.training else 0.0, self.attention_impl)
        a = a.transpose(1, 2).flatten(2)  # [B, R, H]
        h = self.attention_norm(q_in + F.dropout(self.attention_dense(a), self.dropout, self.training))
        f = self.ffn_output(self.act(self.ffn(h)))
        return self.ffn_norm(h + F.dropout(f, self.dropout, self.training))


class AlbertForPreTraining(nn.Module):
    """`model(**batch)` with the HDF5 shard keys; see `forward`. Set `gradient_checkpointing = True`
    to recompute each layer's activations in backward (saves memory for long sequences)."""

    def __init__(self, config: AlbertConfig, gradient_checkpointing: bool = False):
        super().__init__()
        cfg = self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        self.embeddings = Embeddings(cfg)
        self.embedding_projection = nn.Linear(cfg.embedding_size, cfg.hidden_size)
        self.groups = nn.ModuleList(
            nn.ModuleList(AlbertLayer(cfg) for _ in range(cfg.inner_group_num)) for _ in range(cfg.num_hidden_groups)
        )
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.sop_classifier = nn.Linear(cfg.hidden_size, 2)
        self.mlm_dense = nn.Linear(cfg.hidden_size, cfg.embedding_size)
        self.mlm_norm = nn.LayerNorm(cfg.embedding_size, eps=cfg.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # decoder weight = word embeddings
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter; see the module docstring for DeepSpeed ZeRO-3."""
        for m in self.modules():
            init_albert_weights(m, self.config.initializer_range)

    def set_attention(self, impl: str) -> None:
        """Attention implementation of every layer: "auto", "sdpa" or "math" (see `attention`)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention: {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        for group in self.groups:
            for layer in cast(list[AlbertLayer], group):
                layer.attention_impl = impl

    def mlm_transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """The MLM head before the decoder: dense, activation, LayerNorm (a unit for torch.compile)."""
        return self.mlm_norm(self.act(self.mlm_dense(tokens)))

    def layer_schedule(self) -> list[AlbertLayer]:
        """The layers in execution order (shared layers appear several times)."""
        per_group = self.config.num_hidden_layers / self.config.num_hidden_groups
        groups = cast(list[list[AlbertLayer]], self.groups)
        return [layer for i in range(self.config.num_hidden_layers) for layer in groups[int(i / per_group)]]

    def forward(
        self,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        masked_lm_positions: torch.Tensor | None = None,
        masked_lm_ids: torch.Tensor | None = None,
        next_sentence_labels: torch.Tensor | None = None,
    ) -> PreTrainingOutput:
        """input_ids, input_mask (1 = real token), segment_ids: [B, L]; masked_lm_positions,
        masked_lm_ids: [B, P], padded with 0 (a slot is padding exactly when its position is 0,
        the [CLS] position); next_sentence_labels [B] (1 = swapped). Any integer dtype.
        Without masked_lm_positions, mlm_logits covers every position ([B, L, vocab])."""
        input_ids = input_ids.long()
        B, L = input_ids.shape
        segment_ids = torch.zeros_like(input_ids) if segment_ids is None else segment_ids.long()
        # broadcast over heads and queries; None (no padding) lets SDPA use its flash kernel, which takes no mask
        mask = None if input_mask is None else input_mask.bool()[:, None, None, :]

        rows = None  # rows the heads read: [CLS] then the predictions
        if masked_lm_positions is not None:
            positions = masked_lm_positions.long()
            rows = torch.cat([positions.new_zeros(B, 1), positions], dim=1)

        h = self.embedding_projection(self.embeddings(input_ids, segment_ids))
        schedule = self.layer_schedule()
        for i, layer in enumerate(schedule):
            r = rows if i == len(schedule) - 1 else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, mask, r, use_reentrant=False)
            else:
                h = layer(h, mask, r)

        sop_logits = self.sop_classifier(torch.tanh(self.pooler(h[:, 0])))
        tokens = h if rows is None else h[:, 1:]
        t = self.mlm_transform(tokens)
        mlm_logits = F.linear(t, self.embeddings.word_embeddings.weight, self.mlm_bias)
        out = PreTrainingOutput(mlm_logits=mlm_logits, sop_logits=sop_logits)

        if masked_lm_ids is not None:
            if masked_lm_positions is None:
                raise ValueError("masked_lm_ids given without masked_lm_positions")
            valid = positions != 0
            targets = torch.where(valid, masked_lm_ids.long(), 0)
            nll = F.cross_entropy(mlm_logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
            count = valid.sum().clamp(min=1)  # a batch without predictions gives loss 0, not nan
            out.mlm_loss = (nll * valid.flatten()).sum() / count
            with torch.no_grad():
                # max().indices is argmax (the first maximal index) but about 2x faster on bf16 CPU tensors (bench/bench_ops.py)
                out.mlm_accuracy = ((mlm_logits.max(-1).indices == targets) & valid).sum() / count
        if next_sentence_labels is not None:
            labels = next_sentence_labels.long().view(-1)
            out.sop_loss = F.cross_entropy(sop_logits.float(), labels)
            with torch.no_grad():
                out.sop_accuracy = (sop_logits.argmax(-1) == labels).float().mean()
        losses = [x for x in (out.mlm_loss, out.sop_loss) if x is not None]
        out.loss = cast(torch.Tensor, sum(losses)) if losses else None
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "AlbertConfig",
    "AlbertForPreTraining",
    "ATTENTION_IMPLS",
    "PreTrainingOutput",
    "init_albert_weights",
    "count_parameters",
    "CONFIG_DIR",
]
