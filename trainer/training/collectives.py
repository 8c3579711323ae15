"""Every collective the trainer makes, in one place: on tensors (all_reduce_*, broadcast), with an
optional strict check of where those tensors live (TRAINER_STRICT_COLLECTIVES=1, for tests), and on
Python objects (broadcast_object, all_gather_object). Each is a no-op without a process group, so
one process runs the same code. Joining and leaving the group is trainer/distributed.py's.

NCCL accepts only tensors on the rank's GPU; gloo accepts CPU tensors too, so a tensor left on the
CPU by mistake (a buffer created without `device=`) passes every CPU test and crashes the first
multi-GPU run. On a CPU machine every tensor is on "cpu", so a device comparison alone cannot see
that mistake. Strict mode therefore also records, while the trainer builds and runs, every tensor
made by a factory function (torch.tensor, torch.zeros, ...) without an explicit device, forgetting
it once its module is moved with `Module.to(device)`; such a tensor handed to a collective is an
error, because on a GPU it would be on the CPU. Tensors made from others (new_*, *_like,
arithmetic) take their device from them and are fine. The tracking costs a Python call per torch
op: for tests only (the 2-process DDP test runs with it).
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from trainer.distributed import Dist

STRICT = os.environ.get("TRAINER_STRICT_COLLECTIVES") == "1"  # read here only

# Factory functions whose tensors land on the default device (the CPU) unless told otherwise.
_FACTORIES = frozenset({
    torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.arange, torch.range, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn,
    torch.randint, torch.randperm, torch.empty_strided,
})


class StrictCollectiveError(AssertionError):
    pass


class _PlacementTracker(TorchFunctionMode):
    """Remembers (weakly) the tensors made by a factory without a device, until moved to one."""

    def __init__(self) -> None:
        super().__init__()
        self._implicit: dict[int, weakref.ref] = {}  # by id: tensors compare elementwise, so no WeakSet

    def is_implicit(self, t: torch.Tensor) -> bool:
        ref = self._implicit.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is None and isinstance(result, torch.Tensor):
            key = id(result)
            self._implicit[key] = weakref.ref(result, lambda _, key=key: self._implicit.pop(key, None))
        elif func is torch.Tensor.to and _called_by_module_to():
            # Placed with the rest of its module by Module.to(device). Not any Tensor.to: on the CPU
            # `t.to(other.device)` returns t itself, which is then no more placed than before.
            self._implicit.pop(id(result), None)
        return result


def _called_by_module_to() -> bool:
    """Whether the Tensor.to being handled was called by nn.Module.to (its inner `convert`)."""
    caller = sys._getframe(2).f_code  # 0: this function, 1: __torch_function__, 2: who called Tensor.to
    return caller.co_name == "convert" and caller.co_filename == _MODULE_FILE


_MODULE_FILE = torch.nn.Module.to.__code__.co_filename

# One tracker for the process: what it recorded while building the trainer counts while it runs.
_tracker = _PlacementTracker() if STRICT else None
_active = False


@contextmanager
def tracking() -> Iterator[None]:
    """In strict mode, records the tensors made without a device while inside (re-entrant); else nothing."""
    global _active
    if _tracker is None or _active:
        yield
        return
    _active = True
    try:
        with _tracker:
            yield
    finally:
        _active = False


def check(tensors: list[torch.Tensor], device: torch.device, what: str) -> None:
    """In strict mode: every tensor is on `device` and none was made without an explicit device."""
    if not STRICT:
        return
    for i, t in enumerate(tensors):
        if t.device != device:
            raise StrictCollectiveError(f"{what}: tensor {i} {tuple(t.shape)} is on {t.device}, not {device}")
        if _tracker is not None and _tracker.is_implicit(t):
            raise StrictCollectiveError(
                f"{what}: tensor {i} {tuple(t.shape)} {t.dtype} was created without device= and never moved: "
                f"on a GPU it would be a CPU tensor, which NCCL rejects"
            )


def _all_reduce(t: torch.Tensor, device: torch.device, op: dist.ReduceOp.RedOpType, what: str) -> torch.Tensor:
    check([t], device, what)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` summed over the ranks, in place (and returned)."""
    return _all_reduce(t, device, dist.ReduceOp.SUM, "all_reduce_sum")


def all_reduce_max(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t`'s elementwise maximum over the ranks, in place (and returned)."""
    return _all_reduce(t, device, dist.ReduceOp.MAX, "all_reduce_max")


def all_reduce_min(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t`'s elementwise minimum over the ranks, in place (and returned)."""
    return _all_reduce(t, device, dist.ReduceOp.MIN, "all_reduce_min")


def broadcast(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Rank 0's values of `tensors` on every rank."""
    check(tensors, device, "broadcast")
    if dist.is_initialized():
        for t in tensors:
            dist.broadcast(t, src=0)


def broadcast_object(value: Any, group: Dist) -> Any:
    """Rank 0's `value` (any picklable object), on every rank."""
    if not group.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value: Any, group: Dist) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not group.enabled:
        return [value]
    values: list[Any] = [None] * group.world_size
    dist.all_gather_object(values, value)
    return values
