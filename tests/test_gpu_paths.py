"""The trainer's GPU paths, checked as far as a CPU allows (issue 11, section 3): tensors handed to
collectives made on the training device, no host syncs inside a training step, one eval graph,
ffcv pipelines that keep each batch on one device, per-process RNG state, threads under srun, and
data.batch_size as the global batch. Tests marked `gpu` run only where CUDA is."""

import os

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import SMALL_RUN
from helpers import SMALL, run_main
from trainer import UserError
from trainer.config import DataConfig, load_config
from trainer.data.common import default_threads, per_process_batch
from trainer.distributed import Dist
from trainer.training import checkpoint, collectives
from trainer.training.ema import EMA
from trainer.training.evaluate import evaluate

CPU = torch.device("cpu")


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))


# ---- strict collectives and the EMA ----------------------------------------------------------------


@pytest.fixture
def strict(monkeypatch):
    """Strict collectives, as TRAINER_STRICT_COLLECTIVES=1 sets them at import, with a fresh record."""
    monkeypatch.setattr(collectives, "STRICT", True)
    monkeypatch.setattr(collectives, "_tracker", collectives._PlacementTracker())


def test_strict_mode_catches_the_ema_counter_made_without_a_device(strict):
    with collectives.tracking():
        model = small_net().to(CPU)
        old = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)  # the trainer's old EMA
        new = EMA(model, 0.9, CPU)
        for _ in range(2):  # AveragedModel's update moves a copy of its counter: still a CPU tensor on a GPU
            old.update_parameters(model)
            new.update(model)
    # The model's own buffers were made without a device too, but then moved with .to(device).
    collectives.check(list(model.buffers()), CPU, "broadcast")
    with pytest.raises(collectives.StrictCollectiveError, match="created without device="):
        collectives.check(list(old.buffers()), CPU, "broadcast")  # n_averaged: a CPU tensor on a GPU too
    collectives.check(list(new.buffers()), CPU, "broadcast")
    with pytest.raises(collectives.StrictCollectiveError, match="is on cpu, not meta"):
        collectives.check([torch.zeros(1, device=CPU)], torch.device("meta"), "all_reduce_sum")


