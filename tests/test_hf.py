"""Hugging Face interop: parity with transformers' AlbertForPreTraining, export/import, tokenizer,
and albert-export on real DeepSpeed checkpoints (ZeRO-0, ZeRO-3, and BF16_Optimizer's at ZeRO-1)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers.engine_helpers import ds_config, final_params, pretrain
from helpers.model_fixtures import make_batch, perturb_, run_python, small_config
from safetensors.torch import load_file

from pipeline.export import main as export_main
from pipeline.hf import export_hf, load_hf, to_hf_state_dict
from pipeline.model import AlbertConfig, AlbertForPreTraining, count_parameters

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")


@contextmanager
def transformers_warnings():
    """Collect what transformers logs at WARNING or above, and Python warnings, into a list."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


def load_hf_model(path):
    with transformers_warnings() as logged:
        model = transformers.AlbertForPreTraining.from_pretrained(path)
    assert not logged, logged  # e.g. transformers' load report of missing or unexpected weights
    return model.eval()


@pytest.mark.parametrize("groups, inner", [(1, 1), (2, 1), (1, 2)], ids=["1group", "2groups", "inner2"])
def test_parity_with_transformers(tmp_path, groups, inner):
    cfg = small_config(num_hidden_groups=groups, inner_group_num=inner)
    ours = perturb_(AlbertForPreTraining(cfg)).eval()
    export_hf(ours, cfg, tmp_path)
    hf = load_hf_model(tmp_path)
    batch = make_batch(cfg, batch=4, seq=24, predictions=6)
    with torch.no_grad():
        out = ours(**batch)
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["input_mask"], token_type_ids=batch["segment_ids"])
    pos = batch["masked_lm_positions"]
    ref_mlm = ref.prediction_logits.gather(1, pos[:, :, None].expand(-1, -1, cfg.vocab_size))
    torch.testing.assert_close(out.mlm_logits, ref_mlm, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sop_logits, ref.sop_logits, rtol=0, atol=1e-5)


def test_round_trip_is_exact(tmp_path):
    cfg = small_config(num_hidden_groups=2, inner_group_num=2)
    ours = perturb_(AlbertForPreTraining(cfg))
    export_hf(ours, cfg, tmp_path)
    config2, model2 = load_hf(tmp_path)
    assert config2 == cfg
    state, state2 = ours.state_dict(), model2.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    # The file holds what transformers saves itself: no tied decoder, HF names, split key/value.
    hf_model = transformers.AlbertForPreTraining(transformers.AlbertConfig(**cfg.to_hf_dict()))
    hf_model.save_pretrained(tmp_path / "hf_saved")
    assert (
        load_file(tmp_path / "model.safetensors").keys()
        == load_file(tmp_path / "hf_saved" / "model.safetensors").keys()
    )


def test_load_hf_reads_transformers_own_folder(tmp_path):
    hf_cfg = transformers.AlbertConfig(
        vocab_size=120,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_groups=2,
    )
    hf = transformers.AlbertForPreTraining(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    cfg, ours = load_hf(tmp_path)
    assert (cfg.vocab_size, cfg.num_hidden_groups, cfg.hidden_size) == (120, 2, 32)
    batch = make_batch(cfg)
    with torch.no_grad():
        out = ours.eval()(**batch)
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["input_mask"], token_type_ids=batch["segment_ids"])
    torch.testing.assert_close(out.sop_logits, ref.sop_logits, rtol=0, atol=1e-5)


def test_load_hf_reads_a_masked_lm_folder(tmp_path, caplog):
    """A released ALBERT may be an AlbertForMaskedLM: no pooler or SOP head, those start fresh."""
    hf_cfg = transformers.AlbertConfig(
        vocab_size=120,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attention_probs_dropout_prob=0,
    )
    hf = transformers.AlbertForMaskedLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    cfg, ours = load_hf(tmp_path)
    assert "sop_classifier.weight" in caplog.text and cfg.attention_probs_dropout_prob == 0.0
    batch = make_batch(cfg)
    with torch.no_grad():
        out = ours.eval()(**batch)
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["input_mask"], token_type_ids=batch["segment_ids"])
    pos = batch["masked_lm_positions"]
    ref_mlm = ref.logits.gather(1, pos[:, :, None].expand(-1, -1, cfg.vocab_size))
    torch.testing.assert_close(out.mlm_logits, ref_mlm, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["albert-tiny", "albert-base", "albert-large", "albert-xlarge", "albert-xxlarge"])
