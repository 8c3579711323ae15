"""The trainer as users run it: in this process through its main(argv) (tests/helpers.run_main), on the
test CIFAR-10 (conftest), ffcv, offline W&B; under torchrun with gloo DDP; then its parts
(checkpoint, schedule, evaluation) on their own.

Every exact-resume proof here compares with one uninterrupted run of the same config, trained once
a session (conftest.small_reference), and pays only for its own interrupted and resumed run."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cluster_tools
from conftest import EVERY_STEP, FAKE_WANDB_KEY, REPO, signal_at_step, small_run_args
from helpers import Result, SMALL, run_main
from wandb_records import config as wandb_config
from wandb_records import history, read_records

SUMMARY_FIELDS = {
    "test_acc", "best_test_acc", "best_epoch", "train_acc", "gap", "params", "arch", "epochs_run", "wall_time_s",
    "gpu_seconds", "world_size", "device", "torch_version", "git_sha", "data",
}
small = small_run_args


def trainer(*args: str, env: dict | None = None) -> Result:
    """`python -m trainer ARGS`, run in this process: exit code, stdout and stderr as a subprocess's."""
    return run_main("trainer", *args, env=env)


def assert_same_weights(a: Path, b: Path) -> None:
    """The network's and its EMA's final weights, bit for bit."""
    cluster_tools.assert_same_weights(a, b, parts=("model", "ema"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trains_and_writes_run_folder(small_reference):
    rows = metrics(small_reference)
    assert [m["epoch"] for m in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((small_reference / "summary.json").read_text())
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["best_test_acc"] == max(m["test_acc"] for m in rows) and summary["epochs_run"] == 3
    assert summary["test_acc"] == rows[-1]["test_acc"]
    assert summary["gap"] == pytest.approx(summary["train_acc"] - summary["best_test_acc"])
    assert summary["compile_s"] == 0.0 and all(m["compile_s"] == 0.0 for m in rows)  # not compiled on a CPU
    assert summary["data"]["train_sha256"] and summary["arch"] == "resnet9_tiny"
    best = torch.load(small_reference / "checkpoints/best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"] and best["test_acc"] == summary["best_test_acc"]
    # Saved from the raw module: no DDP/compile prefixes in the names.
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in best["model"])
    assert (small_reference / "config.yaml").read_text().startswith("model:")


@pytest.fixture(scope="module")
def paused_after_2(beton_dir, tmp_path_factory) -> Path:
    """The reference's config with offline W&B, paused by --stop-after-epoch 2: the start of the
    epoch-boundary, truncated-checkpoint, mid-epoch-signal and non-finite-loss tests, each of
    which resumes its own copy."""
    run_dir = tmp_path_factory.mktemp("paused") / "run"
    first = trainer(*small(beton_dir, "logging.mode=offline"), "--run-dir", str(run_dir), "--stop-after-epoch", "2")
    assert first.returncode == 0, first.stderr
    assert "stopped after epoch 2" in first.stdout and not (run_dir / "summary.json").exists()
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run", symlinks=True))


@pytest.mark.slow
def test_resume_at_epoch_boundary_is_exact(small_reference, paused_after_2, tmp_path):
    run_dir = copy_of(paused_after_2, tmp_path)
    second = trainer("--run-dir", str(run_dir), "logging.mode=offline")  # the run's own config.yaml
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout and "from epoch 3, step 0" in second.stdout
    assert_same_weights(run_dir, small_reference)
    assert [m["test_acc"] for m in metrics(run_dir)] == [m["test_acc"] for m in metrics(small_reference)]
    # Both segments wrote to the same W&B run.
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(run_ids) == 1


def test_sigusr2_mid_epoch_checkpoints_then_resumes_exactly(small_reference, paused_after_2, tmp_path, monkeypatch):
    # The real SIGUSR2, sent by the trainer to its own process right after step 70 (epoch 3, step
    # 10); the real handler and stop check act on it. A separate process signalled from outside:
    # test_signals.
    run_dir = copy_of(paused_after_2, tmp_path)
    signal_at_step(monkeypatch, 70)
    stopped_run = trainer("--run-dir", str(run_dir), EVERY_STEP)
    assert stopped_run.returncode == 0, stopped_run.stderr
    assert "stopped by signal SIGUSR2 in epoch 3 at step 10" in stopped_run.stdout
    stopped = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["epoch_step"], stopped["global_step"]) == (2, 10, 70)
    assert not (run_dir / "summary.json").exists()
    monkeypatch.undo()

    again = trainer("--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert "from epoch 3, step 10" in again.stdout
    assert (run_dir / "summary.json").exists()
    assert_same_weights(run_dir, small_reference)
    assert [m["test_acc"] for m in metrics(run_dir)] == [m["test_acc"] for m in metrics(small_reference)]


def record_result(run_dir: Path, out: Path, monkeypatch) -> None:
    """`python jobs/record_result.py RUN_DIR OUT`, in this process."""
    monkeypatch.setattr(sys, "argv", ["jobs/record_result.py", str(run_dir), str(out)])
    runpy.run_path(str(REPO / "jobs/record_result.py"), run_name="__main__")


@pytest.mark.slow
def test_eval_every_evaluates_and_saves_only_its_epochs_and_resumes_exactly(small_reference, beton_dir, tmp_path,
                                                                           monkeypatch):
    """train.eval_every=2 over 3 epochs: epoch 2 and the last are evaluated and checkpointed, epoch 1
    only logged; a pause after epoch 1 still saves last.pt, and training is the same as evaluating
    every epoch (evaluation changes no weight and draws no random number)."""
    from trainer.report import make_report
    from trainer.report.runs import read_run

    run_dir = tmp_path / "run"
    first = trainer(*small(beton_dir, "train.eval_every=2"), "--run-dir", str(run_dir), "--stop-after-epoch", "1")
    assert first.returncode == 0, first.stderr
    assert "(not evaluated: train.eval_every=2)" in first.stdout
    (row,) = metrics(run_dir)
    assert not any(k.startswith(("test_", "val_")) for k in row) and row["train_loss"] > 0
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["epoch"] == 1  # saved for the pause
    assert not (run_dir / "checkpoints/best.pt").exists()
    paused = tmp_path / "paused"
    shutil.copytree(run_dir, paused)

    again = trainer("--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    rows = metrics(run_dir)
    assert [("test_acc" in m) for m in rows] == [False, True, True]
    assert_same_weights(run_dir, small_reference)
    every = metrics(small_reference)
    assert [m["test_acc"] for m in rows[1:]] == [m["test_acc"] for m in every[1:]]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_test_acc"] == max(m["test_acc"] for m in rows[1:]) and summary["best_epoch"] in (2, 3)
    assert summary["test_acc"] == rows[-1]["test_acc"]
    assert torch.load(run_dir / "checkpoints/best.pt", weights_only=True)["epoch"] == summary["best_epoch"]
    run = read_run("resnet9_tiny", run_dir)  # the report reads a line without test figures
    assert run.status == "finished" and run.problem is None and len(run.metrics) == 3
    (tmp_path / "report/resnet9_tiny").parent.mkdir()
    (tmp_path / "report/resnet9_tiny").symlink_to(run_dir)
    report = make_report(tmp_path / "report", deploy=False, use_ensemble=False, wandb_mode="disabled", out=print)
    assert report.rows[0]["status"] == "finished" and len(list((tmp_path / "report/plots").glob("*.png"))) == 4
    record_result(run_dir, tmp_path / "recorded", monkeypatch)
    assert f"| 1 | {rows[0]['train_acc']:.2f} | - |" in (tmp_path / "recorded/README.md").read_text()

    # Resumed with a config that ends the run at once (train.epochs lowered to the paused epoch): the
    # run still ends evaluated, in a line of its own.
    ended = trainer("--run-dir", str(paused), "train.epochs=1")
    assert ended.returncode == 0, ended.stderr
    assert "evaluated at the run's end" in ended.stdout
    first_row, end_row = metrics(paused)
    assert "test_acc" not in first_row and end_row["epoch"] == 1 and end_row["steps"] == 0
    summary = json.loads((paused / "summary.json").read_text())
    assert summary["test_acc"] == end_row["test_acc"] == summary["best_test_acc"] and summary["best_epoch"] == 1
    assert summary["train_acc"] == first_row["train_acc"]
    assert read_run("resnet9_tiny", paused).problem is None


@pytest.mark.slow
def test_truncated_last_checkpoint_falls_back_to_previous_and_resumes_exactly(small_reference, paused_after_2,
                                                                               tmp_path):
    run_dir = copy_of(paused_after_2, tmp_path)
    last = run_dir / "checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    r = trainer("--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "last.pt is unreadable" in r.stderr
    assert "from epoch 2, step 0" in r.stdout  # prev.pt: the state after epoch 1
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 3
    assert_same_weights(run_dir, small_reference)  # epoch 2 trained again, onto the same weights


@pytest.mark.slow
def test_nonfinite_loss_stops_with_message_and_keeps_checkpoints(paused_after_2, tmp_path, monkeypatch):
    from trainer.training.trainer import Trainer

    run_dir = copy_of(paused_after_2, tmp_path)
    best_before = (run_dir / "checkpoints/best.pt").read_bytes()
    train_step = Trainer._train_step

    def poisoned(self, *args, **kwargs):  # weights gone to NaN in epoch 3 (a resume may not change optim.lr)
        train_step(self, *args, **kwargs)
        if self.progress.global_step == 63:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(Trainer, "_train_step", poisoned)
    r = trainer("--run-dir", str(run_dir))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: non-finite training loss at epoch 3, step "), r.stderr
    assert (run_dir / "checkpoints/best.pt").read_bytes() == best_before
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["epoch"] == 2
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["optim.lrr=0.1"], "unknown key 'optim.lrr'"),
        (["data.dir=/nonexistent/cifar"], "/nonexistent/cifar/train.beton: not found"),
        ([], "pass --config FILE"),
    ],
)
def test_bad_input_is_one_error_line(args, fragment, tmp_path):
    config = ["--config", str(SMALL)] if args else []
    r = trainer(*config, "--run-dir", str(tmp_path / "run"), *args)
    assert r.returncode == 1
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert fragment in r.stderr


