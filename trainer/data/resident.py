"""The device-resident loader (`data.loader: resident`): all of CIFAR-10 kept on the training device.

The .beton files are read once through ffcv (SEQUENTIAL, no augmentation), or with
data.format=python CIFAR-10's batch files through the project's own reader (no ffcv: the same
images in the same order, so the same batches follow), and normalised once, on the device, into a
table of pixel rows (trainer/data/augment.py): a batch is one gather from it, its augmentations
a change of the pixel indices gathered.

Randomness is seeded, unlike ffcv's numba augmentations: the epoch's order comes from a generator
seeded with (seed, epoch), and each batch's flips, shifts and squares from one seeded with
(seed, epoch, rank, step). A resumed epoch therefore replays the same batches with the same
augmentations, and an interrupted run ends with the same weights as an uninterrupted one even with
augmentation on. Under DDP every rank computes the same permutation and takes its own slice of it
(drop_last, as the FFCV train loader: equal steps on every rank). The test split is read in order,
sharded with common.shard_indices, and never augmented; so are the validation images (data.val_split),
held out of train.beton into a table of their own.

The augmentations ffcv lacks live here alone (the config refuses them with the FFCV loader):
alternating flips (data.flip_mode=alternate: airbench's, each image's first flip a seeded bit of
its own, then mirrored in every other epoch), reflect translation (data.translate_mode=reflect) and
mixup/cutmix. Mixing makes the labels float32 class probabilities, for every training batch of such
a run (mixed or not), so the compiled step sees one label type. Its per-batch numbers (whether to
mix, which op, lambda, partner shift, box) come from a CPU generator seeded per (seed, epoch, rank,
step): plain Python numbers that reach the device as kernel arguments, never a host sync.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trainer import UserError
from trainer.config import DataConfig
from trainer.data.augment import MixPlan, PixelTable, draw_mix_plan, mix, normalise, paste_box, pixel_indices, pixel_table
from trainer.data.checks import open_beton, python_split
from trainer.data.cifar10 import SIDE
from trainer.data.common import (
    DTYPES, check_train_batch, default_threads, held_out, import_ffcv, loader_workers, per_process_batch, shard_indices,
    train_labels, train_val_indices, verify_data,
)
from trainer.data.ffcv_loader import check_epoch, ffcv_loader
from trainer.distributed import Dist

_ORDER, _AUGMENT, _FLIP, _MIX = 0, 1, 2, 3  # the purposes random streams are derived for (see _seed)


def _seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers (SeedSequence hashes them, so nearby keys give unrelated
    streams); the same keys always give the same seed."""
    words = np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def read_beton(
    path: str | os.PathLike, count: int | None = None, workers: int = 1, indices: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images (all if None) of a .beton in file order, or those at the sorted
    `indices`: (N, 32, 32, 3) uint8 and (N,) int64 CPU tensors. Read through an un-augmented
    SEQUENTIAL ffcv Loader."""
    import numba

    import_ffcv()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import OrderOption
    from ffcv.transforms import ToTensor

    if indices is None:
        n = int(open_beton(Path(path)).num_samples)
        indices = np.arange(n if count is None else min(n, count))
    n = len(indices)
    workers = max(1, min(workers, numba.config.NUMBA_NUM_THREADS))  # ffcv refuses more than numba has
    loader = ffcv_loader(
        path, batch_size=min(n, 5000), num_workers=workers, order=OrderOption.SEQUENTIAL,
        indices=indices.astype(np.uint64), drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]},
    )
    # ffcv reuses its batch buffers: keep copies, not the batches themselves.
    batches = iter(loader)
    copies = [(x.clone(), y.clone()) for x, y in batches]
    check_epoch(batches, path)
    images, labels = zip(*copies)
    x, y = torch.cat(images), torch.cat(labels).view(-1).to(torch.int64)
    if tuple(x.shape) != (n, SIDE, SIDE, 3):
        raise UserError(f"{path}: expected {n} images of {SIDE}x{SIDE}x3, got {tuple(x.shape)}")
    return x, y


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The images (indices into the first n) that `rank` trains on in `epoch`, in order.

    One permutation per (seed, epoch), the same on every rank; rank r takes the r-th of `world`
    equal, disjoint slices, cut to whole batches, so every rank makes the same number of steps.
    """
    per_rank = n // world // batch_size * batch_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, _ORDER, epoch)))
    return order[rank * per_rank : (rank + 1) * per_rank]


class ResidentLoader:
    """Batches of (images, labels) gathered from a PixelTable on the device (a BatchLoader, as
    the FFCVLoader).

    train=True: a seeded permutation per epoch, this rank's slice of it, whole batches only,
    augmented as configured; with mixup or cutmix configured the labels are float32 (B, 10) class
    probabilities, else int64. train=False: `indices` in order, the last batch may be short, never
    augmented nor mixed, int64 labels.
    """

    def __init__(
        self,
        table: PixelTable,
        labels: torch.Tensor,
        cfg: DataConfig,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        indices: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> None:
        self.table, self.labels = table, labels
        self.batch_size = per_process_batch(cfg.batch_size, world)  # this process's batch (a BatchLoader's)
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.flip = 0.5 if train and cfg.flip else 0.0
        self.translate = cfg.translate if train else 0
        self.reflect = cfg.translate_mode == "reflect"
        if self.reflect and self.translate >= SIDE:
            raise UserError(f"data.translate={cfg.translate}: reflect padding (data.translate_mode=reflect) shifts by "
                            f"at most {SIDE - 1} pixels")
        self.cutout = cfg.cutout if train else 0
        self.mixup, self.cutmix = (cfg.mixup, cfg.cutmix) if train else (0.0, 0.0)
        self.mix_prob = cfg.mix_prob
        self.channels_last = cfg.channels_last
        self.threads = threads
        self.n = labels.shape[0]
        # Alternating flips: image i's first-epoch flip is bit i of one stream of (seed), the same
        # on every rank and whatever batch the image falls in; epoch e flips it iff bit xor (e odd).
        self.first_flips = None
        if self.flip and cfg.flip_mode == "alternate":
            bits = torch.rand(self.n, generator=torch.Generator().manual_seed(_seed(seed, _FLIP))) < 0.5
            self.first_flips = bits.to(labels.device)
        self.next_epoch = 0  # the epoch the next iteration plays; advanced by each iteration
        if train:
            self.num_samples = self.n // world // self.batch_size * self.batch_size  # images per epoch, this rank
            self.indices = None
        else:
            self.indices = (indices if indices is not None else torch.arange(self.n)).to(torch.int64)
            self.num_samples = len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch  # its order and its augmentations

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.threads:
            torch.set_num_threads(self.threads)  # as FFCVLoader: undo whatever ffcv last set
        epoch = self.next_epoch
        self.next_epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.labels.device
        if self.train:
            order = epoch_order(self.n, self.batch_size, self.seed, epoch, self.rank, self.world).to(device)
        else:
            order = self.indices.to(device)
        augment = (self.flip and self.first_flips is None) or self.translate or self.cutout
        mixing = bool(self.mixup or self.cutmix)
        for step in range(len(self)):
            images = order[step * self.batch_size : (step + 1) * self.batch_size]
            generator = None
            if augment:  # one stream per batch: a resumed epoch draws what the original drew
                generator = torch.Generator(device=device).manual_seed(_seed(self.seed, _AUGMENT, epoch, self.rank, step))
            mirror = None
            if self.first_flips is not None:
                mirror = self.first_flips.index_select(0, images) ^ bool(epoch % 2)
            index = pixel_indices(self.table, images, generator, self.flip, self.translate, self.cutout,
                                  mirror=mirror, reflect=self.reflect)
            plan = self.mix_plan(epoch, step) if mixing else None
            if plan is not None and plan.box is not None:
                index = paste_box(index, plan)
            x, y = self.table.gather(index), self.labels.index_select(0, images)
            if mixing:
                x, y = mix(x, y, plan)
            x = x.permute(0, 3, 1, 2)  # NCHW, channels_last in memory
            if not self.channels_last:
                x = x.contiguous()
            yield x, y

    def mix_plan(self, epoch: int, step: int) -> MixPlan | None:
        """How batch `step` of `epoch` is mixed (None: not), from a CPU generator of its own (seed,
        epoch, rank, step): numbers the host holds, so using them costs no device sync."""
        rng = np.random.default_rng(_seed(self.seed, _MIX, epoch, self.rank, step))
        return draw_mix_plan(rng, self.batch_size, self.mixup, self.cutmix, self.mix_prob)


def build_resident_loaders(
    cfg: DataConfig, group: Dist, seed: int = 0, threads: int | None = None
) -> tuple[ResidentLoader, ResidentLoader]:
    """(train, test) resident loaders for this process, sharded by the group's rank."""
    device = group.device
    found = verify_data(cfg, warn=group.rank == 0)  # before reading: ffcv trusts any file
    threads = threads or default_threads()
    rank, world = group.rank, group.world_size

    # Training reads the training set without the validation split's images (common.train_val_indices).
    train_indices, _ = train_val_indices(train_labels(cfg), cfg)
    check_train_batch(cfg.batch_size, len(train_indices))
    pad = cfg.translate if cfg.translate_mode == "fill" else 0  # reflect reads inside the image only
    train_table, train_y = _load("train", train_indices, cfg, device, threads, pad)
    n_test = found["test_images"]
    test_indices = np.arange(min(n_test, cfg.test_subset) if cfg.test_subset else n_test)
    test_table, test_y = _load("test", test_indices, cfg, device, threads, 0)
    test_shard = torch.from_numpy(shard_indices(test_y.shape[0], rank, world).astype(np.int64))
    train = ResidentLoader(train_table, train_y, cfg, train=True, seed=seed, rank=rank, world=world, threads=threads)
    test = ResidentLoader(test_table, test_y, cfg, train=False, world=world, indices=test_shard, threads=threads)
    return train, test


def read_images(cfg: DataConfig, split: str, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images at the sorted `indices`, in file order, from data.dir in its data.format:
    (N, 32, 32, 3) uint8 and (N,) int64 CPU tensors. The folder must have been verified
    (common.verify_data). Only the beton format imports ffcv."""
    if cfg.format == "python":
        found = python_split(cfg.dir, split)
        return torch.from_numpy(found.images[indices]), torch.from_numpy(found.labels[indices])
    threads = torch.get_num_threads()
    images, labels = read_beton(Path(cfg.dir) / f"{split}.beton", workers=loader_workers(cfg.num_workers), indices=indices)
    torch.set_num_threads(threads)  # ffcv changed it; normalising is torch's work
    return images, labels


def _load(split: str, indices: np.ndarray, cfg: DataConfig, device: torch.device, threads: int,
          pad: int) -> tuple[PixelTable, torch.Tensor]:
    images, labels = read_images(cfg, split, indices)
    torch.set_num_threads(threads)  # this process's share of the cores, for the normalising
    return pixel_table(images.to(device), DTYPES[cfg.dtype], pad), labels.to(device)


def build_resident_val_loader(cfg: DataConfig, group: Dist, threads: int | None = None) -> ResidentLoader:
    """The validation loader: the held-out training images in a table of their own, read as the
    test set is (in order, this rank's shard, no augmentation)."""
    _, val = held_out(cfg)
    threads = threads or default_threads()
    table, labels = _load("train", val, cfg, group.device, threads, 0)
    shard = torch.from_numpy(shard_indices(len(val), group.rank, group.world_size).astype(np.int64))
    return ResidentLoader(table, labels, cfg, train=False, world=group.world_size, indices=shard, threads=threads)


def normalised_images(cfg: DataConfig, n: int, device: torch.device | str) -> torch.Tensor:
    """(N, 3, 32, 32) float32: the first n images (all, if fewer) the training loader trains on
    (the training set without the validation split, cut to data.train_subset), in file order, with the
    values either loader hands out (normalised, cast to data.dtype) as float32. For fitting what
    depends on the data itself, such as the whitening layer (model.whiten)."""
    if n <= 0:
        raise ValueError(f"n={n}: need at least one image")
    verify_data(cfg, warn=False)
    train_indices, _ = train_val_indices(train_labels(cfg), cfg)
    images, _ = read_images(cfg, "train", train_indices[:n])
    x = normalise(images.to(device), DTYPES[cfg.dtype]).to(torch.float32)
    return x.permute(0, 3, 1, 2).contiguous()
