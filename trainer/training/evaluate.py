"""Test-set evaluation as the trainer does it, shared with the report's ensemble."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.distributed import all_reduce_sum


def predict(net: nn.Module, x: torch.Tensor, tta: bool, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """float32 logits of one batch, under autocast in `amp_dtype` (None: no autocast); with `tta`,
    the mean with those of the mirror image, which is as likely as the image itself."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = net(x).float()
        if tta:
            logits = (logits + net(x.flip(-1)).float()) / 2
    return logits


@torch.no_grad()
def evaluate(
    net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], tta: bool, amp_dtype: torch.dtype | None
) -> tuple[float, float]:
    """Test loss and accuracy (%) of `net` in eval mode over `loader`. Under a process group each
    rank passes its own shard and the counts are summed, so every rank returns the whole set's."""
    net.eval()
    device = next(net.parameters()).device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for x, y in loader:
        logits = predict(net, x, tta, amp_dtype)
        loss = F.cross_entropy(logits, y, reduction="sum")
        sums += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double(), sums.new_tensor(y.shape[0])])
    all_reduce_sum(sums)
    loss_sum, correct, count = sums.tolist()
    return loss_sum / count, 100.0 * correct / count
