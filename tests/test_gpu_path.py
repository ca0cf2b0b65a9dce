"""What a CUDA/NCCL run depends on, checked on CPU: collectives only through the device check, the GPU a rank
picks, the FusedLamb fallback, TF32, CUDA random state in checkpoints, attention without a mask, --init-from
under ZeRO-3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers.engine_helpers import TEST_MODEL, ds_config, final_params, pretrain

from pipeline.comm import CollectiveDeviceError, Comm
from pipeline.distributed import gpu_index
from pipeline.run_config import Precision, TrainError, engine_config


def test_comm_refuses_a_tensor_of_another_device_before_the_backend_sees_it():
    comm = Comm(torch.device("cuda", 0))  # the check needs no GPU: the tensor never reaches torch.distributed
    with pytest.raises(
        CollectiveDeviceError, match=r"tensor on cpu reached a collective whose tensors must be on cuda:0"
    ):
        comm.sum_(torch.zeros(2))
    with pytest.raises(CollectiveDeviceError):
        comm.max_(torch.zeros(1))
    assert Comm("cpu").check(torch.zeros(1)).device.type == "cpu"
    t = Comm("cpu").tensor([1.0, 2.5])
    assert t.device.type == "cpu" and t.dtype == torch.float64 and t.tolist() == [1.0, 2.5]


@pytest.mark.parametrize("local, visible, expected", [(0, 8, 0), (7, 8, 7), (1, 1, 0), (3, 1, 0), (5, 4, 1), (2, 2, 0)])
def test_gpu_index_is_local_rank_modulo_visible_gpus(local, visible, expected):
    assert gpu_index(local, visible) == expected


def test_gpu_index_without_gpus_is_an_error():
    with pytest.raises(ValueError, match="no visible GPU"):
        gpu_index(0, 0)


def test_fused_lamb_build_failure_falls_back_to_our_lamb(monkeypatch, caplog):
    """DeepSpeed's real FusedLamb, asked for where its kernel cannot be built (here: no CUDA at all)."""
    from pipeline import lamb, lamb_deepspeed
    from pipeline.model import AlbertConfig, AlbertForPreTraining

    monkeypatch.setattr(
        lamb_deepspeed, "_cuda_fused_lamb_available", lambda: True
    )  # claim CUDA, so the JIT build is attempted
    model = AlbertForPreTraining(AlbertConfig(**TEST_MODEL))
    ds = ds_config(stage=0)
    ds["optimizer"]["params"]["bias_correction"] = False
    config = engine_config(ds, world=1)
    with caplog.at_level("WARNING"):
        choice = lamb_deepspeed.select_optimizer(model, config)
    assert isinstance(choice.optimizer, lamb.Lamb) and choice.kind is lamb_deepspeed.OptimizerKind.OUR_LAMB
    assert "our multi-tensor LAMB" in choice.description and "JIT build failed" in choice.description, choice
    assert any("could not be built" in r.getMessage() for r in caplog.records)
    assert "optimizer" not in config.deepspeed


def test_tf32_switch_is_cuda_only():
    from pipeline.precision import set_tf32

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert "off" in set_tf32(torch.device("cuda", 0), enabled=False) and not matmul.allow_tf32
        assert "on" in set_tf32(torch.device("cuda", 0), enabled=True) and matmul.allow_tf32
        assert matmul.fp32_precision == "tf32" and torch.get_float32_matmul_precision() == "high"  # no mixed-API error
        matmul.allow_tf32 = False
        assert "not applicable" in set_tf32(torch.device("cpu"), enabled=True) and not matmul.allow_tf32
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


SLURM_TASK = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "3", "SLURM_STEP_ID": "0",
              "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost"}  # fmt: skip
DETECT = (
    "import json, os; from pipeline.distributed import detect_launch; launch = detect_launch(); "
    "print(json.dumps([launch.launcher, os.environ.get('RANK'), os.environ.get('WORLD_SIZE')]))"
)


