"""Evaluation (test and validation sets) as the trainer does it, shared with the report's ensemble."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.training.collectives import all_reduce_sum


def tta_views(tta: bool, tta_translate: int) -> int:
    """How many forwards `predict` runs per batch: 1, 2 (the mirror pair) or 6 (the mirror pair,
    unshifted and shifted both ways)."""
    if tta_translate < 0:
        raise ValueError(f"tta_translate: must be 0 or more, got {tta_translate}")
    if tta_translate and not tta:
        raise ValueError("tta_translate: the shifted views are mirror pairs; needs tta")
    return 1 if not tta else 6 if tta_translate else 2


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The images of `x` (..., H, W) moved `dy` pixels down and `dx` right (negative: up, left), the
    uncovered border filled by reflection, in x's dtype and memory format. |dy|, |dx| must be below H, W (reflect
    padding's own limit)."""
    py, px = abs(dy), abs(dx)
    h, w = x.shape[-2:]
    if py >= h or px >= w:
        raise ValueError(f"tta_translate: a shift of {max(py, px)} pixels needs images larger than that, got {h}x{w}")
    # Back to x's dtype: autocast runs reflect padding in float32, and a float32 view would make a
    # compiled network trace (and compile) a second graph for it.
    padded = F.pad(x, (px, px, py, py), mode="reflect").to(x.dtype)
    # Output pixel (i, j) is input pixel (i - dy, j - dx), which sits at (i - dy + py, j - dx + px) in `padded`.
    top, left = py - dy, px - dx
    return padded[..., top:top + h, left:left + w].contiguous(memory_format=_memory_format(x))


def predict(net: nn.Module, x: torch.Tensor, tta: bool, amp_dtype: torch.dtype | None,
            tta_translate: int = 0) -> torch.Tensor:
    """float32 logits of one batch, under autocast in `amp_dtype` (None: no autocast); with `tta`,
    the mean with those of the mirror image, which is as likely as the image itself. With
    `tta_translate` = k as well (airbench94's TTA level 2), 1/2 of that mirror pair's logits plus 1/4
    of the pair's shifted k pixels up-left and 1/4 shifted k down-right: 6 forwards (tta_views).

    Each view is its own forward of the batch's size rather than one batch of 6x the images: a compiled
    `net` then runs the one graph it was warmed up on."""
    views = tta_views(tta, tta_translate)

    def mirror_pair(v: torch.Tensor) -> torch.Tensor:
        return (net(v).float() + net(v.flip(-1)).float()) / 2

    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if views == 1:
            logits = net(x).float()
        else:
            logits = mirror_pair(x)
        if views == 6:
            k = tta_translate
            logits = logits / 2 + mirror_pair(shift(x, -k, -k)) / 4 + mirror_pair(shift(x, k, k)) / 4
    return logits


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # A 4-D tensor that is channels_last but not also plain contiguous (as 1x1 images or one channel are).
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """`x` with copies of its last image appended up to `size` images, in x's memory format."""
    fill = x[-1:].expand(size - x.shape[0], *x.shape[1:])
    return torch.cat([x, fill]).contiguous(memory_format=_memory_format(x))


def evaluate(
    net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], tta: bool, amp_dtype: torch.dtype | None,
    pad_to: int | None = None, tta_translate: int = 0,
) -> tuple[float, float]:
    """Loss and accuracy (%) of `net` in eval mode over `loader` (see evaluate_counted)."""
    loss, acc, _ = evaluate_counted(net, loader, tta, amp_dtype, pad_to, tta_translate)
    return loss, acc


@torch.no_grad()
def evaluate_counted(
    net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], tta: bool, amp_dtype: torch.dtype | None,
    pad_to: int | None = None, tta_translate: int = 0,
) -> tuple[float, float, int]:
    """Loss, accuracy (%) and the number of images counted, of `net` in eval mode over `loader`.
    Under a process group each rank passes its own shard and the counts are summed, so every rank
    returns the whole set's (and the count shows that each image was counted once).

    pad_to: the batch size every forward gets. A compiled `net` would otherwise compile a second
    graph for the last, shorter batch; the padding's logits are dropped before anything is counted
    (eval mode: each image's logits do not depend on the others in the batch).
    tta, tta_translate: the views averaged (see predict)."""
    net.eval()
    device = next(net.parameters()).device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for x, y in loader:
        n = y.shape[0]
        if pad_to is not None and n < pad_to:
            logits = predict(net, _padded(x, pad_to), tta, amp_dtype, tta_translate)[:n]
        else:
            logits = predict(net, x, tta, amp_dtype, tta_translate)
        loss = F.cross_entropy(logits, y, reduction="sum")
        sums += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double(), torch.full_like(loss, n).double()])
    all_reduce_sum(sums, device)
    loss_sum, correct, count = sums.tolist()
    return loss_sum / count, 100.0 * correct / count, int(count)
