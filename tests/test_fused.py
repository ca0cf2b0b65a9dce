"""Fused paths (pipeline/fused.py) against the plain ones: same outputs and gradients, honest log lines, working switches."""

import copy
import re

import pytest
import torch
from helpers.engine_helpers import ds_config, metrics, pretrain
from helpers.model_fixtures import make_batch, perturb_, small_config

from pipeline.fused import PLAIN, FusedOptions, apply_fused, gelu_tanh_by_sigmoid
from pipeline.lamb_deepspeed import OptimizerKind, build_lamb
from pipeline.model import AlbertForPreTraining, AlbertLayer
from pipeline.run_config import LambSettings

CPU = torch.device("cpu")


def twins(cfg) -> tuple[AlbertForPreTraining, AlbertForPreTraining]:
    torch.manual_seed(0)
    plain = perturb_(AlbertForPreTraining(cfg))
    return plain, copy.deepcopy(plain)


def outputs_and_grads(model: AlbertForPreTraining, batch: dict) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    values = {k: out[k].detach() for k in ("mlm_logits", "sop_logits", "loss")}
    return values, {n: p.grad for n, p in model.named_parameters()}


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict], tol: float) -> None:
    for got, want in zip(a, b):
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def test_sdpa_attention_equals_plain_attention_with_padding():
    cfg = small_config()
    plain, fused = twins(cfg)
    lines = apply_fused(plain, PLAIN, CPU) + apply_fused(fused, FusedOptions(attention="sdpa", compile="off"), CPU)
    assert "explicit" in lines[0] and "scaled_dot_product_attention" in lines[2]
    batch = make_batch(cfg)
    assert (batch["input_mask"] == 0).any()  # padding is masked out in both
    assert_same(outputs_and_grads(fused, batch), outputs_and_grads(plain, batch), tol=1e-5)


@pytest.mark.slow
def test_compiled_shared_layers_and_head_equal_plain():
    # Two groups of shared layers, each used by two of the four passes: each is compiled once.
    cfg = small_config(num_hidden_groups=2)
    plain, fused = twins(cfg)
    apply_fused(plain, PLAIN, CPU)
    lines = apply_fused(fused, FusedOptions(attention="sdpa", compile="on"), CPU)
    assert (
        "torch.compile: on for 2 shared layer(s) (4 passes) and the MLM head" in lines[1]
        and "gelu_new through sigmoid" in lines[1]
    )
    layers = [m for m in fused.modules() if isinstance(m, AlbertLayer)]
    assert len(layers) == 2 and all(m._compiled_call_impl is not None and m.act is gelu_tanh_by_sigmoid for m in layers)
    assert fused.act is gelu_tanh_by_sigmoid  # the MLM head's
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints are unchanged
    batch = make_batch(cfg)
    # apply_fused lets a graph that fails to compile, or one past Dynamo's recompile limit (counted across the models
    # of this test session), run eagerly with the same outputs: here either must fail the test
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() leaves the counts of earlier compiles in this process
    with torch._dynamo.config.patch(suppress_errors=False, fail_on_recompile_limit_hit=True):
        for _ in range(2):  # the second step reuses the compiled kernels
            assert_same(outputs_and_grads(fused, batch), outputs_and_grads(plain, batch), tol=1e-5)
    # compiled graphs: the layer over all rows, over the last pass's rows (the two layers share them: their weights are
    # graph inputs), and the MLM head
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


def test_gelu_by_sigmoid_is_gelu_new():
    x = torch.linspace(-12, 12, 100_001, dtype=torch.float64)
    torch.testing.assert_close(
        gelu_tanh_by_sigmoid(x), torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-12, atol=1e-12
    )
    x = x.float()
    torch.testing.assert_close(
        gelu_tanh_by_sigmoid(x), torch.nn.functional.gelu(x, approximate="tanh"), rtol=2e-6, atol=1e-6
    )


def test_switches_turn_each_path_off_and_say_why():
    model = AlbertForPreTraining(small_config())
    lines = apply_fused(model, FusedOptions(attention="math", compile="off"), CPU)
    assert lines == [
        "attention: explicit matmul + softmax form (switched to math)",
        "torch.compile: off (switched off); layers and MLM head run eagerly",
    ]
    assert all(
        m.attention_impl == "math" and m._compiled_call_impl is None
        for m in model.modules()
        if isinstance(m, AlbertLayer)
    )
    assert "mlm_transform" not in vars(model)
    zero3 = apply_fused(AlbertForPreTraining(small_config()), FusedOptions(compile="on"), CPU, zero_stage=3)
    assert zero3[1].startswith("torch.compile: off (ZeRO-3")
    auto = apply_fused(AlbertForPreTraining(small_config()), FusedOptions(), CPU)
    assert "explicit form in bf16" in auto[0] and auto[1].startswith("torch.compile: off (auto: no faster on CPU")
    with pytest.raises(ValueError, match="attention"):
        FusedOptions(attention="flash")
    with pytest.raises(ValueError, match="compile"):
        FusedOptions(compile="yes")


@pytest.mark.parametrize("allow_fused, why", [(True, "no CUDA"), (False, "switched off")])
def test_fused_lamb_log_line_says_why_it_is_off(allow_fused, why):
    if torch.cuda.is_available():
        pytest.skip("on CUDA FusedLamb applies")
    lamb = LambSettings.from_params({"lr": 1e-3, "weight_decay": 0.01})
    choice = build_lamb(AlbertForPreTraining(small_config()), lamb, zero_stage=0, allow_fused=allow_fused)
    assert choice.description.endswith(f"DeepSpeed FusedLamb off: {why}") and choice.kind is OptimizerKind.OUR_LAMB
    assert type(choice.optimizer).__module__ == "pipeline.lamb"


@pytest.mark.integration
def test_engine_trains_the_same_with_compiled_layers(wiki_shards, tmp_path):
    """A real DeepSpeed run (ZeRO-2, fp32) with the compiled layer gives the plain run's losses."""
    runs = {}
    for name, extra in (("fused", ["--compile", "on"]), ("plain", ["--no-compile", "--attention", "math"])):
        proc = pretrain(tmp_path / name, wiki_shards, ds_config(2, "fp32", warmup=1), steps=2, extra=extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (proc.stderr, [m["loss"] for m in metrics(tmp_path / name)])
    assert re.search(r"torch\.compile: on for 1 shared layer\(s\) \(2 passes\)", runs["fused"][0])
    assert "scaled_dot_product_attention (fused CPU kernel) in fp32" in runs["fused"][0]
    assert (
        "torch.compile: off (switched off)" in runs["plain"][0]
        and "DeepSpeed FusedLamb off: no CUDA" in runs["plain"][0]
    )
    torch.testing.assert_close(runs["fused"][1], runs["plain"][1], rtol=1e-5, atol=0)
