"""What both training loaders share: the batch dtypes, the fill colour, test-set sharding, the
data folder check, thread defaults, and the interface they both offer (BatchLoader)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from trainer import UserError
from trainer.data.cifar10 import MEAN

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Cutout and translate fill with the mean colour, so the filled area is zero after normalisation.
MEAN_PIXEL = tuple(int(round(255 * m)) for m in MEAN)


class BatchLoader(Protocol):
    """The interface of both loaders (FFCVLoader, ResidentLoader), which the trainer relies on.

    Batches are (images, labels): NCHW images normalised with the CIFAR-10 mean/std in the
    configured dtype (channels_last in memory if configured) and int64 labels, on the training
    device. A training loader is sharded by rank with equal steps on every rank; a test loader
    gives each rank a disjoint slice (see shard_indices).
    """

    num_samples: int  # images this rank sees per epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...  # batches per epoch

    def set_epoch(self, epoch: int) -> None:
        """Play `epoch`'s order next; the trainer calls it before each epoch, also when resuming
        in the middle of one."""
        ...


def default_threads() -> int:
    """CPU threads for torch in this process: the cores we may use, split among local ranks."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // local_world)


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous, disjoint slices that together cover all n test images exactly once.

    ffcv's distributed SEQUENTIAL order pads the last shard with repeated images
    (DistributedSampler), which would count some images twice in the test accuracy whenever
    n is not a multiple of the world size; explicit indices avoid that.
    """
    bounds = np.linspace(0, n, world + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.uint64)


def check_data_dir(data_dir: str | os.PathLike) -> Path:
    data_dir = Path(data_dir)
    for name in ("train.beton", "test.beton"):
        if not (data_dir / name).is_file():
            raise UserError(
                f"{data_dir / name}: not found; convert CIFAR-10 first: "
                f"python -m trainer.data prepare --out {data_dir} [--source cifar-10-batches-py]"
            )
    return data_dir


def check_batch_size(batch_size: int, world: int, n_train: int) -> None:
    if batch_size * world > n_train:
        raise UserError(f"data.batch_size={batch_size} x {world} ranks exceeds the {n_train} training images")
