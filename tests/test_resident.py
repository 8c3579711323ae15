"""The device-resident loader (data.loader=resident) against the FFCV loader, on the real CIFAR-10 copy:
the same tensors bit for bit, seeded shuffles and shards, batch-wise augmentation, and exact resume
(against conftest.resident_reference, trained once a session)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pixel_tables import random_table, shifts_of, unaugmented
from conftest import EVERY_STEP, REPO, resident_run_args, signal_at_step
from helpers import run_main
from trainer.config import DataConfig
from trainer.data.cifar10 import read_split
from trainer.data import build_loaders
from trainer.distributed import Dist
from trainer.data.augment import pixel_indices, pixel_table
from trainer.data.resident import ResidentLoader, epoch_order

SPEED = REPO / "jobs/configs/speed.yaml"


def _both(beton_dir: Path, **kw) -> tuple:
    """(ffcv train, ffcv test, resident train, resident test) for the same config."""
    cfg = DataConfig(dir=str(beton_dir), num_workers=2, **kw)
    resident = dataclasses.replace(cfg, loader="resident")
    return (*build_loaders(cfg, Dist.single(), threads=2), *build_loaders(resident, Dist.single(), threads=2))


def _rows(x: torch.Tensor) -> list[bytes]:
    """Each image's bytes, sorted: the multiset of images in a batch or an epoch."""
    x = x.contiguous()
    return sorted(x[i].numpy().tobytes() if x.dtype != torch.bfloat16 else x[i].view(torch.int16).numpy().tobytes()
                  for i in range(x.shape[0]))


@pytest.mark.parametrize("dtype, channels_last", [("float32", True), ("bfloat16", True), ("float32", False)])
def test_test_split_is_bitwise_the_ffcv_loaders(beton_dir, dtype, channels_last):
    # 250 images in batches of 100: the last batch is short.
    _, ffcv_test, _, test = _both(beton_dir, batch_size=100, dtype=dtype, channels_last=channels_last,
                                  test_subset=250, train_subset=1000)
    assert len(test) == len(ffcv_test) == 3 and test.num_samples == ffcv_test.num_samples == 250
    n = 0
    for (xa, ya), (xb, yb) in zip(ffcv_test, test, strict=True):
        assert xb.dtype == xa.dtype and xb.shape == xa.shape and xb.stride() == xa.stride()
        assert yb.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        n += len(yb)
    assert n == 250


def test_train_epoch_without_augmentation_is_the_subset(beton_dir, cifar_source):
    ffcv_train, _, train, _ = _both(beton_dir, batch_size=100, flip=False, translate=0, cutout=0, train_subset=1000,
                                    test_subset=100)
    assert len(train) == len(ffcv_train) == 10 and train.num_samples == 1000
    ours = [(x, y) for x, y in train]
    theirs = [(x.clone(), y.clone()) for x, y in ffcv_train]
    x, y = torch.cat([b[0] for b in ours]), torch.cat([b[1] for b in ours])
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert _rows(x) == _rows(torch.cat([b[0] for b in theirs]))
    # And the images are exactly the subset's, each once, with its own label.
    source = read_split(cifar_source, "train")
    reference = _images(pixel_table(torch.from_numpy(source.images[:1000]), torch.float32))
    assert _rows(x) == _rows(reference.permute(0, 3, 1, 2))
    by_image = {img: label for img, label in zip(_rows_unsorted(reference.permute(0, 3, 1, 2)), source.labels[:1000])}
    assert [by_image[img] for img in _rows_unsorted(x)] == y.tolist()


def _rows_unsorted(x: torch.Tensor) -> list[bytes]:
    x = x.contiguous()
    return [x[i].numpy().tobytes() for i in range(x.shape[0])]