def launched_as(env: dict[str, str], code: str = DETECT) -> subprocess.CompletedProcess:
    """`code` in a fresh Python whose environment holds `env` and no launcher variable of this one."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI", "OMPI_")) and k not in LAUNCH}
    # the venv's ninja first, as albert-pretrain puts it: another ninja makes DeepSpeed rebuild its JIT ops
    keep["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), keep.get("PATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code], env={**keep, **env}, cwd=REPO, capture_output=True, text=True, timeout=600
    )


LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, ["srun", "3", "16"]),  # srun --mpi=none
        ({"PMI_RANK": "3", "PMI_SIZE": "16"}, ["srun", "3", "16"]),  # srun --mpi=pmi2
        ({"PMIX_RANK": "3"}, ["srun", "3", "16"]),  # srun --mpi=pmix
        # the ranks of an mpirun in a Slurm job inherit its daemons' SLURM_PROCID / SLURM_STEP_NUM_TASKS
        ({"OMPI_COMM_WORLD_SIZE": "64", "OMPI_COMM_WORLD_RANK": "40", "PMIX_RANK": "40"}, ["mpirun", None, None]),
        ({"PMI_RANK": "40", "PMI_SIZE": "64"}, ["mpirun", None, None]),  # MPICH's mpirun (Hydra)
    ],
)
def test_srun_tasks_are_recognised_before_the_mpi_variables(extra, expected):
    result = launched_as({**SLURM_TASK, **extra})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


def test_slurm_step_mismatch_rule():
    from pipeline.distributed import slurm_step_mismatch

    assert slurm_step_mismatch("srun", 16, SLURM_TASK) is None
    assert slurm_step_mismatch("torchrun", 32, SLURM_TASK) is None  # torchrun of 2 ranks in each task
    assert slurm_step_mismatch("single", 1, {}) is None  # no Slurm step
    assert "a world of 1 rank(s) in a Slurm step of 16 tasks" in (slurm_step_mismatch("mpirun", 1, SLURM_TASK) or "")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launch", "extra"),
    [
        # an MPI rank whose library does not speak the step's plugin: OpenMPI's mpi4py then runs a world of one
        ("mpirun", {"PMI_RANK": "0", "PMI_SIZE": "1"}),
        ("torchrun", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
    ],
)
def test_a_world_smaller_than_the_slurm_step_is_refused(launch, extra):
    """Each of the step's 16 tasks would train alone into one --output: refused on one line, before any training."""
    init = (
        "from pipeline.distributed import LaunchError, detect_launch, free_port, init_distributed\n"
        "import os; os.environ.setdefault('MASTER_PORT', str(free_port()))\n"
        "try:\n    init_distributed(detect_launch(), 60.0)\nexcept LaunchError as e:\n    print(e)"
    )
    result = launched_as({**SLURM_TASK, **extra, "DS_ACCELERATOR": "cpu"}, init)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1].startswith(
        f"{launch} launch: a world of 1 rank(s) in a Slurm step of 16 tasks"
    )


def test_rng_state_carries_a_cuda_field():
    from pipeline.checkpoint import _rng_state, _set_rng_state

    state = _rng_state()
    assert set(state) == {"torch", "cuda", "numpy", "python"}
    assert state["cuda"] is None  # no CUDA here; on a GPU it is the device generator's state (bench/gpu_check.sh)
    a = torch.rand(3)
    _set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_unpadded_batches_go_without_a_mask_and_compute_the_same():
    from helpers.model_fixtures import make_batch, small_config

    from pipeline.data import to_device
    from pipeline.model import AlbertForPreTraining

    cfg = small_config()
    model = AlbertForPreTraining(cfg).eval()
    batch = make_batch(cfg, batch=3, seq=32)
    batch["input_mask"] = torch.ones_like(batch["input_mask"])
    assert "input_mask" not in to_device(batch, torch.device("cpu"))
    padded = {**batch, "input_mask": batch["input_mask"].clone()}
    padded["input_mask"][0, -4:] = 0
    assert torch.equal(to_device(padded, torch.device("cpu"))["input_mask"], padded["input_mask"])
    for impl in ("sdpa", "math"):
        model.set_attention(impl)
        with torch.no_grad():
            a, b = model(**to_device(batch, torch.device("cpu"))), model(**batch)
        torch.testing.assert_close(a.mlm_logits, b.mlm_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.sop_logits, b.sop_logits, rtol=1e-5, atol=1e-5)