def test_parameter_count_equals_transformers(name):
    cfg = AlbertConfig.from_name_or_path(name)
    with torch.device("meta"):  # shapes only
        ours = AlbertForPreTraining(cfg)
        hf = transformers.AlbertForPreTraining(transformers.AlbertConfig(**cfg.to_hf_dict()))
    assert count_parameters(ours) == count_parameters(hf)


def test_config_saved_by_transformers_loads_as_is(tmp_path):
    hf_cfg = transformers.AlbertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
    hf_cfg.save_pretrained(tmp_path)
    cfg = AlbertConfig.from_json(tmp_path / "config.json")
    assert cfg == AlbertConfig.from_name_or_path("albert-base")


def train_spm(tmp_path, control_symbols="[CLS],[SEP],[MASK]"):
    import sentencepiece as spm

    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "albert",
        "shares",
        "layers",
        "across",
        "depth",
        "sentence",
        "order",
        "prediction",
        "masked",
        "language",
        "model",
        "embedding",
    ]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(tmp_path / "spm"),
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        control_symbols=control_symbols,
        minloglevel=2,
    )
    return tmp_path / "spm.model"


def test_tokenizer_export(tmp_path):
    import sentencepiece as spm

    model_file = train_spm(tmp_path)
    cfg = small_config(vocab_size=40)
    export_hf(AlbertForPreTraining(cfg), cfg, tmp_path / "hf", spm_model=model_file)
    with transformers_warnings() as logged:
        tok = transformers.AlbertTokenizer.from_pretrained(tmp_path / "hf")
    assert not logged, logged
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    text = "the lazy fox shares depth"
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    assert tok(text)["input_ids"] == [2, *processor.encode(text), 3]
    assert tok("the fox", "lazy dog", return_token_type_ids=True)["token_type_ids"] == [0] * (
        len(processor.encode("the fox")) + 2
    ) + [1] * (len(processor.encode("lazy dog")) + 1)


def test_tokenizer_export_refuses_other_special_ids(tmp_path):
    model_file = train_spm(tmp_path, control_symbols="[SEP],[CLS],[MASK]")
    cfg = small_config(vocab_size=40)
    with pytest.raises(ValueError, match="id 2 must be \\[CLS\\]"):
        export_hf(AlbertForPreTraining(cfg), cfg, tmp_path / "hf", spm_model=model_file)
    assert not (tmp_path / "hf").exists()  # refused before writing anything


DEEPSPEED_TRAIN = textwrap.dedent("""
    import datetime, sys, deepspeed, torch
    from helpers.model_fixtures import make_batch, small_config
    from pipeline.model import AlbertForPreTraining

    out = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    cfg = small_config(num_hidden_groups=2)
    for stage in (0, 3):
        ds = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
            model = AlbertForPreTraining(cfg)
        torch.manual_seed(0)  # the same weights at both stages
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0, enabled=stage == 3):
            model.init_weights()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        loss = engine(**make_batch(cfg)).loss
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(f"{out}/zero{stage}")
        cfg.to_json(f"{out}/zero{stage}/model_config.json")
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            torch.save({k: v.clone() for k, v in engine.module.state_dict().items()}, f"{out}/zero{stage}.pt")
""")