@pytest.mark.slow
def test_two_process_gloo_ddp_with_offline_wandb(two_rank_run):
    # conftest.two_rank_run: paused mid-epoch 2 by a signal to rank 1, then resumed to the end.
    run_dir, r = two_rank_run.run_dir, two_rank_run.resumed
    # data.batch_size=100 is the global batch: 50 a rank, the 20 steps an epoch one process takes.
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["global_step"] == 2 * 2000 // 100
    rows = metrics(run_dir)
    assert [m["epoch"] for m in rows] == [1, 2] and rows[1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert two_rank_run.paused.stdout.count("epoch   1 ") == 1  # only rank 0 logs
    assert "from epoch 2, step 7" in r.stdout and r.stdout.count("epoch   2 ") == 1

    # The offline W&B run (one run in two segments, before and after the pause) holds the logged
    # test accuracies and the config.
    wandb_files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 2 and len({p.parent.name.rsplit("-", 1)[-1] for p in wandb_files}) == 1
    records = [read_records(p) for p in wandb_files]
    logged = [row["test/acc"] for segment in records for row in history(segment) if "test/acc" in row]
    assert logged == pytest.approx([m["test_acc"] for m in rows])
    cfg = wandb_config(records[0])
    assert cfg["arch"] == "resnet9_tiny" and cfg["optim"]["label_smoothing"] == 0.2
    assert "wandb sync" in r.stdout

    # The API key is nowhere in the run folder.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_WANDB_KEY.encode() not in path.read_bytes(), path


def relative_distance(a: dict, b: dict) -> float:
    """|a - b| / |b| over every floating-point tensor of two state dicts."""
    keys = [k for k in b if b[k].is_floating_point()]
    return (sum((a[k].double() - b[k].double()).square().sum() for k in keys)
            / sum(b[k].double().square().sum() for k in keys)).sqrt().item()


@pytest.mark.slow
def test_compiled_ddp_keeps_ranks_in_sync_and_matches_one_process(beton_dir, tmp_path):
    """torch.compile under DDP: the ranks end with the same weights, close to one process's with the
    same global batch (not equal: each rank's BatchNorm sees its own half of the batch), and nothing
    is logged but torchrun's banner. aot_eager: dynamo's graphs, DDP's bucket split and AOT autograd
    as with inductor, without its minutes of code generation here."""
    args = small(beton_dir, "data.loader=resident", "data.train_subset=600", "data.test_subset=100", "train.epochs=2",
                 "train.ema=0", "train.tta=false", "train.amp=false")  # fp32: the comparison is about DDP, not bf16
    one = trainer(*args, "--run-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer", *args,
         "train.compile=true", "--run-dir", str(tmp_path / "ddp")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRAINER_COMPILE_BACKEND": "aot_eager", "TRAINER_STRICT_COLLECTIVES": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True and summary["compile_s"] > 0
    # No warnings, graph-break reports or tracebacks: only torchrun's banner about OMP_NUM_THREADS.
    noise = [ln for ln in r.stderr.splitlines() if ln.strip() and "OMP_NUM_THREADS" not in ln and set(ln) != {"*"}]
    assert noise == [], r.stderr[-3000:]
    ddp_rows, one_rows = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert [m["train_loss"] for m in ddp_rows] == pytest.approx([m["train_loss"] for m in one_rows], abs=0.05)
    ddp_weights = torch.load(tmp_path / "ddp/checkpoints/last.pt", weights_only=True)["model"]
    one_weights = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)["model"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ddp_weights)  # saved from the plain module
    # Measured 0.04; unaveraged gradients (twice the step) or ranks training apart land far outside.
    assert relative_distance(ddp_weights, one_weights) < 0.15


def test_wandb_mode_auto(monkeypatch, tmp_path):
    from trainer.logger import resolve_wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_time_budget_s_is_gone_but_old_run_folders_still_load(tmp_path):
    # train.time_budget_s cut a run off after the epoch that passed it; train.budget_s fits the
    # schedule to the time instead, and two stop mechanisms were one too many. A run folder written
    # before holds `time_budget_s: 0.0` in its config.yaml and still loads (and resumes); asking
    # for the cut-off is one error naming its replacement and where the value came from.
    from trainer.config import ConfigError, load_config, to_yaml

    cfg = load_config(SMALL)
    old = tmp_path / "config.yaml"
    old.write_text(to_yaml(cfg).replace("train:\n", "train:\n  time_budget_s: 0.0\n", 1))
    assert "time_budget_s: 0.0" in old.read_text()
    assert load_config(old) == cfg
    assert load_config(old, ["train.time_budget_s=0"]) == cfg
    replacement = "train.time_budget_s: removed; use train.budget_s=N"
    with pytest.raises(ConfigError) as info:
        load_config(SMALL, ["train.time_budget_s=60"])
    assert str(info.value).startswith(f"override 'train.time_budget_s=60': {replacement}"), info.value
    old.write_text(old.read_text().replace("time_budget_s: 0.0", "time_budget_s: 30"))
    with pytest.raises(ConfigError) as info:
        load_config(old)
    assert str(info.value).startswith(f"{old}: {replacement}") and "\n" not in str(info.value), info.value


# ---- the parts of trainer/training/, without data or training --------------------------------


def test_checkpoint_round_trip_restores_progress_state_and_rng(tmp_path):
    from torch.optim.lr_scheduler import LambdaLR

    from trainer import UserError
    from trainer.config import load_config
    from trainer.distributed import Dist
    from trainer.training import checkpoint
    from trainer.training.optim import lr_lambda, param_groups
    from trainer.training.progress import Best, Progress

    cfg = load_config(SMALL)
    group = Dist.single()

    def parts(seed: int) -> dict:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
        return {"model": model, "ema": None, "optimizer": optimizer,
                "scheduler": LambdaLR(optimizer, lr_lambda(100, 10, "triangle")),
                "scaler": torch.amp.GradScaler("cpu", enabled=False)}

    saved = parts(0)
    saved["model"](torch.randn(8, 4)).sum().backward()
    saved["optimizer"].step()
    saved["scheduler"].step()
    progress = Progress(epoch=2, epoch_step=5, global_step=25, best=Best(41.5, 2, 50.0, 3.0), bad_epochs=1,
                        elapsed_s=7.5, last_test_acc=40.0, wandb_run_id="abc123")
    sums = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    checkpoint.Checkpointer(tmp_path, saved, group, cfg).save_last(progress, sums)
    expected_draw = torch.rand(3)

    state = torch.load(tmp_path / "last.pt", weights_only=True)  # plain values and tensors only
    assert (state["epoch"], state["epoch_step"], state["arch"]) == (2, 5, cfg.model.arch)
    restored, restored_sums = parts(1), torch.zeros(3, dtype=torch.float64)
    assert checkpoint.Checkpointer(tmp_path, restored, group, cfg).resume(restored_sums) == progress
    assert torch.equal(torch.rand(3), expected_draw)  # the generators continue where they were saved
    assert torch.equal(restored_sums, sums)
    for key, value in saved["model"].state_dict().items():
        assert torch.equal(restored["model"].state_dict()[key], value), key
    momentum = [st["momentum_buffer"] for st in saved["optimizer"].state_dict()["state"].values()]
    assert all(torch.equal(st["momentum_buffer"], m)
               for st, m in zip(restored["optimizer"].state_dict()["state"].values(), momentum, strict=True))
    assert restored["scheduler"].state_dict() == saved["scheduler"].state_dict()

    other = load_config(SMALL, ["model.arch=resnet9"])
    with pytest.raises(UserError, match="holds a 'resnet9_tiny' run, not 'resnet9'"):
        checkpoint.Checkpointer(tmp_path, parts(1), group, other).resume(torch.zeros(3, dtype=torch.float64))


def test_schedules_warm_up_linearly_then_decay_to_zero():
    from trainer.training.optim import lr_lambda

    triangle, cosine = lr_lambda(100, 10, "triangle"), lr_lambda(100, 10, "cosine")
    for f in (triangle, cosine):
        assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0]) and f(10) == 1.0 and f(100) == 0.0
    assert triangle(55) == pytest.approx(0.5) and cosine(55) == pytest.approx(0.5)
    assert triangle(30) == pytest.approx(1 - 20 / 90) and cosine(30) > triangle(30)


def test_evaluate_counts_and_averages_the_mirror_image_with_tta():
    from trainer.training.evaluate import evaluate, predict

    class LeftColumn(torch.nn.Module):
        """Logits from the left column only, so the mirror image gives different ones."""

        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * x[:, :, 0]

    net = LeftColumn()
    # (batch, class, width): the first image's left column says class 0, the mean of both columns class 1.
    x = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[0.0, 0.0], [2.0, 0.0]]])
    y = torch.tensor([1, 1])
    assert torch.equal(predict(net, x, tta=False, amp_dtype=None), x[:, :, 0])
    assert torch.equal(predict(net, x, tta=True, amp_dtype=None), x.mean(-1))
    assert predict(net, x, tta=False, amp_dtype=torch.bfloat16).dtype == torch.float32
    assert evaluate(net, [(x, y)], tta=False, amp_dtype=None)[1] == 50.0
    loss, acc = evaluate(net, [(x[:1], y[:1]), (x[1:], y[1:])], tta=True, amp_dtype=None)
    assert acc == 100.0 and loss == pytest.approx(torch.nn.functional.cross_entropy(x.mean(-1), y).item())
    assert net.training is False
