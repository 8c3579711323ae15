"""The validation split (data.val_split): which images it holds out, the loaders that read it, and a
trainer that selects its best epoch, best.pt and early stopping on it while only reporting the test set."""

import hashlib
import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_RUN, write_synthetic_cifar10
from helpers import SMALL, one_error_line, run_main
from wandb_records import history, read_records

from trainer.config import DataConfig
from trainer.data import build_loaders, build_val_loader
from trainer.data.checks import check_beton
from trainer.data.cifar10 import MEAN, STD
from trainer.data.common import train_val_indices, validation_split
from trainer.data.resident import read_beton
from trainer.distributed import Dist

CPU = torch.device("cpu")
# Seconds-long runs: 1,000 training images (10 steps an epoch) learn gradually enough that the
# validation accuracy still rises after epoch 1.
VAL_RUN = [*SMALL_RUN, "data.train_subset=1000", "data.test_subset=200", "data.val_split=200"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def first_argmax(values: list[float]) -> int:
    """The epoch (1-based) of the first maximum: ties keep the earlier epoch, as the trainer does."""
    return int(np.argmax(values)) + 1


# ---- the split and its loaders --------------------------------------------------------------------


def test_split_is_stratified_disjoint_and_fixed_by_its_seed(beton_dir):
    labels = check_beton(beton_dir / "train.beton")  # 5,000 images, 500 of each class
    cfg = DataConfig(dir=str(beton_dir), val_split=500)
    train, val = train_val_indices(labels, cfg)
    assert np.bincount(labels[val], minlength=10).tolist() == [50] * 10
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    # A pure function of (labels, size, seed): every rank and every resume computes the same one.
    assert np.array_equal(train_val_indices(labels, cfg)[1], val)
    other = train_val_indices(labels, replace(cfg, val_seed=1))[1]
    assert np.bincount(labels[other], minlength=10).tolist() == [50] * 10 and not np.array_equal(other, val)
    # train_subset takes the first images of what remains; the held-out ones do not move.
    sub_train, sub_val = train_val_indices(labels, replace(cfg, train_subset=3000))
    assert np.array_equal(sub_val, val) and np.array_equal(sub_train, train[:3000])
    assert np.array_equal(validation_split(labels, 0, 0), np.array([], dtype=np.int64))


def _image_keys(loader) -> list[bytes]:
    return [hashlib.sha1(img.contiguous().numpy().tobytes()).digest() for x, _ in loader for img in x]


@pytest.mark.parametrize("kind", [pytest.param("ffcv", marks=pytest.mark.slow), "resident"])  # ffcv: numba compiles
def test_loaders_train_on_the_rest_and_shard_validation_once_across_ranks(beton_dir, kind):
    cfg = DataConfig(dir=str(beton_dir), batch_size=100, num_workers=1, flip=False, translate=0, val_split=500,
                     loader=kind)
    labels = check_beton(beton_dir / "train.beton")
    val_indices = train_val_indices(labels, cfg)[1]
    train, _ = build_loaders(cfg, Dist.single(CPU), threads=1)
    val = build_val_loader(cfg, Dist.single(CPU), threads=1)
    train_keys, val_keys = _image_keys(train), _image_keys(val)
    # Training (no augmentation here) sees the 4,500 other images, validation the 500 held out.
    assert len(set(train_keys)) == len(train_keys) == 4500 and len(val_keys) == val.num_samples == 500
    assert not set(train_keys) & set(val_keys)
    assert torch.equal(torch.cat([y for _, y in val]), torch.from_numpy(labels[val_indices]))
    # Two ranks: disjoint shards that together are the whole split, each image once, in order.
    shards = [build_val_loader(cfg, Dist(r, r, 2, CPU), threads=1) for r in range(2)]
    assert [s.num_samples for s in shards] == [250, 250]
    assert sum((_image_keys(s) for s in shards), []) == val_keys
    assert build_val_loader(replace(cfg, val_split=0), Dist.single(CPU), threads=1) is None


def test_validation_images_are_the_held_out_training_images_for_both_loaders(beton_dir):
    cfg = DataConfig(dir=str(beton_dir), batch_size=100, num_workers=1, val_split=100, dtype="float32")
    ffcv = build_val_loader(cfg, Dist.single(CPU), threads=1)
    resident = build_val_loader(replace(cfg, loader="resident"), Dist.single(CPU), threads=1)
    for (a, ya), (b, yb) in zip(ffcv, resident, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    # The test pipeline: the stored pixels, unaugmented, although training flips and translates.
    held = train_val_indices(check_beton(beton_dir / "train.beton"), cfg)[1]
    images, _ = read_beton(beton_dir / "train.beton", indices=held)
    first = next(iter(resident))[0][0]
    mean, std = (torch.tensor(v)[:, None, None] for v in (MEAN, STD))
    restored = (first * std + mean) * 255
    assert torch.allclose(restored, images[0].permute(2, 0, 1).float(), atol=0.05)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.val_split=25", "data.val_split: must be a multiple of 10 (N/10 images of each class), got 25"),
        ("data.val_split=-10", "data.val_split: must not be negative, got -10"),
        ("data.val_seed=-1", "data.val_seed: must not be negative, got -1"),
    ],
)
def test_bad_values_are_refused_with_the_key(override, fragment):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(SMALL, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_split_that_leaves_nothing_to_train_on_is_one_error_line(beton_dir, tmp_path):
    # 500 of each class is every training image of the test data.
    r = run_main("trainer", "--config", str(SMALL), "--run-dir", str(tmp_path / "run"), f"data.dir={beton_dir}",
                "data.val_split=5000")
    one_error_line(r, "data.val_split=5000 holds out 500 images of each class, but the training set has 500 of "
                      "class 0, which would leave none to train on; use a smaller data.val_split")
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---- runs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def disagreeing_beton(tmp_path_factory) -> Path:
    """The synthetic CIFAR-10 with every test label moved to the next class, converted by the real
    converter: the better the network learns, the lower its test accuracy, while its validation
    accuracy (held-out training images, true labels) rises. The best-test epoch is then an early
    one and the best-validation epoch a late one, so a selection on the wrong set shows."""
    source = write_synthetic_cifar10(tmp_path_factory.mktemp("disagreeing") / "cifar-10-batches-py")
    batch = pickle.loads((source / "test_batch").read_bytes())
    batch[b"labels"] = [(c + 1) % 10 for c in batch[b"labels"]]
    (source / "test_batch").write_bytes(pickle.dumps(batch, protocol=3))
    from trainer.data.cifar10 import prepare

    out = tmp_path_factory.mktemp("disagreeing-beton")
    prepare(out, source)
    return out


def val_args(data: Path, *extra: str) -> list[str]:
    return ["--config", str(SMALL), f"data.dir={data}", *VAL_RUN, *extra]


@pytest.fixture(scope="module")
def val_run(disagreeing_beton, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("val") / "run"
    r = run_main("trainer", *val_args(disagreeing_beton, "logging.mode=offline"), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    (run_dir / "stdout.txt").write_text(r.stdout)
    return run_dir


@pytest.mark.slow
def test_best_epoch_is_chosen_on_validation_and_the_test_set_only_reported(val_run):
    rows = metrics(val_run)
    summary = json.loads((val_run / "summary.json").read_text())
    val_accs, test_accs = [m["val_acc"] for m in rows], [m["test_acc"] for m in rows]
    best_val, best_test = first_argmax(val_accs), first_argmax(test_accs)
    assert best_val != best_test, rows  # the construction: otherwise this test could not tell them apart
    assert all(m["val_images"] == 200 for m in rows)  # every held-out image, once
    assert summary["selected_by"] == "val"
    assert summary["best_epoch"] == best_val and summary["val_acc"] == max(val_accs)
    assert summary["test_acc_at_best_val"] == test_accs[best_val - 1]
    assert summary["best_test_acc"] == max(test_accs) and summary["best_test_epoch"] == best_test
    assert summary["train_acc"] == rows[best_val - 1]["train_acc"]
    assert summary["gap"] == pytest.approx(summary["train_acc"] - summary["test_acc_at_best_val"])
    split = summary["data"]["val_split"]
    assert (split["images"], split["seed"], split["per_class"]) == (200, 0, 20) and len(split["indices_sha256"]) == 64
    best = torch.load(val_run / "checkpoints/best.pt", weights_only=True)
    assert (best["epoch"], best["val_acc"], best["test_acc"], best["selected_by"]) == (
        best_val, max(val_accs), test_accs[best_val - 1], "val")
    assert f"best validation accuracy {max(val_accs):.2f}% at epoch {best_val}" in (val_run / "stdout.txt").read_text()
    # W&B: val/* beside test/*, one point per epoch.
    (wandb_file,) = (val_run / "wandb").glob("offline-run-*/run-*.wandb")
    logged = [row for row in history(read_records(wandb_file)) if "val/acc" in row]
    assert [row["val/acc"] for row in logged] == pytest.approx(val_accs)
    assert [row["val/loss"] for row in logged] == pytest.approx([m["val_loss"] for m in rows])


@pytest.mark.slow
def test_resume_keeps_the_split_and_the_selection_exact(val_run, disagreeing_beton, tmp_path):
    run_dir = tmp_path / "run"
    first = run_main("trainer", *val_args(disagreeing_beton), "--run-dir", str(run_dir), "--stop-after-epoch", "2")
    assert first.returncode == 0, first.stderr
    # The best epoch so far was chosen on this split: resuming with another one is refused.
    other = run_main("trainer", "--run-dir", str(run_dir), "data.val_seed=1")
    one_error_line(other, "the run was started with data.val_split=200 data.val_seed=0, not 200 and 1")
    again = run_main("trainer", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert "from epoch 3, step 0" in again.stdout
    keys = ("epoch", "val_acc", "val_loss", "test_acc", "test_loss", "train_loss")
    assert [{k: m[k] for k in keys} for m in metrics(run_dir)] == [{k: m[k] for k in keys} for m in metrics(val_run)]
    resumed, whole = (json.loads((d / "summary.json").read_text()) for d in (run_dir, val_run))
    for key in ("selected_by", "val_acc", "test_acc_at_best_val", "best_test_acc", "best_test_epoch", "best_epoch"):
        assert resumed[key] == whole[key], key
    assert resumed["data"]["val_split"] == whole["data"]["val_split"]
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(d / "checkpoints" / name, weights_only=True)["model"] for d in (run_dir, val_run))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_two_processes_evaluate_each_validation_image_once(two_rank_run):
    # The session's 2-rank gloo run (conftest.two_rank_run: data.val_split=250, strict collectives),
    # paused and resumed: every epoch's validation still counts each held-out image once.
    rows = metrics(two_rank_run.run_dir)
    assert [m["epoch"] for m in rows] == [1, 2]
    assert all(m["val_images"] == 250 for m in rows)  # 125 a rank, summed: not 2 x 250
    summary = json.loads((two_rank_run.run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and summary["selected_by"] == "val"
    assert summary["val_acc"] == max(m["val_acc"] for m in rows)
    assert summary["data"]["val_split"]["images"] == 250


def test_old_checkpoints_load_with_the_selection_they_made():
    """A progress record written before the split existed (no val fields) resumes as a test-selected run."""
    from trainer.training.progress import Best, Progress

    old = {"epoch": 4, "epoch_step": 0, "global_step": 40, "best": {"test_acc": 61.0, "epoch": 3, "train_acc": 70.0,
           "elapsed_s": 9.0}, "bad_epochs": 1, "elapsed_s": 12.0, "last_test_acc": 60.0, "wandb_run_id": None}
    progress = Progress.from_dict(old)
    assert progress.best == Best(61.0, 3, 70.0, 9.0, None) and progress.compile_s == 0.0
    assert (progress.best_test_acc, progress.best_test_epoch, progress.last_val_acc) == (61.0, 3, None)
    assert Progress.from_dict(progress.to_dict()) == progress


def test_selection_follows_validation_and_keeps_the_best_test_apart():
    from trainer.training.progress import Progress

    progress = Progress()
    chosen = []
    for epoch, (val, test) in enumerate([(50.0, 40.0), (60.0, 45.0), (55.0, 70.0), (60.0, 50.0)], start=1):
        progress.epoch = epoch
        chosen.append(progress.record_epoch(test, val, train_acc=80.0))
    assert chosen == [True, True, False, False]  # a tie keeps the earlier epoch
    assert (progress.best.epoch, progress.best.val_acc, progress.best.test_acc) == (2, 60.0, 45.0)
    assert (progress.best_test_acc, progress.best_test_epoch, progress.bad_epochs) == (70.0, 3, 2)
    without = Progress()
    for epoch, test in enumerate([40.0, 70.0, 50.0], start=1):
        without.epoch = epoch
        without.record_epoch(test, None, train_acc=80.0)
    assert (without.best.epoch, without.best.test_acc, without.best_test_epoch) == (2, 70.0, 2)