@pytest.mark.integration
def test_export_deepspeed_checkpoints(tmp_path):
    run_python(["-c", DEEPSPEED_TRAIN, str(tmp_path)], distributed=True, pythonpath="tests")
    cfg = small_config(num_hidden_groups=2)
    tag_dir = next((tmp_path / "zero3").glob("global_step*"))
    for stage, checkpoint in [(0, tmp_path / "zero0"), (3, tag_dir)]:  # the tags' folder, or one tag folder
        out = tmp_path / f"hf{stage}"
        run_python(["-m", "pipeline.export", "--checkpoint", str(checkpoint), "--output", str(out)])
        assert json.loads((out / "config.json").read_text())["architectures"] == ["AlbertForPreTraining"]
        hf = load_hf_model(out)
        engine_weights = to_hf_state_dict(torch.load(tmp_path / f"zero{stage}.pt"))
        hf_weights = hf.state_dict()
        for name, value in engine_weights.items():
            assert torch.equal(hf_weights[name], value), (stage, name)
        assert AlbertConfig.from_json(out / "config.json") == cfg
    # Training is the same under ZeRO-3 (partitioned, shared layers, tied embedding) as without ZeRO.
    zero0, zero3 = torch.load(tmp_path / "zero0.pt"), torch.load(tmp_path / "zero3.pt")
    for name in zero0:
        torch.testing.assert_close(zero3[name], zero0[name], rtol=0, atol=1e-6, msg=name)


def test_export_cli_errors_are_one_line(tmp_path, caplog):
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "no such checkpoint folder" in caplog.text
    (tmp_path / "ckpt" / "global_step5").mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("global_step5")
    torch.save({"module": {}}, tmp_path / "ckpt" / "global_step5" / "mp_rank_00_model_states.pt")
    caplog.clear()
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "o")]) == 2
    assert "no model_config.json" in caplog.text and "--model-config" in caplog.text
    small_config().to_json(tmp_path / "ckpt" / "model_config.json")
    caplog.clear()
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "o")]) == 2
    assert "parameters do not match the model config" in caplog.text
    assert not (tmp_path / "o").exists()


# Wraps albert-pretrain from the outside: after each checkpoint save (all ranks), the engine's fp32 master weights as
# DeepSpeed itself assembles them from the live optimizer (safe_get_full_fp32_param, an all-reduce of each rank's
# fragment), written by rank 0 with the optimizer wrapper's type and the keys of its state_dict.
MASTER_WEIGHTS_WRAPPER = textwrap.dedent("""
    import os, sys
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_fp32_param

    save_checkpoint = DeepSpeedEngine.save_checkpoint

    def save_and_dump_master_weights(self, *args, **kwargs):
        result = save_checkpoint(self, *args, **kwargs)
        master = {name: safe_get_full_fp32_param(p).detach().clone() for name, p in self.module.named_parameters()}
        if torch.distributed.get_rank() == 0:
            dump = {"wrapper": type(self.optimizer).__name__, "keys": sorted(self.optimizer.state_dict()), "master": master}
            torch.save(dump, os.path.join(os.environ["MASTER_WEIGHTS_DIR"], f"master-{self.global_steps}.pt"))
        return result

    DeepSpeedEngine.save_checkpoint = save_and_dump_master_weights
    from pipeline.pretrain import main
    sys.exit(main())
""")


