"""The device-resident loader (`data.loader: resident`): all of CIFAR-10 kept on the training device.

The .beton files are read once through ffcv (SEQUENTIAL, no augmentation) and normalised once, on
the device, with the same operations in the same order as the FFCV loader (to float32, subtract the
mean, divide by the std, then cast to `data.dtype`), into a table of pixel rows (PixelTable): each
image row padded on both sides with `translate` pixels of the fill colour (the mean pixel,
normalised), plus one row of fill. A batch is one gather from that table: the pixel indices carry
the epoch's order, the flip, the translation (shifted-in columns land in the padding, shifted-in
rows on the fill row) and the cutout square (set to a fill pixel). Because normalising and casting
act on each value alone, gathering normalised values gives bit for bit what augmenting the uint8
pixels and normalising afterwards gives. Storing them normalised trades memory (768 MB of float32 or
384 MB of bfloat16 for the training set with translate 4, against 150 MB of uint8) for skipping
the conversion of every batch, which is most of the per-batch cost on a CPU.

Randomness is seeded, unlike ffcv's numba augmentations: the epoch's order comes from a generator
seeded with (seed, epoch), and each batch's flips, shifts and squares from one seeded with
(seed, epoch, rank, step). A resumed epoch therefore replays the same batches with the same
augmentations, and an interrupted run ends with the same weights as an uninterrupted one even with
augmentation on. Under DDP every rank computes the same permutation and takes its own slice of it
(drop_last, as the FFCV train loader: equal steps on every rank). The test split is read in order,
sharded with common.shard_indices, and never augmented; so are the validation images (data.val_split),
held out of train.beton into a table of their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import UserError
from trainer.config import DataConfig
from trainer.data.cifar10 import MEAN, SIDE, STD
from trainer.data.checks import check_beton, open_beton, verify
from trainer.data.common import (
    DTYPES, MEAN_PIXEL, check_batch_size, check_data_dir, default_threads, held_out, per_process_batch,
    shard_indices,
    train_val_indices,
)
from trainer.distributed import Dist

_ORDER, _AUGMENT = 0, 1  # the purposes random streams are derived for (see _seed)


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
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    if indices is None:
        n = int(open_beton(Path(path)).num_samples)
        indices = np.arange(n if count is None else min(n, count))
    n = len(indices)
    workers = max(1, min(workers, numba.config.NUMBA_NUM_THREADS))  # ffcv refuses more than numba has
    loader = Loader(
        str(path), batch_size=min(n, 5000), num_workers=workers, order=OrderOption.SEQUENTIAL,
        indices=indices.astype(np.uint64), drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]},
    )
    # ffcv reuses its batch buffers: keep copies, not the batches themselves.
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader])
    x, y = torch.cat(images), torch.cat(labels).view(-1).to(torch.int64)
    if tuple(x.shape) != (n, SIDE, SIDE, 3):
        raise UserError(f"{path}: expected {n} images of {SIDE}x{SIDE}x3, got {tuple(x.shape)}")
    return x, y


@dataclass(frozen=True)
class PixelTable:
    """Every training (or test) image on the device, normalised, as rows of pixels.

    `pixels` is (rows x width, 3): image i's row r is table row 32 i + r, padded left and right
    with `pad` fill pixels (the mean colour, normalised), so any horizontal shift up to `pad` stays
    inside the row; the last table row is all fill, for rows shifted out of the image.
    """

    pixels: torch.Tensor
    images: int
    pad: int

    @property
    def width(self) -> int:
        return SIDE + 2 * self.pad

    @property
    def fill_row(self) -> int:
        return self.images * SIDE

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """(B, 32, 32) pixel indices -> the (B, 32, 32, 3) images they make up."""
        return self.pixels.index_select(0, index.view(-1)).view(*index.shape, 3)


def pixel_table(images: torch.Tensor, dtype: torch.dtype, pad: int = 0, chunk: int = 5000) -> PixelTable:
    """(N, 32, 32, 3) uint8 -> a PixelTable in `dtype`, every value normalised exactly as the FFCV
    pipeline does it: to float32, subtract 255 x mean, divide by 255 x std, cast. The fill is the
    mean pixel of the uint8 images (ffcv's fill for translate and cutout) normalised the same way."""
    device = images.device
    mean = torch.tensor([255 * m for m in MEAN], dtype=torch.float32, device=device)
    std = torch.tensor([255 * s for s in STD], dtype=torch.float32, device=device)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).sub_(mean).div_(std).to(dtype)

    n, width = images.shape[0], SIDE + 2 * pad
    fill = normalise(torch.tensor(MEAN_PIXEL, dtype=torch.uint8, device=device))
    table = torch.empty(n * SIDE + 1, width, 3, dtype=dtype, device=device)
    table[:, :pad] = fill
    table[:, pad + SIDE :] = fill
    table[-1] = fill
    for start in range(0, n, chunk):
        part = images[start : start + chunk]
        table[start * SIDE : (start + part.shape[0]) * SIDE, pad : pad + SIDE] = normalise(part).flatten(0, 1)
    return PixelTable(table.view(-1, 3), n, pad)


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The images (indices into the first n) that `rank` trains on in `epoch`, in order.

    One permutation per (seed, epoch), the same on every rank; rank r takes the r-th of `world`
    equal, disjoint slices, cut to whole batches, so every rank makes the same number of steps.
    """
    per_rank = n // world // batch_size * batch_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, _ORDER, epoch)))
    return order[rank * per_rank : (rank + 1) * per_rank]


def pixel_indices(
    table: PixelTable,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    flip: float = 0.0,
    translate: int = 0,
    cutout: int = 0,
) -> torch.Tensor:
    """(B, 32, 32) indices of the table's pixels that make up the batch of `images` (image
    numbers), augmented. Random numbers are drawn on the images' device in a fixed order: flip,
    vertical shift, horizontal shift, cutout row, cutout column.

    flip: probability of mirroring an image left-right. translate (at most the table's pad): shift
    by up to this many pixels in each direction, uniformly, showing the fill colour where the image
    moved away (as ffcv's RandomTranslate: pad, then crop at a random offset). cutout: side of a
    square of fill colour, placed uniformly inside the image (as ffcv's Cutout).
    """
    if translate > table.pad:
        raise ValueError(f"translate={translate} needs a table padded by at least that much (pad={table.pad})")
    b, device = images.shape[0], images.device
    kw = {"generator": generator, "device": device}
    pos = torch.arange(SIDE, device=device)
    rows = pos.expand(b, SIDE)
    cols = pos.expand(b, SIDE)
    if flip:
        mirrored = torch.rand(b, **kw) < flip
        cols = torch.where(mirrored[:, None], SIDE - 1 - pos, pos)
    if translate:
        # Output pixel (i, j) shows source pixel (i + dy, j + dx).
        rows = rows + torch.randint(-translate, translate + 1, (b, 1), **kw)
        cols = cols + torch.randint(-translate, translate + 1, (b, 1), **kw)
    # Rows outside the image read the all-fill row; columns outside it land in the row's padding.
    rows = torch.where((rows >= 0) & (rows < SIDE), images[:, None] * SIDE + rows, table.fill_row)
    index = (rows * table.width)[:, :, None] + (cols + table.pad)[:, None, :]
    if cutout:
        top = torch.randint(0, SIDE - cutout + 1, (b, 1, 1), **kw)
        left = torch.randint(0, SIDE - cutout + 1, (b, 1, 1), **kw)
        square = torch.arange(cutout, device=device)
        index[torch.arange(b, device=device)[:, None, None], top + square[:, None], left + square] = (
            table.fill_row * table.width
        )
    return index


class ResidentLoader:
    """Batches of (images, labels) gathered from a PixelTable on the device (a BatchLoader, as
    the FFCVLoader).

    train=True: a seeded permutation per epoch, this rank's slice of it, whole batches only,
    augmented as configured. train=False: `indices` in order, the last batch may be short.
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
        self.batch_size = per_process_batch(cfg.batch_size, world)  # data.batch_size is the global batch
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.flip = 0.5 if train and cfg.flip else 0.0
        self.translate = cfg.translate if train else 0
        self.cutout = cfg.cutout if train else 0
        self.channels_last = cfg.channels_last
        self.threads = threads
        self.n = labels.shape[0]
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
        augment = self.flip or self.translate or self.cutout
        for step in range(len(self)):
            images = order[step * self.batch_size : (step + 1) * self.batch_size]
            generator = None
            if augment:  # one stream per batch: a resumed epoch draws what the original drew
                generator = torch.Generator(device=device).manual_seed(_seed(self.seed, _AUGMENT, epoch, self.rank, step))
            index = pixel_indices(self.table, images, generator, self.flip, self.translate, self.cutout)
            x = self.table.gather(index).permute(0, 3, 1, 2)  # NCHW, channels_last in memory
            if not self.channels_last:
                x = x.contiguous()
            yield x, self.labels.index_select(0, images)


def build_resident_loaders(
    cfg: DataConfig, group: Dist, seed: int = 0, threads: int | None = None
) -> tuple[ResidentLoader, ResidentLoader]:
    """(train, test) resident loaders for this process, sharded by the group's rank."""
    device = group.device
    data_dir = check_data_dir(cfg.dir)
    found = verify(data_dir, warn=group.rank == 0)  # before reading: ffcv trusts any file
    threads = threads or default_threads()
    rank, world = group.rank, group.world_size

    # Training reads train.beton without the validation split's images (common.train_val_indices).
    train_indices, _ = train_val_indices(check_beton(data_dir / "train.beton"), cfg)
    check_batch_size(cfg.batch_size, world, len(train_indices))
    train_table, train_labels = _load(data_dir / "train.beton", train_indices, cfg, device, threads, cfg.translate)
    n_test = found["test_images"]
    test_indices = np.arange(min(n_test, cfg.test_subset) if cfg.test_subset else n_test)
    test_table, test_labels = _load(data_dir / "test.beton", test_indices, cfg, device, threads, 0)
    test_shard = torch.from_numpy(shard_indices(test_labels.shape[0], rank, world).astype(np.int64))
    train = ResidentLoader(train_table, train_labels, cfg, train=True, seed=seed, rank=rank, world=world, threads=threads)
    test = ResidentLoader(test_table, test_labels, cfg, train=False, world=world, indices=test_shard, threads=threads)
    return train, test


def _load(path: Path, indices: np.ndarray, cfg: DataConfig, device: torch.device, threads: int,
          pad: int) -> tuple[PixelTable, torch.Tensor]:
    images, labels = read_beton(path, workers=cfg.num_workers, indices=indices)
    torch.set_num_threads(threads)  # ffcv changed it; normalising is torch's work
    return pixel_table(images.to(device), DTYPES[cfg.dtype], pad), labels.to(device)


def build_resident_val_loader(cfg: DataConfig, group: Dist, threads: int | None = None) -> ResidentLoader:
    """The validation loader: the held-out images of train.beton in a table of their own, read as
    the test set is (in order, this rank's shard, no augmentation)."""
    data_dir, val = held_out(cfg)
    threads = threads or default_threads()
    table, labels = _load(data_dir / "train.beton", val, cfg, group.device, threads, 0)
    shard = torch.from_numpy(shard_indices(len(val), group.rank, group.world_size).astype(np.int64))
    return ResidentLoader(table, labels, cfg, train=False, world=group.world_size, indices=shard, threads=threads)
