"""CIFAR-10 data: the conversion to FFCV .beton files (cifar10) and the two training loaders —
ffcv_loader (ffcv pipelines) and resident (the whole set kept on the device) — which offer the
same interface (common.BatchLoader) and are chosen by `data.loader`."""

from __future__ import annotations


from trainer.config import DataConfig
from trainer.data.common import BatchLoader
from trainer.data.ffcv_loader import build_ffcv_loaders
from trainer.data.resident import build_resident_loaders
from trainer.distributed import Dist


def build_loaders(
    cfg: DataConfig, group: Dist, seed: int = 0, threads: int | None = None
) -> tuple[BatchLoader, BatchLoader]:
    """(train, test) loaders of the kind `cfg.loader` names, for this process's place in the group."""
    build = build_resident_loaders if cfg.loader == "resident" else build_ffcv_loaders
    return build(cfg, group, seed, threads)


__all__ = ["BatchLoader", "build_loaders"]
