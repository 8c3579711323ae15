"""How distributed runs start and fail: the environment taken from SLURM, and failures that end
every rank in bounded time with one error line instead of a hang.

The ranks here are plain processes given RANK/WORLD_SIZE/MASTER_* as srun's tasks get them, not
torchrun's workers: torchrun kills the other workers when one fails, which would hide a hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, SMALL_RUN
from helpers import SMALL
from trainer import distributed



# ---- the environment under SLURM ----------------------------------------------------------------

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
              "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[1-2]",
              "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No SLURM or torch variables; the whole environment is put back afterwards, including what
    the code under test set (monkeypatch restores only the keys it touched itself)."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))] + list(TORCH_VARS):
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_srun_step_fills_the_torch_variables(clean_env):
    for key, value in SLURM_STEP.items():
        clean_env.setenv(key, value)
    distributed._export_slurm_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "0")
    assert os.environ["MASTER_ADDR"] == "node1"  # the job's first host
    assert os.environ["LOCAL_WORLD_SIZE"] == "1"
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000


def test_variables_the_batch_script_exported_are_kept(clean_env):
    """submitit's export() raises when MASTER_ADDR/PORT exist; only what is missing is filled."""
    for key, value in SLURM_STEP.items():
        clean_env.setenv(key, value)
    clean_env.setenv("MASTER_ADDR", "head.example")
    clean_env.setenv("MASTER_PORT", "29555")
    distributed._export_slurm_env()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head.example", "29555")
    assert os.environ["RANK"] == "1"


def test_world_size_is_the_steps_not_the_jobs(clean_env):
    for key, value in {**SLURM_STEP, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2"}.items():
        clean_env.setenv(key, value)
    distributed._export_slurm_env()
    assert os.environ["WORLD_SIZE"] == "2"


def test_plain_process_in_a_multi_task_allocation_is_refused(clean_env):
    """A batch script (no srun step) of a 2-task job is one process: it must not wait for a peer."""
    step = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    for key, value in {**step, "SLURM_PROCID": "0"}.items():
        clean_env.setenv(key, value)
    with pytest.raises(distributed.SlurmStepError, match="not in an srun step"):
        distributed._export_slurm_env()
    assert "RANK" not in os.environ


def test_torchrun_variables_win(clean_env):
    for key, value in {**SLURM_STEP, "RANK": "0", "WORLD_SIZE": "3"}.items():
        clean_env.setenv(key, value)
    distributed._export_slurm_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "3")
    assert "MASTER_ADDR" not in os.environ


# ---- failures end every rank in bounded time ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str], port: int, world: int = 2, addr: str = "127.0.0.1") -> list[subprocess.Popen]:
    ranks = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
               "PYTHONUNBUFFERED": "1"}
        ranks.append(subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return ranks


def finish(ranks: list[subprocess.Popen], within_s: float) -> list[tuple[int, str, float]]:
    """(exit code, stderr, seconds) of each rank; kills them all and fails if one outlives `within_s`."""
    start, results = time.monotonic(), []
    try:
        for p in ranks:
            _, err = p.communicate(timeout=max(1.0, within_s - (time.monotonic() - start)))
            results.append((p.returncode, err, time.monotonic() - start))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank still ran after {within_s} s: a hang")
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    return results


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_unresolvable_master_is_one_error_line_at_once(beton_dir, tmp_path):
    args = ["--config", str(SMALL), "--run-dir", str(tmp_path / "run"), f"data.dir={beton_dir}", *SMALL_RUN]
    results = finish(start_ranks(args, free_port(), addr="no-such-host.invalid"), within_s=60)
    for code, err, _ in results:
        assert code == 1, err
        assert len(error_lines(err)) == 1 and "MASTER_ADDR=no-such-host.invalid does not resolve" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_taken_master_port_fails_within_the_timeout(beton_dir, tmp_path):
    """Rank 0 cannot listen; rank 1 reaches a socket that never answers and gives up at the timeout."""
    args = ["--config", str(SMALL), "--run-dir", str(tmp_path / "run"), f"data.dir={beton_dir}", *SMALL_RUN,
            "train.dist_timeout_s=6"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        results = finish(start_ranks(args, squatter.getsockname()[1]), within_s=120)
    for rank, (code, err, _) in enumerate(results):
        assert code == 1, f"rank {rank}: {err}"
        lines = error_lines(err)
        assert len(lines) == 1 and f"rank {rank}" in lines[0] and "cannot join the process group" in lines[0], err
        assert "Traceback" not in err
    assert "port is taken" in results[0][1]


@pytest.mark.slow
def test_error_on_rank_0_only_ends_every_rank_long_before_the_timeout(beton_dir, tmp_path):
    """Rank 0 cannot write its checkpoint (the folder's place is taken by a file: root ignores
    permissions) while rank 1 trains on. Rank 1 must not wait out the group timeout in its next
    collective, nor rank 0 in a barrier: both end within seconds, the cause named once."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder\n")
    timeout_s = 240
    # An epoch of 4 steps: the failure comes with the first checkpoint, at its end.
    args = ["--config", str(SMALL), "--run-dir", str(run_dir), f"data.dir={beton_dir}", *SMALL_RUN,
            "data.train_subset=400", "data.test_subset=100", f"train.dist_timeout_s={timeout_s}"]
    (code0, err0, t0), (code1, err1, t1) = finish(start_ranks(args, free_port()), within_s=timeout_s)
    assert code0 == 1 and code1 == 1, (err0, err1)
    assert len(error_lines(err0)) == 1 and "checkpoints" in error_lines(err0)[0], err0
    assert len(error_lines(err1)) == 1 and "rank 1" in err1 and "lost the other ranks" in err1, err1
    assert "checkpoints" not in error_lines(err1)[0]  # the cause is named once, by the rank that met it
    assert "Traceback" not in err0 + err1
    assert abs(t1 - t0) < 30 < timeout_s, (t0, t1)


# ---- torch.compile under DDP ------------------------------------------------------------------------


def _compiled_ddp_backward(rank: int, port: int, calls) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.models import build

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        def backend(gm, example_inputs):  # counts the graphs handed to the compiler
            calls.append(len(gm.graph.nodes))
            return gm.forward

        torch.manual_seed(0)
        model = build("resnet9_tiny")  # 1.6 MB of weights: two buckets of 1 MB
        # The trainer's order: the module compiled, then wrapped.
        net = DDP(torch.compile(model, backend=backend), bucket_cap_mb=1)
        net(torch.randn(4, 3, 32, 32)).sum().backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_module_under_ddp_is_split_at_the_buckets():
    """The trainer compiles the module and wraps it in DDP (trainer.py): dynamo still sees DDP's forward
    active and its DDPOptimizer cuts the graph at the bucket boundaries, one compiled piece per
    bucket, so each bucket's all-reduce can start while the backward computes the earlier layers."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        calls = manager.list()
        mp.spawn(_compiled_ddp_backward, args=(free_port(), calls), nprocs=2)
        assert len(calls) == 2 * 2, list(calls)  # two pieces on each rank