@pytest.mark.slow
def test_export_bf16_optimizer_checkpoint_of_two_ranks(wiki_shards, tmp_path):
    """bf16 at ZeRO-1 with fp32 gradient accumulation (the GPU config) trains with DeepSpeed's BF16_Optimizer, whose
    checkpoints zero_to_fp32 refuses; albert-export reads them itself, to the engine's fp32 master weights exactly."""
    (tmp_path / "wrapper.py").write_text(MASTER_WEIGHTS_WRAPPER)
    (tmp_path / "master").mkdir()
    ds = ds_config(1, "bf16", accum=2, data_types={"grad_accum_dtype": "fp32"})
    run = tmp_path / "run"
    proc = pretrain(
        run,
        wiki_shards,
        ds,
        steps=3,
        nproc=2,
        script=tmp_path / "wrapper.py",
        env={"MASTER_WEIGHTS_DIR": str(tmp_path / "master")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dump = torch.load(tmp_path / "master" / "master-3.pt")
    assert dump["wrapper"] == "BF16_Optimizer" and "zero_stage" not in dump["keys"], dump[
        "wrapper"
    ]  # what zero_to_fp32 refuses
    tag_dir = run / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in tag_dir.glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
    ]
    master = dump["master"]
    # The master weights hold more than bf16 keeps: equality below tells them from the bf16 module weights.
    assert any(not torch.equal(v, v.bfloat16().float()) for v in master.values())

    consolidated = final_params(run)  # pipeline.export.consolidate, as albert-export calls it
    assert set(consolidated) == set(master)
    for name, value in master.items():
        assert consolidated[name].dtype == torch.float32 and torch.equal(consolidated[name], value), name

    albert_export = shutil.which("albert-export", path=str(Path(sys.executable).parent))
    out = tmp_path / "hf"
    exported = subprocess.run(
        [
            albert_export,
            "--checkpoint",
            str(run / "checkpoints"),
            "--output",
            str(out),
            "--spm-model",
            str(wiki_shards / "spiece.model"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert exported.returncode == 0, exported.stderr
    hf_weights = load_hf_model(out).state_dict()
    for name, value in to_hf_state_dict(master).items():
        assert torch.equal(hf_weights[name], value), name
    tokenizer = transformers.AlbertTokenizer.from_pretrained(out)
    assert tokenizer.mask_token == "[MASK]"


def write_bf16_optimizer_checkpoint(tag_dir, groups: list[dict[str, torch.Tensor]], world: int) -> None:
    """Files as DeepSpeed's BF16_Optimizer saves them (the tensors that matter; no DeepSpeed objects): each group's
    parameters flattened, padded at the end to a multiple of 2 x world and split evenly over the ranks."""
    tag_dir.mkdir(parents=True)
    shapes, partitions, paddings = [], [[] for _ in range(world)], []
    for params in groups:
        shapes.append({name: p.shape for name, p in params.items()})
        flat = torch.cat([p.flatten() for p in params.values()])
        padding = -flat.numel() % (2 * world)
        flat = torch.cat([flat, torch.zeros(padding)])
        for r, part in enumerate(flat.chunk(world)):
            partitions[r].append(part.clone())
        paddings.append(padding)
    module = {name: p.bfloat16() for params in groups for name, p in params.items()}
    torch.save(
        {"module": module, "buffer_names": [], "param_shapes": shapes, "shared_params": {"tied.weight": "a.weight"}},
        tag_dir / "mp_rank_00_model_states.pt",
    )
    for r in range(world):
        osd = {
            "single_partition_of_fp32_groups": partitions[r],
            "partition_count": [world] * len(groups),
            "group_paddings": paddings if r == world - 1 else [0] * len(groups),
            "base_optimizer_state": {},
        }
        torch.save({"optimizer_state_dict": osd}, tag_dir / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_consolidate_bf16_optimizer_partitions_of_any_world_size(tmp_path, monkeypatch, world):
    from pipeline.export import consolidate

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # consolidate sets it if unset: keep the session's environment as it is
    generator = torch.Generator().manual_seed(world)
    groups = [
        {"a.weight": torch.randn(7, 5, generator=generator), "b.bias": torch.randn(3, generator=generator)},
        {"c.weight": torch.randn(2, 2, 2, generator=generator)},
    ]
    write_bf16_optimizer_checkpoint(tmp_path / "step-1", groups, world)
    consolidated = consolidate(tmp_path, "step-1")
    expected = {**groups[0], **groups[1], "tied.weight": groups[0]["a.weight"]}
    assert consolidated.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(consolidated[name], value), name


def test_consolidate_bf16_optimizer_names_the_file_that_does_not_add_up(tmp_path, monkeypatch):
    from pipeline.export import consolidate

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    groups = [{"a.weight": torch.randn(7, 5), "b.bias": torch.randn(3)}]
    write_bf16_optimizer_checkpoint(tmp_path / "lost", groups, 3)
    (tmp_path / "lost" / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()  # a rank's file is missing
    with pytest.raises(
        ValueError, match=r"bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt: written as one of \[3\] partitions"
    ):
        consolidate(tmp_path, "lost")
    write_bf16_optimizer_checkpoint(tmp_path / "other-model", groups, 2)
    shapes = tmp_path / "other-model" / "mp_rank_00_model_states.pt"
    states = torch.load(shapes)
    states["param_shapes"][0]["b.bias"] = torch.Size([5])  # the model states describe another model
    torch.save(states, shapes)
    with pytest.raises(
        ValueError,
        match=r"bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: parameter group 0 has 2 partitions of 20 values",
    ):
        consolidate(tmp_path, "other-model")
