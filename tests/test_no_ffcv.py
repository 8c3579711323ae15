"""data.format=python: the resident loader reads CIFAR-10's official batch files with the project's
own reader, no ffcv, and hands out exactly the batches it hands out from the .beton files of the
same source; a run works where ffcv does not import (issue #19, item 4).

One training run is a process of its own where ffcv cannot be imported at all (a fresh interpreter
proves that no import of the path reaches it); the other commands run in this process with ffcv
made unimportable (`without_ffcv`), which holds because the project imports ffcv only inside the
functions that use it."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMALL_RUN
from helpers import SMALL, one_error_line, run_main
from trainer.config import DataConfig
from trainer.data import build_loaders, build_val_loader
from trainer.data.checks import data_record
from trainer.data.cifar10 import DataError
from trainer.data.common import split_record, train_labels
from trainer.data.resident import normalised_images
from trainer.distributed import Dist
from trainer.launch import ensure_data


def _pair(beton_dir: Path, cifar_source: Path, **kw) -> tuple[DataConfig, DataConfig]:
    beton = DataConfig(dir=str(beton_dir), loader="resident", num_workers=2, **kw)
    return beton, dataclasses.replace(beton, dir=str(cifar_source), format="python")


def _batches(loader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype and xa.stride() == xb.stride()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_python_format_batches_are_the_beton_formats(beton_dir, cifar_source):
    # Every part of the path that could differ: the image order (the validation split is drawn from
    # it, train_subset cuts it), the normalising, each batch's seeded augmentation, the shard of a
    # rank other than 0 (rank 1 of 2: a slice of the epoch's order and of the test set).
    world, rank = 2, 1
    beton, python = _pair(beton_dir, cifar_source, batch_size=200, flip=True, translate=2, cutout=6,
                          val_split=200, val_seed=3, train_subset=1600, test_subset=250)
    group = Dist(rank, rank, world, torch.device("cpu"))
    b_train, b_test = build_loaders(beton, group, seed=5, threads=2)
    p_train, p_test = build_loaders(python, group, seed=5, threads=2)
    for epoch in (0, 1):
        _assert_same(_batches(b_train, epoch), _batches(p_train, epoch))
    _assert_same(_batches(b_test), _batches(p_test))
    _assert_same(_batches(build_val_loader(beton, group, 2)), _batches(build_val_loader(python, group, 2)))
    # The whitening fit's images, and the split's record in summary.json.
    assert torch.equal(normalised_images(beton, 300, "cpu"), normalised_images(python, 300, "cpu"))
    assert split_record(train_labels(python), python) == split_record(train_labels(beton), beton)


def test_python_record_holds_the_batch_files_hashes(cifar_source):
    cfg = DataConfig(dir=str(cifar_source), loader="resident", format="python", batch_size=100, test_subset=100)
    build_loaders(cfg, Dist.single(), threads=1)
    record = data_record(cifar_source, "python")
    assert record["format"] == "python" and record["checked"] and record["dir"] == str(cifar_source.resolve())
    assert record["train_images"] == 5000 and record["test_images"] == 1000
    expected = hashlib.sha256((cifar_source / "test_batch").read_bytes()).hexdigest()
    assert record["files"]["test_batch"]["sha256"] == expected
    assert set(record["files"]) == {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}


def _hide_ffcv(tmp_path: Path) -> dict:
    """An environment whose `import ffcv` fails, as on a machine where its wheel does not load."""
    fake = tmp_path / "no_ffcv" / "ffcv"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('ffcv hidden by the test')\n")
    return {**os.environ, "PYTHONPATH": str(fake.parent)}


@pytest.fixture
def without_ffcv(monkeypatch) -> None:
    """`import ffcv` (and of any part of it) fails in this process until the test ends, as where its
    wheel does not load: the modules already imported are hidden too."""
    for name in [n for n in sys.modules if n == "ffcv" or n.startswith("ffcv.")] + ["ffcv"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        from ffcv.loader import Loader  # noqa: F401


def _train_args(data_dir: Path, run_dir: Path) -> list[str]:
    return ["--config", str(SMALL), "--run-dir", str(run_dir), f"data.dir={data_dir}", "data.format=python",
            "data.loader=resident", *SMALL_RUN, "data.train_subset=1000", "data.test_subset=200", "train.epochs=1",
            "data.val_split=100", "train.threads=1"]


def test_trainer_runs_on_the_batch_files_with_ffcv_unimportable(cifar_source, tmp_path):
    env = _hide_ffcv(tmp_path)
    hidden = subprocess.run([sys.executable, "-c", "import ffcv"], env=env, capture_output=True, text=True)
    assert hidden.returncode != 0 and "hidden by the test" in hidden.stderr
    done = subprocess.run([sys.executable, "-m", "trainer", *_train_args(cifar_source, tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["format"] == "python" and summary["data"]["train_images"] == 5000
    assert summary["data"]["val_split"]["images"] == 100 and summary["epochs_run"] == 1


def test_missing_test_batch_is_one_line(cifar_source, tmp_path, without_ffcv):
    broken = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_source, broken)
    (broken / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch: missing"):
        ensure_data(broken, "python")  # the launcher's check before it submits anything
    done = run_main("trainer", *_train_args(broken, tmp_path / "run"))
    one_error_line(done, "test_batch: missing")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_launcher_checks_the_batch_folder_and_prepares_nothing(cifar_source, tmp_path, without_ffcv):
    data = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_source, data)
    r = run_main("jobs/launch.py", "--arch", "resnet9_tiny", "--profile", "smoke", "--local", "--dry-run", "--runs",
                 str(tmp_path / "runs"), f"data.dir={data}", "data.format=python", "data.loader=resident")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data.format=python" in r.stdout and "preparing" not in r.stdout
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in cifar_source.iterdir())  # no .beton