def test_epoch_order_shards_reshuffles_and_repeats():
    n, batch = 1050, 100
    shards = [epoch_order(n, batch, seed=3, epoch=0, rank=r, world=2) for r in range(2)]
    assert [len(s) for s in shards] == [500, 500]  # whole batches, equal steps per rank
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert set(torch.cat(shards).tolist()) <= set(range(n))
    whole = epoch_order(n, batch, seed=3, epoch=0)
    assert len(set(whole.tolist())) == 1000  # one rank: all but the last partial batch
    assert torch.equal(epoch_order(n, batch, seed=3, epoch=0, rank=1, world=2), shards[1])  # same (seed, epoch)
    assert not torch.equal(epoch_order(n, batch, seed=3, epoch=1), whole)  # reshuffled by epoch
    assert not torch.equal(epoch_order(n, batch, seed=4, epoch=0), whole)  # and by seed
    # With no remainder the two ranks together cover the epoch exactly.
    both = [epoch_order(1000, batch, seed=0, epoch=5, rank=r, world=2) for r in range(2)]
    assert sorted(torch.cat(both).tolist()) == list(range(1000))


_images = unaugmented
_table = random_table


def test_table_holds_the_normalised_images_and_fill():
    from trainer.data.cifar10 import MEAN, STD

    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    table = pixel_table(images, torch.bfloat16, pad=2)
    mean, std = torch.tensor([255 * m for m in MEAN]), torch.tensor([255 * s for s in STD])
    assert torch.equal(_images(table), ((images.float() - mean) / std).to(torch.bfloat16))
    rows = table.pixels.view(5 * 32 + 1, 36, 3)
    fill = ((torch.tensor([125, 123, 114]).float() - mean) / std).to(torch.bfloat16)
    assert (rows[:, :2] == fill).all() and (rows[:, -2:] == fill).all() and (rows[-1] == fill).all()


def test_flip_when_forced_mirrors_exactly():
    table = _table(8)
    flipped = table.gather(pixel_indices(table, torch.arange(8), torch.Generator().manual_seed(1), flip=1.0))
    assert torch.equal(flipped, _images(table).flip(2))


def test_cutout_fills_one_square_with_the_mean():
    table = _table(64)
    index = pixel_indices(table, torch.arange(64), torch.Generator().manual_seed(2), cutout=8)
    cut = index == table.fill_row * table.width
    assert (cut.sum(dim=(1, 2)) == 64).all()  # always fully inside the image
    for mask in cut:
        rows, cols = mask.any(1).nonzero().view(-1), mask.any(0).nonzero().view(-1)
        assert len(rows) == len(cols) == 8 and rows[-1] - rows[0] == 7 and cols[-1] - cols[0] == 7
    x = table.gather(index)
    assert (x[cut].abs() < 0.02).all()  # the mean colour normalises to about zero
    assert len({(m.any(1).nonzero()[0].item(), m.any(0).nonzero()[0].item()) for m in cut}) > 20  # placed at random


def test_translate_shifts_content_and_fills_the_border():
    t = 3
    table = _table(32, pad=t)
    x = table.gather(pixel_indices(table, torch.arange(32), torch.Generator().manual_seed(3), translate=t))
    source = _images(table)
    padded = table.pixels[-1].expand(32, 32 + 2 * t, 32 + 2 * t, 3).clone()
    padded[:, t : t + 32, t : t + 32] = source
    shifts = shifts_of(x, padded, t)
    assert len(set(shifts)) > 10  # drawn from all (2t + 1)^2 shifts