def test_sdpa_kernel_line_names_the_dispatched_kernel():
    from pipeline.fused import sdpa_kernels
    from pipeline.model import AlbertConfig

    line = sdpa_kernels(AlbertConfig(**TEST_MODEL), torch.device("cpu"), torch.float32)
    assert line.startswith("SDPA kernel on cpu in float32: ") and "without padding" in line and "unknown" not in line


@pytest.mark.slow
def test_every_collective_of_ours_goes_through_the_device_check(wiki_shards, tmp_path):
    """A real 2-rank run (train, log, eval, save) with torch.distributed wrapped from outside: each collective our
    modules issue comes from pipeline.comm (which refuses a tensor of another device) or is LAMB's norm all-reduce on
    the partition's own device; a barrier carries no tensor."""
    extra = [
        "--log-interval",
        "2",
        "--save-interval",
        "3",
        "--eval-interval",
        "2",
        "--eval-data",
        str(wiki_shards),
        "--eval-batches",
        "2",
    ]
    proc = pretrain(
        tmp_path,
        wiki_shards,
        ds_config(2, "bf16", accum=2),
        steps=4,
        nproc=2,
        extra=extra,
        script=REPO / "tests" / "helpers" / "collective_guard.py",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"collectives-rank{rank}.json").read_text())
        via_comm = [c for c in calls if c["module"] == "pipeline.comm"]
        assert {c["function"] for c in via_comm} >= {"sum_", "max_", "min_"}, (
            calls
        )  # step counts, flags, FusedLamb agreement
        assert len(via_comm) >= 4 * 2 + 2, (
            calls
        )  # per step: the prediction count and the flags; metrics on logging steps
        others = [c for c in calls if c["module"] != "pipeline.comm"]
        for c in others:
            assert c["collective"] == "barrier" or (c["module"] == "pipeline.lamb" and c["device"] == "cpu"), c