def test_ema_matches_averaged_model_and_loads_its_state():
    torch.manual_seed(0)
    model = small_net()
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = EMA(model, 0.9, CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        model(torch.randn(8, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        reference.update_parameters(model)
        ema.update(model)
    assert reference.state_dict().keys() == ema.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(value, ema.state_dict()[name]), name
    # A checkpoint written with AveragedModel resumes the average where it was.
    resumed = EMA(small_net(), 0.9, CPU)
    resumed.load_state_dict(reference.state_dict())
    assert resumed.started and int(resumed.n_averaged) == 4


# ---- no host syncs inside a step ---------------------------------------------------------------------


class HostTraffic(TorchDispatchMode):
    """The ops that on a GPU move data between host and device on the host's time: reading a value
    (.item(), bool(), .tolist()) and making a tensor from Python data (torch.tensor, new_tensor)."""

    SYNCS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default", "aten.lift_fresh_copy.default"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.SYNCS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def cpu_trainer(beton_dir, tmp_path_factory):
    from trainer.training.trainer import Trainer

    cfg = load_config(SMALL, [f"data.dir={beton_dir}", *SMALL_RUN, "data.loader=resident", "data.test_subset=250"])
    return Trainer(cfg, tmp_path_factory.mktemp("run"), Dist.single())


@pytest.mark.slow
def test_a_training_step_reads_nothing_back_and_copies_nothing_in(cpu_trainer):
    trainer = cpu_trainer
    batches = iter(trainer.train_loader)
    trainer._step(trainer.compiled, *next(batches))  # the EMA's first update copies; the next ones average
    with HostTraffic() as traffic:
        for _ in range(2):
            trainer._step(trainer.compiled, *next(batches))
            trainer.progress.global_step += 1
    assert traffic.seen == []
    assert trainer.sums.train[2].item() == 3 * trainer.batch  # the image count still adds up


@pytest.mark.slow
def test_evaluation_pads_the_short_last_batch_and_counts_only_real_images(cpu_trainer):
    trainer = cpu_trainer
    assert len(trainer.test_loader) == 3 and trainer.test_loader.num_samples == 250  # 100, 100, 50
    padded = trainer.evaluate()
    unpadded = evaluate(trainer.ema.module, trainer.test_loader, trainer.cfg.train.tta, trainer.amp_dtype)
    assert padded == pytest.approx(unpadded, rel=1e-4)


@pytest.fixture
def math_flags():
    """Puts back the process-wide math flags a test (or the trainer it builds) changes."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]


def test_fast_cuda_math_turns_on_tf32_and_cudnn_search(math_flags):
    from trainer.device import fast_cuda_math

    fast_cuda_math()
    assert torch.get_float32_matmul_precision() == "high"  # TF32 matmuls (inductor reads this one too)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark


@pytest.mark.gpu
def test_training_steps_on_cuda_make_no_host_sync(beton_dir, tmp_path, math_flags):
    from trainer.training.trainer import Trainer

    device = torch.device("cuda", 0)
    cfg = load_config(SMALL, [f"data.dir={beton_dir}", *SMALL_RUN, "data.loader=resident", "train.compile=false"])
    trainer = Trainer(cfg, tmp_path, Dist(0, 0, 1, device))
    # The trainer's CUDA math is the step bench's (device.fast_cuda_math): TF32 and cuDNN's search.
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    batches = iter(trainer.train_loader)
    trainer._step(trainer.compiled, *next(batches))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer._step(trainer.compiled, *next(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Strict collectives on a GPU: every buffer broadcast before evaluation is on it.
    assert all(b.device == device for b in trainer.ema.buffers())


# ---- one eval graph ----------------------------------------------------------------------------------


def test_compiled_evaluation_compiles_one_graph_for_a_short_last_batch():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    batches = [(torch.randn(n, 3, 8, 8), torch.randint(0, 10, (n,))) for n in (4, 4, 3)]  # 11: not a multiple of 4
    model = small_net()

    def graphs(pad_to):
        torch._dynamo.reset()
        counters.clear()
        net = torch.compile(model, backend="eager")  # dynamo's graphs without inductor's minutes
        results = [evaluate(net, batches, tta=False, amp_dtype=None, pad_to=pad_to) for _ in range(2)]
        assert results[0] == results[1]
        return counters["stats"]["unique_graphs"], results[0]

    unpadded_graphs, unpadded = graphs(None)
    padded_graphs, padded = graphs(4)
    assert unpadded_graphs == 2  # the short batch compiles again: what the padding avoids
    assert padded_graphs == 1
    assert padded == pytest.approx(unpadded, rel=1e-5)


@pytest.mark.slow
def test_compiled_run_reports_compile_time_apart(beton_dir, tmp_path):
    """With torch.compile (inductor, as on a GPU) and no EMA, so that the compiled graph also
    evaluates: the first training step and the eval warm-up are compile time, reported as the part of
    epoch_s (and of the budget) they took."""
    import json

    run_dir = tmp_path / "run"
    args = ["--config", str(SMALL), f"data.dir={beton_dir}", *SMALL_RUN, "data.train_subset=1000",
            "data.test_subset=250", "train.epochs=1", "train.ema=0", "train.compile=true", "--run-dir", str(run_dir)]
    # A cold compile, as a first run: inductor's caches (on disk, kept between test sessions) would
    # otherwise make a repeated run compile in under a second.
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
            "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    r = run_main("trainer", *args, env=cold)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert row["compile_s"] > 1.0 and summary["compile_s"] == row["compile_s"]
    assert summary["wall_time_s"] == pytest.approx(row["epoch_s"]) and row["epoch_s"] > row["compile_s"]  # included
    assert 0 < row["test_acc"] <= 100


# ---- ffcv pipelines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [True, False])
def test_ffcv_pipeline_for_a_gpu_allocates_every_buffer_where_the_batch_is(channels_last):
    """ffcv's own account of each op's output (declare_state_and_memory), for a CUDA device, walked
    without one: no op may fill a CPU buffer once the batch is on the GPU."""
    import numpy as np
    from ffcv.pipeline.state import State
    from ffcv.transforms import ModuleWrapper, ToDevice, ToTensor

    from trainer.data.ffcv_loader import _image_pipeline, _label_pipeline

    cuda = torch.device("cuda", 0)
    cfg = DataConfig(channels_last=channels_last, dtype="bfloat16")
    for ops, shape, dtype in ((_image_pipeline(cfg, True, cuda), (32, 32, 3), np.uint8),
                              (_label_pipeline(cuda), (1,), np.int64)):
        start = next(i for i, op in enumerate(ops) if isinstance(op, ToTensor))
        state = State(jit_mode=True, device=CPU, dtype=dtype, shape=shape)
        for op in ops[start:]:
            op = ModuleWrapper(op) if isinstance(op, nn.Module) else op  # as ffcv's PipelineSpec does
            state, alloc = op.declare_state_and_memory(state)
            if alloc is not None:
                where = alloc.device if alloc.device is not None else CPU
                assert torch.device(where) == torch.device(state.device), f"{type(op).__name__} fills a {where} buffer"
        assert torch.device(state.device) == cuda
        (to_device,) = [op for op in ops if isinstance(op, ToDevice)]
        assert to_device.non_blocking is False  # see ffcv_loader._to_device: ffcv's host buffers are reused


# ---- the RNG state of this process's own GPU -------------------------------------------------------


def test_rng_state_holds_no_gpu_state_on_the_cpu_and_old_checkpoints_load():
    state = checkpoint.rng_state(CPU)
    assert state["cuda"] is None
    expected = torch.rand(3)
    checkpoint.set_rng_state(state, CPU)
    assert torch.equal(torch.rand(3), expected)
    checkpoint.set_rng_state({**state, "cuda": []}, CPU)  # written by get_rng_state_all on a CPU machine
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.gpu
def test_rng_state_saves_and_restores_only_this_process_gpu():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    state = checkpoint.rng_state(device)
    assert isinstance(state["cuda"], torch.Tensor)
    expected = torch.rand(3, device=device)
    checkpoint.set_rng_state(state, device)
    assert torch.equal(torch.rand(3, device=device), expected)
    # An old checkpoint with every visible GPU's state, read by a process that sees only one.
    checkpoint.set_rng_state({**state, "cuda": [state["cuda"]] * (device.index + 1)}, device)
    assert torch.equal(torch.rand(3, device=device), expected)


# ---- threads under srun ------------------------------------------------------------------------------


def test_threads_split_a_shared_affinity_but_not_a_bound_task(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    for name in ("SLURM_CPUS_PER_TASK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus))
    assert default_threads() == 1  # torchrun or plain processes: the affinity is shared
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cpus))
    assert default_threads() == cpus  # srun bound this task to its own cpus-per-task CPUs
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert default_threads() == 1  # torchrun's workers inside one task share its CPUs
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    if cpus > 1:  # SLURM without binding (task/none): the affinity is the node's, shared by its tasks
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        assert default_threads() == 1


# ---- the global batch --------------------------------------------------------------------------------


def test_batch_size_is_global_and_must_divide():
    assert per_process_batch(256, 1) == 256 and per_process_batch(256, 8) == 32
    with pytest.raises(UserError, match=r"data.batch_size=100 \(the global batch\) does not divide among 3 processes"):
        per_process_batch(100, 3)


@pytest.mark.slow
def test_one_and_two_processes_take_the_same_steps_per_epoch(beton_dir):
    from trainer.data.resident import build_resident_loaders

    cfg = DataConfig(dir=str(beton_dir), batch_size=100, num_workers=1, train_subset=1000, test_subset=250)
    one, _ = build_resident_loaders(cfg, Dist(0, 0, 1, CPU), threads=1)
    assert len(one) == 10 and next(iter(one))[0].shape[0] == 100
    for rank in range(2):
        train, test = build_resident_loaders(cfg, Dist(rank, rank, 2, CPU), threads=1)
        batches = list(train)
        assert len(train) == len(batches) == 10 and {b[0].shape[0] for b in batches} == {50}
        assert test.num_samples == 125 and len(test) == 3
