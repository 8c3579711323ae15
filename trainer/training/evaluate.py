"""Evaluation (test and validation sets) as the trainer does it, shared with the report's ensemble."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.training.collectives import all_reduce_sum


def predict(net: nn.Module, x: torch.Tensor, tta: bool, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """float32 logits of one batch, under autocast in `amp_dtype` (None: no autocast); with `tta`,
    the mean with those of the mirror image, which is as likely as the image itself."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = net(x).float()
        if tta:
            logits = (logits + net(x.flip(-1)).float()) / 2
    return logits


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """`x` with copies of its last image appended up to `size` images, in x's memory format."""
    fill = x[-1:].expand(size - x.shape[0], *x.shape[1:])
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.cat([x, fill]).contiguous(memory_format=memory_format)


def evaluate(
    net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], tta: bool, amp_dtype: torch.dtype | None,
    pad_to: int | None = None,
) -> tuple[float, float]:
    """Loss and accuracy (%) of `net` in eval mode over `loader` (see evaluate_counted)."""
    loss, acc, _ = evaluate_counted(net, loader, tta, amp_dtype, pad_to)
    return loss, acc


@torch.no_grad()
def evaluate_counted(
    net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], tta: bool, amp_dtype: torch.dtype | None,
    pad_to: int | None = None,
) -> tuple[float, float, int]:
    """Loss, accuracy (%) and the number of images counted, of `net` in eval mode over `loader`.
    Under a process group each rank passes its own shard and the counts are summed, so every rank
    returns the whole set's (and the count shows that each image was counted once).

    pad_to: the batch size every forward gets. A compiled `net` would otherwise compile a second
    graph for the last, shorter batch; the padding's logits are dropped before anything is counted
    (eval mode: each image's logits do not depend on the others in the batch)."""
    net.eval()
    device = next(net.parameters()).device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for x, y in loader:
        n = y.shape[0]
        if pad_to is not None and n < pad_to:
            logits = predict(net, _padded(x, pad_to), tta, amp_dtype)[:n]
        else:
            logits = predict(net, x, tta, amp_dtype)
        loss = F.cross_entropy(logits, y, reduction="sum")
        sums += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double(), torch.full_like(loss, n).double()])
    all_reduce_sum(sums, device)
    loss_sum, correct, count = sums.tolist()
    return loss_sum / count, 100.0 * correct / count, int(count)