def test_augmentation_is_reproducible_per_seed_epoch_and_step(beton_dir):
    cfg = DataConfig(dir=str(beton_dir), batch_size=200, num_workers=2, flip=True, translate=4, cutout=8,
                     train_subset=1000, test_subset=200, loader="resident")
    train, _ = build_loaders(cfg, Dist.single(), seed=7, threads=2)
    train.set_epoch(3)
    first = [(x.clone(), y.clone()) for x, y in train]
    train.set_epoch(3)
    again = [(x.clone(), y.clone()) for x, y in train]  # what a resumed epoch 3 replays
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    other = [x.clone() for x, _ in train]  # epoch 4: new order and new augmentations
    assert not torch.equal(first[0][0], other[0])
    # The same images as the unaugmented epoch, changed: cutout squares of the mean colour (zero).
    zero = (torch.cat([b[0] for b in first]).abs() < 0.02).all(dim=1).sum(dim=(1, 2))
    assert (zero >= 64).float().mean() > 0.95
    plain_cfg = dataclasses.replace(cfg, flip=False, translate=0, cutout=0)
    plain, _ = build_loaders(plain_cfg, Dist.single(), seed=7, threads=2)
    plain.set_epoch(3)
    unaugmented = [(x.clone(), y.clone()) for x, y in plain]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, unaugmented))  # same order, same labels
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, unaugmented))
    # A fresh loader with the same seed draws the same; another seed draws differently.
    same, _ = build_loaders(cfg, Dist.single(), seed=7, threads=2)
    same.set_epoch(3)
    assert torch.equal(next(iter(same))[0], first[0][0])
    different, _ = build_loaders(cfg, Dist.single(), seed=8, threads=2)
    different.set_epoch(3)
    assert not torch.equal(next(iter(different))[0], first[0][0])


def test_ranks_get_disjoint_shards(beton_dir):
    cfg = DataConfig(dir=str(beton_dir), batch_size=100, num_workers=2, flip=False, translate=0, train_subset=1000,
                     test_subset=100, loader="resident")
    train, _ = build_loaders(cfg, Dist.single(), threads=2)
    shards = []
    for rank in range(2):
        loader = ResidentLoader(train.table, train.labels, cfg, train=True, seed=0, rank=rank, world=2)
        # data.batch_size is the global batch: 50 a rank, the 10 steps one process takes at 100.
        assert len(loader) == 10 and loader.num_samples == 500
        shards.append([_rows_unsorted(x) for x, _ in loader])
    a, b = (set(sum(s, [])) for s in shards)
    assert len(a) == len(b) == 500 and not a & b
    assert a | b == set(_rows_unsorted(_images(train.table).permute(0, 3, 1, 2)))


# ---- through the trainer ------------------------------------------------------------------------


def _weights(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


@pytest.mark.slow
def test_mid_epoch_resume_with_augmentation_is_exact(resident_reference, beton_dir, tmp_path, monkeypatch):
    whole = resident_reference  # conftest: resident_run_args, uninterrupted
    run_dir = tmp_path / "run"
    # A real SIGUSR2, sent by the trainer to itself right after step 25: inside epoch 2 (20 steps an
    # epoch), past the end-of-epoch stop check, mid-way through its augmentations and mixes.
    signal_at_step(monkeypatch, 25)
    r = run_main("trainer", *resident_run_args(beton_dir, EVERY_STEP), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "stopped by signal SIGUSR2 in epoch 2 at step 5" in r.stdout
    stopped = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["epoch_step"]) == (1, 5), "the stop was meant to fall inside epoch 2"
    monkeypatch.undo()

    again = run_main("trainer", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert f"from epoch 2, step {stopped['epoch_step']}" in again.stdout
    a, b = _weights(run_dir), _weights(whole)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    whole_rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [m["test_acc"] for m in rows] == [m["test_acc"] for m in whole_rows]


@pytest.mark.slow
def test_speed_profile_runs_one_epoch_on_a_subset(beton_dir, tmp_path):
    from trainer.config import load_config

    cfg = load_config(SPEED)
    assert cfg.model.arch == "airbench94" and cfg.data.loader == "resident" and cfg.train.tta and cfg.train.lookahead_every
    run_dir = tmp_path / "speed"
    r = run_main("trainer", "--config", str(SPEED), "--run-dir", str(run_dir), f"data.dir={beton_dir}",
                 "data.train_subset=128", "data.test_subset=128", "data.batch_size=64", "train.epochs=1",
                 "logging.mode=disabled", "logging.log_every=1")
    assert r.returncode == 0, r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["arch"] == "airbench94"
    assert np.isfinite([m["train_loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]).all()