@pytest.mark.slow
def test_init_from_a_hugging_face_folder_under_zero3(wiki_shards, tmp_path):
    """Two ranks, ZeRO-3, learning rate 0: the weights the run saves are the folder's, exactly (before the fix,
    load_state_dict met partitioned parameters: 'size mismatch ... torch.Size([0])')."""
    from pipeline.hf import export_hf, load_hf
    from pipeline.model import AlbertConfig, AlbertForPreTraining

    cfg = AlbertConfig(**TEST_MODEL)
    torch.manual_seed(3)
    export_hf(AlbertForPreTraining(cfg), cfg, tmp_path / "hf")
    expected = load_hf(tmp_path / "hf")[1].state_dict()
    ds = ds_config(3, "fp32", lr=0.0, warmup=1)
    proc = pretrain(tmp_path / "run", wiki_shards, ds, steps=3, nproc=2, extra=["--init-from", str(tmp_path / "hf")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "initialised from" in proc.stdout + proc.stderr
    got = final_params(tmp_path / "run")
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value.float()), name
    rng = torch.load(tmp_path / "run" / "checkpoints" / "step-00000003" / "rng-rank1.pt", weights_only=False)
    assert "cuda" in rng and rng["cuda"] is None


def test_bf16_fp32_accumulation_at_zero0_is_refused_in_one_line():
    ds = ds_config(0, "bf16", data_types={"grad_accum_dtype": "fp32"})
    with pytest.raises(TrainError, match="needs ZeRO 1-3"):
        engine_config(ds, world=1)
    ds["zero_optimization"]["stage"] = 1
    config = engine_config(ds, world=1)
    assert config.precision is Precision.BF16 and config.precision.dtype == torch.bfloat16
    assert config.grad_accum_dtype == "fp32" and config.zero_stage == 1


def test_deepspeed_throughput_timer_is_off_unless_the_config_sets_it():
    """DeepSpeed's throughput timer synchronises the GPU twice per micro-batch; the loop reports throughput itself."""
    assert engine_config(ds_config(2), world=2).deepspeed["timers"] == {"throughput": {"enabled": False}}
    timers = {"throughput": {"enabled": True, "synchronized": False}}
    assert engine_config({**ds_config(2), "timers": timers}, world=2).deepspeed["timers"] == timers


def test_gpu_choice_agrees_with_what_deepspeed_does_with_local_rank():
    from pipeline.distributed import LaunchError, choose_gpu

    assert choose_gpu(3, 8, False, {}) == 3 and choose_gpu(3, 1, False, {}) == 0  # all GPUs seen; one bound GPU
    assert choose_gpu(3, 8, True, {"OMPI_COMM_WORLD_LOCAL_RANK": "3"}) is None  # mpirun: DeepSpeed's discovery decides
    with pytest.raises(LaunchError, match="under mpirun every rank must see all its node's GPUs"):
        choose_gpu(0, 1, True, {"OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    with pytest.raises(LaunchError, match=r"would use cuda:0, but DeepSpeed requires LOCAL_RANK to equal OpenMPI's"):
        choose_gpu(1, 1, False, {"OMPI_COMM_WORLD_LOCAL_RANK": "1"})


CONSTRUCTION = """
import json, torch, deepspeed
from pipeline.distributed import detect_launch, init_distributed
from pipeline.lamb_deepspeed import SkipsConstructionStep, attach_zero_partitions, build_lamb
from pipeline.run_config import LambSettings

init_distributed(detect_launch(), 60.0)
LAMB = {"lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.5, "bias_correction": False}
SkippingSGD = type("SkippingSGD", (SkipsConstructionStep, torch.optim.SGD), {})
makers = {
    "our Lamb": lambda m: build_lamb(m, LambSettings.from_params(LAMB), 0, allow_fused=False).optimizer,
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=1.0, weight_decay=0.5),
    "SGD with SkipsConstructionStep": lambda m: SkippingSGD(m.parameters(), lr=1.0, weight_decay=0.5),
}
if torch.cuda.is_available():  # build_lamb's choice at ZeRO-0 on CUDA without bias correction: DeepSpeed's FusedLamb
    makers["FusedLamb"] = lambda m: build_lamb(m, LambSettings.from_params(LAMB), 0).optimizer
ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}
out = {}
for name, make in makers.items():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    attach_zero_partitions(engine, optimizer)
    masters = [p for g in engine.optimizer.fp32_groups for p in g]
    state = [engine.optimizer.optimizer.state[p] for p in masters]
    out[name] = {
        "wrapper": type(engine.optimizer).__name__,
        # the fp32 masters are copies of the bf16 weights: the initial weights rounded to bf16
        "unchanged": all(torch.equal(m, b.bfloat16().float()) for m, b in zip(masters, before, strict=True)),
        "steps": sorted({int(s.get("step", 0)) for s in state}),
    }
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_zero_gradient_construction_step_changes_nothing():
    """bf16 at ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer calls the optimizer's step() with zero gradients inside
    deepspeed.initialize. A plain optimizer applies it (weight decay here: the control); our Lamb and any optimizer
    with SkipsConstructionStep (as DeepSpeed's FusedLamb gets it, lamb_deepspeed.fused_lamb_class) leave the weights
    as they were and count no step."""
    result = launched_as({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}, CONSTRUCTION)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert {v["wrapper"] for v in out.values()} == {"FP16_UnfusedOptimizer"}
    assert out["SGD"]["unchanged"] is False  # DeepSpeed really steps at construction
    assert out["our Lamb"] == {"wrapper": "FP16_UnfusedOptimizer", "unchanged": True, "steps": [0]}
    assert out["SGD with SkipsConstructionStep"]["unchanged"] is True


def test_fused_lamb_class_keeps_fusedlambs_name_and_skips_the_construction_step():
    from deepspeed.ops.lamb import FusedLamb

    from pipeline.lamb_deepspeed import SkipsConstructionStep, fused_lamb_class

    cls = fused_lamb_class()
    assert cls.__name__ == "FusedLamb" and issubclass(cls, FusedLamb) and issubclass(cls, SkipsConstructionStep)
    assert cls.__mro__.index(SkipsConstructionStep) < cls.__mro__.index(FusedLamb)  # its step() is asked first


def test_host_sync_counter_counts_torchs_sync_warnings_per_step_and_shows_the_others():
    """On CUDA torch's sync debug mode warns with SYNC_WARNING at every synchronising call; here (no CUDA) the same
    warnings are raised by hand, to check the counting: per step, nothing between steps, other warnings shown."""
    import warnings

    from pipeline.metrics import SYNC_WARNING, HostSyncCounter

    with warnings.catch_warnings(record=True) as shown:
        counter = HostSyncCounter(enabled=True)
        try:
            for syncs in (2, 1, 1):
                counter.begin_step()
                for _ in range(syncs):
                    warnings.warn(SYNC_WARNING, UserWarning, stacklevel=1)  # one call site: each is counted
                counter.end_step()
                warnings.warn(SYNC_WARNING, UserWarning, stacklevel=1)  # logging between steps: not the step's
            warnings.warn("something else", UserWarning, stacklevel=1)
            assert counter.read() == {"host_syncs_per_step": 4 / 3, "host_syncs_max_step": 2}
            assert counter.read() == {"host_syncs_per_step": None, "host_syncs_max_step": None}  # since the last read
        finally:
            counter.close()
    assert [str(w.message) for w in shown] == ["something else"]
    off = HostSyncCounter.for_device(torch.device("cpu"))
    off.begin_step()
    off.end_step()
    assert off.read() == {"host_syncs_per_step": None, "host_syncs_max_step": None}


COMM_TIME = """
import json, torch, deepspeed, deepspeed.comm as ds_dist
from pipeline.distributed import detect_launch, init_distributed
from pipeline.metrics import comm_time

init_distributed(detect_launch(), 60.0)
off = comm_time()
ds_dist.configure(enabled=True, prof_all=True)
for _ in range(3):
    ds_dist.all_reduce(torch.ones(1000))
print(json.dumps([off, comm_time(), comm_time()]))
"""


@pytest.mark.slow
def test_comm_time_reads_deepspeeds_comms_logger():
    result = launched_as({"DS_ACCELERATOR": "cpu"}, COMM_TIME)
    assert result.returncode == 0, result.stderr[-3000:]
    off, measured, again = json.loads(result.stdout.splitlines()[-1])
    assert off == {"comm_sec": None, "comm_ops": None}  # the logger is off unless the config switches it on
    assert measured["comm_ops"] == 3 and measured["comm_sec"] > 0
    assert again == {"comm_sec": 0.0, "comm_ops": 0}  # read since the last call


def test_compile_counters_are_recorded_in_run_info(tmp_path):
    """A real torch.compile (eager backend: Dynamo only) of a function with a graph break."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pipeline.metrics import record_compile_counters, write_run_info

    def breaks(x: torch.Tensor) -> torch.Tensor:
        x = x * 2
        torch._dynamo.graph_break()
        return x + 1

    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(torch.compile(breaks, backend="eager")(torch.ones(3)), torch.full((3,), 3.0))
    write_run_info(tmp_path, {"compile": {"enabled": True, "off_reason": None}, "layout": {"world_size": 1}})
    recorded = record_compile_counters(tmp_path)
    info = json.loads((tmp_path / "run-info.json").read_text())
    assert info["compile"]["counters"] == recorded and info["layout"] == {"world_size": 1}
    assert recorded["graph_breaks"] >= 1 and recorded["unique_graphs"] == 2 and recorded["fallbacks"] == 0
    assert recorded["frames_converted"] >= 1 and len(recorded["graph_break_reasons"]) >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_lamb_starts_as_our_lamb_under_the_bf16_wrapper_on_cuda():
    """DeepSpeed's real FusedLamb (JIT-built) under FP16_UnfusedOptimizer: the construction step changes nothing."""
    result = launched_as({"DS_ACCELERATOR": "cuda"}, CONSTRUCTION)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["FusedLamb"] == {"wrapper": "FP16_UnfusedOptimizer", "unchanged": True, "steps": []}  # no state yet
    assert out["our Lamb"]["unchanged"] is True and out["SGD"]["unchanged"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_sync_counter_counts_a_real_sync_on_cuda():
    from pipeline.metrics import HostSyncCounter

    counter = HostSyncCounter.for_device(torch.device("cuda"))
    try:
        x = torch.ones(4, device="cuda")
        counter.begin_step()
        y = x * 2  # no sync
        counter.end_step()
        counter.begin_step()
        assert y.sum().item() == 8.0  # one sync: the read
        counter.end_step()
        assert counter.read() == {"host_syncs_per_step": 0.5, "host_syncs_max_step": 1}
    finally:
        counter.close()
    assert torch.cuda.get_sync_debug_mode() == 0
