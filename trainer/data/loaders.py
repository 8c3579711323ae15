"""The FFCV train and test loaders, built from a DataConfig in one place.

Train: RANDOM order, flip / translate / cutout as configured, sharded across ranks by ffcv
(`distributed=True`, reshuffled every epoch). Test: SEQUENTIAL, no augmentation, each rank reading
a disjoint slice of its own (see `_test_indices`). Both normalise with the CIFAR-10 mean/std,
hand out NCHW tensors (channels_last in memory if configured) of the configured dtype with int64
labels, and move batches to CUDA inside the ffcv pipeline when the device is a GPU.
`data.loader: resident` swaps in trainer/data/resident.py behind the same `build_loaders`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from trainer import UserError
from trainer.config import DataConfig
from trainer.data.cifar10 import MEAN, STD

if TYPE_CHECKING:
    from trainer.data.resident import ResidentLoader

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Cutout and translate fill with the mean colour, so the filled area is zero after normalisation.
MEAN_PIXEL = tuple(int(round(255 * m)) for m in MEAN)


class CifarLoader:
    """An ffcv Loader that also puts torch's CPU thread count back after starting each epoch.

    ffcv sets torch's thread count to its own worker count on import and at every epoch start;
    left alone, the model would then run with as many threads as the loader decodes with.
    """

    def __init__(self, loader, threads: int, num_samples: int):
        self.loader = loader
        self.threads = threads
        self.num_samples = num_samples  # images this rank sees per epoch

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Play `epoch`'s order next (ffcv shuffles with seed + epoch); the trainer calls it before
        each epoch, also when resuming in the middle of one."""
        self.loader.next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)
        torch.set_num_threads(self.threads)
        return batches


def default_threads() -> int:
    """CPU threads for torch in this process: the cores we may use, split among local ranks."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // local_world)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _test_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous, disjoint slices that together cover all n test images exactly once.

    ffcv's distributed SEQUENTIAL order pads the last shard with repeated images
    (DistributedSampler), which would count some images twice in the test accuracy whenever
    n is not a multiple of the world size; explicit indices avoid that.
    """
    bounds = np.linspace(0, n, world + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.uint64)


def _image_pipeline(cfg: DataConfig, train: bool, device: torch.device) -> list:
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import Convert, Cutout, RandomHorizontalFlip, RandomTranslate, ToDevice, ToTensor, ToTorchImage
    from torchvision.transforms import Normalize

    ops: list = [SimpleRGBImageDecoder()]
    if train and cfg.flip:
        ops.append(RandomHorizontalFlip())
    if train and cfg.translate:
        ops.append(RandomTranslate(padding=cfg.translate, fill=MEAN_PIXEL))
    if train and cfg.cutout:
        ops.append(Cutout(cfg.cutout, fill=MEAN_PIXEL))
    ops.append(ToTensor())
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    ops += [
        ToTorchImage(channels_last=cfg.channels_last),
        # Normalise in float32 and only then narrow, so bf16/fp16 round the final values once.
        Convert(torch.float32),
        Normalize([255 * m for m in MEAN], [255 * s for s in STD]),
    ]
    if cfg.dtype != "float32":
        ops.append(Convert(DTYPES[cfg.dtype]))
    return ops


def _label_pipeline(device: torch.device) -> list:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor

    ops: list = [IntDecoder(), ToTensor(), Squeeze(1), Convert(torch.int64)]  # cross-entropy wants int64
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


def check_data_dir(data_dir: str | os.PathLike) -> Path:
    data_dir = Path(data_dir)
    for name in ("train.beton", "test.beton"):
        if not (data_dir / name).is_file():
            raise UserError(
                f"{data_dir / name}: not found; convert CIFAR-10 first: "
                f"python -m trainer.data prepare --out {data_dir} [--source cifar-10-batches-py]"
            )
    return data_dir


def _num_samples(path: Path) -> int:
    from ffcv.reader import Reader

    return Reader(str(path)).num_samples


def build_loaders(
    cfg: DataConfig,
    device: torch.device | str = "cpu",
    seed: int = 0,
    threads: int | None = None,
) -> tuple[CifarLoader, CifarLoader] | tuple[ResidentLoader, ResidentLoader]:
    """(train, test) loaders for this process; sharded by rank when a process group is up.

    `cfg.loader` picks the kind: ffcv (below) or resident (trainer/data/resident.py); both hand out
    the same batches in the same form and have the same interface."""
    if cfg.loader == "resident":
        from trainer.data.resident import build_resident_loaders

        return build_resident_loaders(cfg, device, seed, threads)
    from ffcv.loader import Loader, OrderOption

    device = torch.device(device)
    data_dir = check_data_dir(cfg.dir)
    threads = threads or default_threads()
    rank, world = _rank_world()

    n_train = _num_samples(data_dir / "train.beton")
    if cfg.train_subset:
        n_train = min(n_train, cfg.train_subset)
    if cfg.batch_size * world > n_train:
        raise UserError(f"data.batch_size={cfg.batch_size} x {world} ranks exceeds the {n_train} training images")
    train = Loader(
        str(data_dir / "train.beton"),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        order=OrderOption.RANDOM,
        drop_last=True,  # equal-sized steps keep BatchNorm statistics and DDP ranks in step
        distributed=world > 1,
        seed=seed,
        indices=np.arange(n_train, dtype=np.uint64),
        # One page-cache copy of the file shared by every rank on the node.
        os_cache=True,
        pipelines={"image": _image_pipeline(cfg, True, device), "label": _label_pipeline(device)},
    )

    n_test = _num_samples(data_dir / "test.beton")
    if cfg.test_subset:
        n_test = min(n_test, cfg.test_subset)
    test_indices = _test_indices(n_test, rank, world)
    test = Loader(
        str(data_dir / "test.beton"),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        indices=test_indices,
        os_cache=True,
        pipelines={"image": _image_pipeline(cfg, False, device), "label": _label_pipeline(device)},
    )
    # Importing ffcv and building loaders reset torch's thread count.
    torch.set_num_threads(threads)
    train_per_rank = (n_train // world // cfg.batch_size) * cfg.batch_size
    return CifarLoader(train, threads, train_per_rank), CifarLoader(test, threads, len(test_indices))

