"""The FFCV train and test loaders (`data.loader: ffcv`), built from a DataConfig in one place.

Train: RANDOM order, flip / translate / cutout as configured, sharded across ranks by ffcv
(`distributed=True`, reshuffled every epoch). Test: SEQUENTIAL, no augmentation, each rank reading
a disjoint slice of its own (common.shard_indices). Both normalise with the CIFAR-10 mean/std, hand
out NCHW tensors (channels_last in memory if configured) of the configured dtype with int64 labels,
and move batches to CUDA inside the ffcv pipeline when the device is a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from queue import Empty

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.data.checks import verify
from trainer.data.cifar10 import MEAN, STD
from trainer.data.common import DTYPES, MEAN_PIXEL, check_batch_size, check_data_dir, default_threads, shard_indices
from trainer.distributed import Dist


class FFCVLoader:
    """An ffcv Loader (a BatchLoader) that also puts torch's CPU thread count back after starting
    each epoch.

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
        self.loader.next_epoch = epoch  # ffcv shuffles with seed + epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)
        torch.set_num_threads(self.threads)
        try:
            yield from batches
        finally:
            # Left mid-epoch (an error, a stop signal), ffcv's thread goes on decoding with numba,
            # and a process that exits while it does aborts ("terminate called without an active
            # exception"). Told to stop, the thread ends once its queue stays full for 0.5 s; a slot
            # freed each second lets through the end-of-epoch marker it may be blocked on.
            batches.terminate_event.set()
            while batches.is_alive():
                batches.join(timeout=1)
                with suppress(Empty):
                    batches.output_queue.get_nowait()
            batches.close()


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


def build_ffcv_loaders(
    cfg: DataConfig, group: Dist, seed: int = 0, threads: int | None = None
) -> tuple[FFCVLoader, FFCVLoader]:
    """(train, test) FFCV loaders for this process, sharded by the group's rank."""
    from ffcv.loader import Loader, OrderOption

    device = group.device
    data_dir = check_data_dir(cfg.dir)
    found = verify(data_dir, warn=group.rank == 0)  # before ffcv reads a byte: it trusts any file
    threads = threads or default_threads()
    rank, world = group.rank, group.world_size

    n_train = found["train_images"]
    if cfg.train_subset:
        n_train = min(n_train, cfg.train_subset)
    check_batch_size(cfg.batch_size, world, n_train)
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

    n_test = found["test_images"]
    if cfg.test_subset:
        n_test = min(n_test, cfg.test_subset)
    shard = shard_indices(n_test, rank, world)
    test = Loader(
        str(data_dir / "test.beton"),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        indices=shard,
        os_cache=True,
        pipelines={"image": _image_pipeline(cfg, False, device), "label": _label_pipeline(device)},
    )
    # Importing ffcv and building loaders reset torch's thread count.
    torch.set_num_threads(threads)
    train_per_rank = (n_train // world // cfg.batch_size) * cfg.batch_size
    return FFCVLoader(train, threads, train_per_rank), FFCVLoader(test, threads, len(shard))
