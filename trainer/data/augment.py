"""The resident loader's augmentations, on the device: a table of normalised pixel rows
(PixelTable), and each batch as one gather from it.

The images are normalised once, on the device, with the same operations in the same order as the
FFCV loader (to float32, subtract the mean, divide by the std, then cast to `data.dtype`), into a
table of pixel rows: each image row padded on both sides with `translate` pixels of the fill colour
(the mean pixel, normalised), plus one row of fill. A batch is one gather from that table: the pixel
indices carry the epoch's order, the flip, the translation (shifted-in columns land in the padding,
shifted-in rows on the fill row) and the cutout square (set to a fill pixel). Because normalising and
casting act on each value alone, gathering normalised values gives bit for bit what augmenting the
uint8 pixels and normalising afterwards gives. Storing them normalised trades memory (768 MB of
float32 or 384 MB of bfloat16 for the training set with translate 4, against 150 MB of uint8) for
skipping the conversion of every batch, which is most of the per-batch cost on a CPU.

Reflect translation (data.translate_mode=reflect) mirrors the shift indices at the border, so its
table needs no padding. Cutmix is a change of pixel indices too (the partner's indices pasted into a
box); mixup blends the gathered values. Each batch's random numbers come from the generators the
caller seeds (trainer/data/resident.py), so a resumed epoch draws what the original drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.data.cifar10 import MEAN, NUM_CLASSES, SIDE, STD
from trainer.data.common import MEAN_PIXEL


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


def normalise(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 pixels (channels last) -> normalised exactly as the FFCV pipeline does it: to float32,
    subtract 255 x mean, divide by 255 x std, cast to `dtype`."""
    mean = torch.tensor([255 * m for m in MEAN], dtype=torch.float32, device=x.device)
    std = torch.tensor([255 * s for s in STD], dtype=torch.float32, device=x.device)
    return x.to(torch.float32).sub_(mean).div_(std).to(dtype)


def pixel_table(images: torch.Tensor, dtype: torch.dtype, pad: int = 0, chunk: int = 5000) -> PixelTable:
    """(N, 32, 32, 3) uint8 -> a PixelTable in `dtype`, every value normalised as the FFCV pipeline
    does it (normalise). The fill is the mean pixel of the uint8 images (ffcv's fill for translate
    and cutout) normalised the same way."""
    device = images.device
    n, width = images.shape[0], SIDE + 2 * pad
    fill = normalise(torch.tensor(MEAN_PIXEL, dtype=torch.uint8, device=device), dtype)
    table = torch.empty(n * SIDE + 1, width, 3, dtype=dtype, device=device)
    table[:, :pad] = fill
    table[:, pad + SIDE :] = fill
    table[-1] = fill
    for start in range(0, n, chunk):
        part = images[start : start + chunk]
        table[start * SIDE : (start + part.shape[0]) * SIDE, pad : pad + SIDE] = normalise(part, dtype).flatten(0, 1)
    return PixelTable(table.view(-1, 3), n, pad)


