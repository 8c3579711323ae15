"""The loader part: training images/s of three loaders with the same augmentations everywhere (flip,
translate 4, cutout 8, float32, batch 512, all on the training device):

(a) a torch DataLoader with per-sample torchvision transforms and one worker per core, the baseline
    most CIFAR code uses, (b) the FFCV loader, (c) the device-resident loader; the median of full
    epochs (at least 3 s of them; --smoke: one) after a warm-up epoch (ffcv's first epoch compiles),
    ratios to (a).
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from trainer.bench.common import Settings, cores
from trainer.config import DataConfig
from trainer.data import build_loaders
from trainer.data.cifar10 import MEAN, STD
from trainer.data.common import MEAN_PIXEL
from trainer.data.resident import read_beton
from trainer.device import synchronize
from trainer.distributed import Dist

# The recipe: the same on all three loaders.
LOADER_BATCH = 512
AUGMENT = {"flip": True, "translate": 4, "cutout": 8}


class TorchvisionCifar(torch.utils.data.Dataset):
    """CIFAR-10 as most PyTorch code feeds it: PIL images through per-sample torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class Cutout:
    """A `side` x `side` square inside the image set to 0 (the mean colour after Normalize), as
    ffcv's Cutout places it. Not torchvision's RandomErasing: that draws a random area and aspect
    ratio, a different augmentation, and costs far more per sample than the square it erases."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top = random.randint(0, image.shape[-2] - self.side)
        left = random.randint(0, image.shape[-1] - self.side)
        image[..., top : top + self.side, left : left + self.side] = 0
        return image


def torchvision_loader(
    images: np.ndarray, labels: np.ndarray, device: torch.device, workers: int
) -> torch.utils.data.DataLoader:
    """The baseline: the same augmentations as the other loaders, per sample, in worker processes."""
    import torchvision.transforms as T

    transform = T.Compose([
        T.RandomCrop(32, padding=AUGMENT["translate"], fill=MEAN_PIXEL),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
        Cutout(AUGMENT["cutout"]),
    ])
    return torch.utils.data.DataLoader(
        TorchvisionCifar(images, labels, transform), batch_size=LOADER_BATCH, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=True, pin_memory=device.type == "cuda",
    )


def time_loader(loader, device: torch.device, epochs: int, threads: int, min_seconds: float) -> dict:
    """Images/s of the median epoch among at least `epochs` full epochs and `min_seconds` of them,
    after one warm-up epoch (whose seconds are kept apart). A fast loader's epoch lasts a fraction
    of a second, which a burst of another process's work can spoil; the median of many is robust."""

    def epoch() -> tuple[int, float]:
        torch.set_num_threads(threads)
        start, n = time.perf_counter(), 0
        for x, y in loader:
            x = x.to(device, non_blocking=True)  # a no-op for the loaders that deliver on the device
            y = y.to(device, non_blocking=True)
            n += y.shape[0]
        synchronize(device)
        return n, time.perf_counter() - start

    _, warmup_s = epoch()
    speeds, images, seconds = [], 0, 0.0
    while len(speeds) < epochs or seconds < min_seconds:
        n, epoch_s = epoch()
        speeds.append(n / epoch_s)
        images, seconds = n, seconds + epoch_s
    return {"images_per_s": float(np.median(speeds)), "warmup_s": warmup_s, "epochs": len(speeds),
            "images_per_epoch": images, "epoch_images_per_s": speeds}


def bench_loaders(data_dir: Path, device: torch.device, settings: Settings, threads: int) -> dict:
    workers = cores()
    cfg = DataConfig(dir=str(data_dir), batch_size=LOADER_BATCH, num_workers=workers, dtype="float32",
                     channels_last=True, train_subset=settings.loader_images, test_subset=LOADER_BATCH, **AUGMENT)
    group = Dist.single(device)
    results = {}

    images, labels = read_beton(data_dir / "train.beton", settings.loader_images or None, workers)
    baseline = torchvision_loader(images.numpy(), labels.numpy(), device, workers)
    results["dataloader"] = time_loader(baseline, device, settings.loader_epochs, threads, settings.loader_min_s)
    del baseline  # stops its worker processes

    for kind in ("ffcv", "resident"):
        start = time.perf_counter()
        train, _ = build_loaders(replace(cfg, loader=kind), group, seed=0, threads=threads)
        build_s = time.perf_counter() - start
        timed = time_loader(train, device, settings.loader_epochs, threads, settings.loader_min_s)
        results[kind] = {**timed, "build_s": build_s}
        del train

    base = results["dataloader"]["images_per_s"]
    for r in results.values():
        r["ratio"] = r["images_per_s"] / base
    return results


def print_table(results: dict, device: torch.device) -> None:
    print(f"\nloader: training images/s (median epoch), batch {LOADER_BATCH}, flip + translate "
          f"{AUGMENT['translate']} + cutout {AUGMENT['cutout']}, float32, on {device.type}; ratio to the DataLoader")
    rows = [("torch DataLoader + torchvision", "dataloader"), ("FFCV", "ffcv"), ("resident", "resident")]
    print(f"  {'loader':<32}{'img/s':>10}{'ratio':>8}{'warm-up s':>11}{'build s':>9}{'epochs':>8}")
    for label, key in rows:
        x = results[key]
        build = f"{x['build_s']:.1f}" if "build_s" in x else "-"
        print(f"  {label:<32}{x['images_per_s']:>10,.0f}{x['ratio']:>7.2f}x{x['warmup_s']:>11.1f}{build:>9}"
              f"{x['epochs']:>8}")
