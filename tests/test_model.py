"""The ALBERT model: configs, forward semantics, losses, checkpointing, initialisation (also under ZeRO-3)."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers.model_fixtures import make_batch, perturb_, run_python, small_config

from pipeline.model import CONFIG_DIR, AlbertConfig, AlbertForPreTraining, explicit_attention, init_albert_weights

# Paper sizes (ALBERT table 1) of the shipped configs: L, H, heads, FFN.
PAPER_SIZES = {
    "albert-base": (12, 768, 12, 3072),
    "albert-large": (24, 1024, 16, 4096),
    "albert-xlarge": (24, 2048, 16, 8192),
    "albert-xxlarge": (12, 4096, 64, 16384),
    "albert-tiny": (4, 256, 4, 1024),
}


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_shipped_configs(name):
    cfg = AlbertConfig.from_name_or_path(name)
    assert cfg == AlbertConfig.from_json(CONFIG_DIR / f"{name}.json")
    sizes = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size)
    assert sizes == PAPER_SIZES[name]
    common = (cfg.vocab_size, cfg.embedding_size, cfg.max_position_embeddings, cfg.num_hidden_groups, cfg.hidden_act)
    assert common == (30000, 128, 512, 1, "gelu_new")
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == 0.0


def test_config_json_round_trip(tmp_path):
    cfg = small_config(num_hidden_groups=2, inner_group_num=2, hidden_act="gelu", layer_norm_eps=1e-6)
    cfg.to_json(tmp_path / "c.json")
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["model_type"] == "albert" and written["architectures"] == ["AlbertForPreTraining"]
    assert AlbertConfig.from_json(tmp_path / "c.json") == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    "change, key",
    [
        ({"hidden_sise": 64}, "hidden_sise"),
        ({"num_attention_heads": 5}, "hidden_size"),
        ({"num_hidden_groups": 3}, "num_hidden_groups"),
        ({"hidden_act": "swish"}, "hidden_act"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
        ({"model_type": "bert"}, "model_type"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ],
)
def test_config_refuses_bad_values(tmp_path, change, key):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**small_config().to_dict(), **change}))
    with pytest.raises(ValueError) as err:
        AlbertConfig.from_json(path)
    assert str(path) in str(err.value) and key in str(err.value)
    assert "\n" not in str(err.value)


def test_config_refuses_unknown_shipped_name():
    with pytest.raises(ValueError, match="albert-huge: no such model config"):
        AlbertConfig.from_name_or_path("albert-huge")


def test_layer_schedule_follows_hf_group_formula():
    for groups, inner in [(1, 1), (2, 1), (4, 1), (2, 2)]:
        model = AlbertForPreTraining(small_config(num_hidden_groups=groups, inner_group_num=inner))
        expected = [model.groups[int(i / (4 / groups))][j] for i in range(4) for j in range(inner)]
        assert [id(m) for m in model.layer_schedule()] == [id(m) for m in expected]
        assert len({id(m) for m in model.layer_schedule()}) == groups * inner


def test_heads_and_losses_match_a_full_sequence_reference():
    """Sparse path (last layer and MLM head at the predicted rows only) vs the dense path, and the
    losses/accuracies vs a direct computation over the non-padding predictions."""
    cfg = small_config(num_hidden_groups=2)
    model = perturb_(AlbertForPreTraining(cfg)).eval()
    batch = make_batch(cfg)
    pos, ids, labels = batch["masked_lm_positions"], batch["masked_lm_ids"], batch["next_sentence_labels"]
    with torch.no_grad():
        out = model(**batch)
        full = model(batch["input_ids"], batch["input_mask"], batch["segment_ids"])
    B, P = pos.shape
    assert out.mlm_logits.shape == (B, P, cfg.vocab_size) and out.sop_logits.shape == (B, 2)
    assert full.mlm_logits.shape == (B, batch["input_ids"].shape[1], cfg.vocab_size) and full.loss is None
    gathered = full.mlm_logits.gather(1, pos[:, :, None].expand(-1, -1, cfg.vocab_size))
    torch.testing.assert_close(out.mlm_logits, gathered, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sop_logits, full.sop_logits, rtol=0, atol=1e-5)

    valid = pos != 0
    mlm_loss = F.cross_entropy(out.mlm_logits[valid], ids[valid])
    sop_loss = F.cross_entropy(out.sop_logits, labels)
    torch.testing.assert_close(out.mlm_loss, mlm_loss)
    torch.testing.assert_close(out.sop_loss, sop_loss)
    torch.testing.assert_close(out.loss, mlm_loss + sop_loss)
    mlm_acc = (out.mlm_logits[valid].argmax(-1) == ids[valid]).float().mean()
    torch.testing.assert_close(out.mlm_accuracy, mlm_acc)
    torch.testing.assert_close(out.sop_accuracy, (out.sop_logits.argmax(-1) == labels).float().mean())


def test_padding_predictions_and_padding_tokens_are_ignored():
    cfg = small_config()
    model = perturb_(AlbertForPreTraining(cfg)).eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        out = model(**batch)
        # Other labels in padding slots change nothing.
        noisy = dict(batch, masked_lm_ids=torch.where(batch["masked_lm_positions"] == 0, 7, batch["masked_lm_ids"]))
        out2 = model(**noisy)
        # More padding tokens at the end (and other ids under them) change nothing.
        extra = {
            k: F.pad(batch[k], (0, 8), value=9 if k == "input_ids" else 0)
            for k in ("input_ids", "input_mask", "segment_ids")
        }
        out3 = model(**{**batch, **extra})
        # A batch without predictions: loss 0, not nan.
        empty = model(**dict(batch, masked_lm_positions=torch.zeros_like(batch["masked_lm_positions"])))
    assert torch.equal(out.mlm_loss, out2.mlm_loss) and torch.equal(out.mlm_accuracy, out2.mlm_accuracy)
    torch.testing.assert_close(out3.mlm_logits, out.mlm_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out3.sop_logits, out.sop_logits, rtol=0, atol=1e-5)
    assert empty.mlm_loss.item() == 0.0 and empty.mlm_accuracy.item() == 0.0


def test_labels_optional():
    cfg = small_config()
    batch = make_batch(cfg)
    model = AlbertForPreTraining(cfg)
    out = model(**{k: v for k, v in batch.items() if k not in ("masked_lm_ids", "next_sentence_labels")})
    assert out.loss is None and out.mlm_loss is None and out.sop_accuracy is None
    only_sop = model(**{k: v for k, v in batch.items() if k != "masked_lm_ids"})
    assert torch.equal(only_sop.loss, only_sop.sop_loss)
    with pytest.raises(ValueError, match="masked_lm_positions"):
        model(batch["input_ids"], masked_lm_ids=batch["masked_lm_ids"])


def test_explicit_attention_equals_sdpa():
    """The form used on CPU in bf16 computes what SDPA computes (checked in fp32), with fewer query rows too."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=generator) for n in (7, 10, 10))
    mask = (torch.arange(10) < torch.tensor([10, 6, 3])[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(explicit_attention(q, k, v, mask), ref, rtol=0, atol=1e-6)


def test_bf16_autocast_tracks_fp32():
    cfg = small_config()
    model = perturb_(AlbertForPreTraining(cfg), std=0.02)
    batch = make_batch(cfg)
    ref = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.mlm_logits.dtype == torch.bfloat16
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, rtol=0.02, atol=0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint16])
def test_small_integer_dtypes(dtype):
    cfg = small_config()
    model = AlbertForPreTraining(cfg).eval()
    batch = make_batch(cfg, max_id=250)  # fits uint8
    with torch.no_grad():
        ref = model(**batch)
        out = model(**{k: v.to(dtype) for k, v in batch.items()})
    assert torch.equal(out.mlm_logits, ref.mlm_logits) and torch.equal(out.loss, ref.loss)


