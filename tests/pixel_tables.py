"""Pixel tables of random images and what the augmentation tests read back from them, shared by
tests/test_resident.py and tests/test_augment.py."""

from __future__ import annotations

import torch

from trainer.data.augment import PixelTable, pixel_indices, pixel_table


def random_table(n: int, pad: int = 0, seed: int = 0) -> PixelTable:
    """A float32 pixel table of n random images."""
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return pixel_table(images, torch.float32, pad)


def unaugmented(table: PixelTable) -> torch.Tensor:
    """All of a table's images, unaugmented, NHWC."""
    return table.gather(pixel_indices(table, torch.arange(table.images)))


def shifts_of(x: torch.Tensor, padded: torch.Tensor, t: int) -> list[tuple[int, int]]:
    """For each image of `x` (NHWC), the one shift (dy, dx) within +-t that crops it out of its
    `padded` source (padded by t on each side); fails if an image is none or several of them."""
    shifts = []
    for i in range(x.shape[0]):
        matches = [(dy, dx) for dy in range(-t, t + 1) for dx in range(-t, t + 1)
                   if torch.equal(x[i], padded[i, t + dy : t + dy + 32, t + dx : t + dx + 32])]
        assert len(matches) == 1, f"image {i} is no shift of its padded source"
        shifts.append(matches[0])
    return shifts
