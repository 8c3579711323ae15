"""Evaluation (test and validation sets) as the trainer does it (Evaluator), shared with the report's ensemble."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import closing
from itertools import islice
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.distributed import Dist
from trainer.training.collectives import all_reduce_sum, broadcast
from trainer.training.ema import EMA
from trainer.training.lookahead import Lookahead


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


Evaluation = tuple[float, float, int]  # loss, accuracy (%), images counted


class Evaluator:
    """The trainer's evaluations: the test set's and, with data.val_split, the validation set's,
    each rank its shard, every forward of `pad_to` images (evaluate_counted), with the run's TTA.
    Which network to evaluate is the trainer's to say (the EMA's, the compiled model)."""

    def __init__(self, test_loader: Any, val_loader: Any | None, tta: bool, tta_translate: int,
                 amp_dtype: torch.dtype | None, pad_to: int, ffcv: bool) -> None:
        self.test_loader, self.val_loader = test_loader, val_loader
        self.tta, self.tta_translate, self.amp_dtype, self.pad_to = tta, tta_translate, amp_dtype, pad_to
        self.ffcv = ffcv  # an ffcv loader compiles its pipeline on its first batch

    @torch.no_grad()
    def warm_up(self, net: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format,
                device: torch.device) -> None:
        """Runs `net` once on a dummy batch of the one shape evaluation uses (every batch is padded
        to `pad_to` images): a compiled network's eval graph compiles on its first batch, and so
        its time can be counted apart."""
        x = torch.zeros(self.pad_to, 3, 32, 32, dtype=dtype, device=device)
        net.eval()
        predict(net, x.contiguous(memory_format=memory_format), self.tta, self.amp_dtype, self.tta_translate)

    def _run(self, net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Evaluation:
        return evaluate_counted(net, loader, self.tta, self.amp_dtype, self.pad_to, self.tta_translate)

    def test(self, net: nn.Module) -> Evaluation:
        return self._run(net, self.test_loader)

    def both(self, net: nn.Module) -> tuple[Evaluation | None, Evaluation]:
        """The validation set's (None without one) and the test set's loss, accuracy and count."""
        val = self._run(net, self.val_loader) if self.val_loader is not None else None
        return val, self.test(net)

    def cost_s(self, net: nn.Module) -> float:
        """One evaluation's cost on this rank: a few test batches timed, scaled to the test and
        validation sets' batches (each costs the same: they are padded to one size). With ffcv an
        untimed batch first takes the compilation of the new loader's pipeline (7-12 s, once)."""
        batches = sum(len(loader) for loader in (self.test_loader, self.val_loader) if loader is not None)
        warm = 1 if self.ffcv and len(self.test_loader) > 1 else 0
        timed = min(2, len(self.test_loader) - warm)
        with closing(iter(self.test_loader)) as test_batches:
            if warm:
                self._run(net, islice(test_batches, warm))
            start = time.perf_counter()
            self._run(net, islice(test_batches, timed))  # ends with a host sync (the counts)
            return (time.perf_counter() - start) / timed * batches


def same_buffers_on_every_rank(model: nn.Module, ema: EMA | None, lookahead: Lookahead | None, group: Dist) -> None:
    """Gives every rank rank 0's BatchNorm statistics (and EMA buffers) before an evaluation.

    DDP broadcasts buffers at the start of each forward, but each rank then updates its own
    running statistics from its own batch, so after the last step they differ slightly; the
    ranks must evaluate, and end, with the same model. The lookahead's slow copies of the buffers
    too: each rank lerps its own statistics into them, and a resumed run loads rank 0's on every
    rank, so they must agree.
    """
    if group.enabled:
        slow = [lookahead.slow[name] for name, _ in model.named_buffers() if name in lookahead.slow] if lookahead else []
        broadcast([*model.buffers(), *(ema.buffers() if ema else []), *slow], group.device)