def test_gradient_checkpointing_gives_same_loss_and_grads():
    cfg = small_config(num_hidden_groups=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = AlbertForPreTraining(cfg).train()
    batch = make_batch(cfg)
    results = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(3)  # same dropout masks; checkpoint replays the RNG state in recomputation
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=1e-7, msg=name)


def test_initialisation():
    torch.manual_seed(0)
    cfg = AlbertConfig.from_name_or_path("albert-tiny")
    model = AlbertForPreTraining(cfg)
    std = model.embeddings.word_embeddings.weight.std().item()
    assert abs(std - 0.02) < 0.001
    assert abs(model.groups[0][0].ffn.weight.std().item() - 0.02) < 0.001
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        if "norm.weight" in name:
            assert torch.equal(p, torch.ones_like(p)), name


ZERO3_INIT = textwrap.dedent("""
    import datetime, json, deepspeed, torch
    from pipeline.model import AlbertConfig, AlbertForPreTraining, init_albert_weights

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    cfg = AlbertConfig.from_name_or_path("albert-tiny")
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = AlbertForPreTraining(cfg)
    word = model.embeddings.word_embeddings.weight
    stats = {"partitioned": word.numel() == 0 and word.ds_numel == cfg.vocab_size * cfg.embedding_size}
    with deepspeed.zero.GatheredParameters([word]):
        stats["std_before"] = word.std().item()
    for m in model.modules():  # the documented recipe
        with deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False)), modifier_rank=0):
            init_albert_weights(m, cfg.initializer_range)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        stats["std_after"] = word.std().item()
        stats["ffn_std"] = model.groups[0][0].ffn.weight.std().item()
        stats["norm_ones"] = bool((model.groups[0][0].ffn_norm.weight == 1).all())
        stats["bias_zero"] = bool((model.mlm_bias == 0).all() and (model.pooler.bias == 0).all())
    print("RESULT", json.dumps(stats))
""")


@pytest.mark.integration
def test_initialisation_under_zero3_init():
    proc = run_python(["-c", ZERO3_INIT], distributed=True)
    stats = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert stats["partitioned"]
    assert stats["std_before"] > 0.5  # what zero.Init leaves: the __init__ initialisation was lost
    assert abs(stats["std_after"] - 0.02) < 0.001 and abs(stats["ffn_std"] - 0.02) < 0.001
    assert stats["norm_ones"] and stats["bias_zero"]


def test_init_albert_weights_only_touches_own_parameters():
    cfg = small_config()
    model = AlbertForPreTraining(cfg)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.mlm_bias.fill_(3.0)
    init_albert_weights(model, cfg.initializer_range)  # the top module owns only mlm_bias
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