def pixel_indices(
    table: PixelTable,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    flip: float = 0.0,
    translate: int = 0,
    cutout: int = 0,
    *,
    mirror: torch.Tensor | None = None,
    reflect: bool = False,
) -> torch.Tensor:
    """(B, 32, 32) indices of the table's pixels that make up the batch of `images` (image
    numbers), augmented. Random numbers are drawn on the images' device in a fixed order: flip,
    vertical shift, horizontal shift, cutout row, cutout column.

    flip: probability of mirroring an image left-right; mirror: (B,) bools that say which images to
    mirror instead (no flip drawn). translate: shift by up to this many pixels in each direction,
    uniformly, showing the fill colour where the image moved away (as ffcv's RandomTranslate: pad,
    then crop at a random offset; at most the table's pad), or with reflect the image mirrored at
    its border (as torch's reflect padding; at most 31). cutout: side of a square of fill colour,
    placed uniformly inside the image (as ffcv's Cutout).
    """
    if reflect and translate >= SIDE:
        raise ValueError(f"translate={translate}: reflect padding shifts by at most {SIDE - 1} pixels")
    if not reflect and translate > table.pad:
        raise ValueError(f"translate={translate} needs a table padded by at least that much (pad={table.pad})")
    b, device = images.shape[0], images.device
    kw = {"generator": generator, "device": device}
    pos = torch.arange(SIDE, device=device)
    rows = pos.expand(b, SIDE)
    cols = pos.expand(b, SIDE)
    if mirror is None and flip:
        mirror = torch.rand(b, **kw) < flip
    if mirror is not None:
        cols = torch.where(mirror[:, None], SIDE - 1 - pos, pos)
    if translate:
        # Output pixel (i, j) shows source pixel (i + dy, j + dx).
        rows = rows + torch.randint(-translate, translate + 1, (b, 1), **kw)
        cols = cols + torch.randint(-translate, translate + 1, (b, 1), **kw)
        if reflect:  # as torch's reflect padding: -1 shows 1 and 32 shows 30 (the border is not repeated)
            rows, cols = (torch.where(v > SIDE - 1, 2 * (SIDE - 1) - v, v.abs()) for v in (rows, cols))
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


@dataclass(frozen=True)
class MixPlan:
    """How one training batch is mixed: image i with its partner, image (i - shift) mod B (what
    torch.roll(x, shift, 0) puts at i). The batch is in a random order already, so a random roll
    is a random pairing, and one that never pairs an image with itself (for B > 1)."""

    lam: float  # the share of its own image (and label) each image keeps; cutmix: the exact kept area
    shift: int
    box: tuple[int, int, int, int] | None  # cutmix: (top, bottom, left, right) pasted from the partner; None = mixup


def draw_mix_plan(rng: np.random.Generator, batch: int, mixup: float, cutmix: float, mix_prob: float) -> MixPlan | None:
    """The batch's plan (None: not mixed) from its own generator: mixed with probability mix_prob;
    with both ops on, cutmix or mixup with probability 1/2 each; lam ~ Beta(alpha, alpha), one per
    batch (as timm). Cutmix's box covers about (1 - lam) of the image, centred uniformly and cut
    at the border (as timm's rand_bbox); lam is then the area actually kept."""
    if not (mixup or cutmix) or rng.random() >= mix_prob:
        return None
    use_cutmix = bool(cutmix) and (not mixup or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    shift = int(rng.integers(1, batch)) if batch > 1 else 0
    if not use_cutmix:
        return MixPlan(lam, shift, None)
    side = int(SIDE * math.sqrt(1 - lam))
    cy, cx = (int(c) for c in rng.integers(0, SIDE, 2))
    top, bottom = max(cy - side // 2, 0), min(cy + side - side // 2, SIDE)
    left, right = max(cx - side // 2, 0), min(cx + side - side // 2, SIDE)
    kept = 1 - (bottom - top) * (right - left) / SIDE**2
    return MixPlan(kept, shift, (top, bottom, left, right))


def paste_box(index: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Cutmix on pixel indices: each image's box shows its partner's (augmented) pixels there."""
    top, bottom, left, right = plan.box
    index[:, top:bottom, left:right] = index[:, top:bottom, left:right].roll(plan.shift, 0)
    return index


def mix(x: torch.Tensor, labels: torch.Tensor, plan: MixPlan | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (mixup blends them, computed in float32 then cast back; cutmix has pasted its box
    already) and float32 (B, 10) target probabilities lam x onehot(y) + (1 - lam) x
    onehot(y_partner); an unmixed batch (None) gets its one-hot labels, of the same type."""
    onehot = F.one_hot(labels, NUM_CLASSES).to(torch.float32)
    if plan is None:
        return x, onehot
    if plan.box is None:
        x = (x.to(torch.float32) * plan.lam + x.roll(plan.shift, 0).to(torch.float32) * (1 - plan.lam)).to(x.dtype)
    return x, onehot * plan.lam + onehot.roll(plan.shift, 0) * (1 - plan.lam)
