"""CIFAR-10 data: the conversion to FFCV .beton files (cifar10) and the two training loaders —
ffcv_loader (ffcv pipelines) and resident (the whole set kept on the device, augmented there by
augment's index arithmetic) — which offer the same interface (common.BatchLoader) and are chosen by
`data.loader`. The resident loader also reads the official batch files directly (`data.format:
python`); ffcv is imported only where a .beton is read or written, so that path runs where ffcv
does not import."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.config import DataConfig

# The loaders' modules import torch: they are imported when a loader is built, so that this package's
# command (`python -m trainer.data`) refuses a mistaken command line at once (issue #21).
if TYPE_CHECKING:
    from trainer.data.common import BatchLoader
    from trainer.distributed import Dist


def build_loaders(
    cfg: DataConfig, group: Dist, seed: int = 0, threads: int | None = None
) -> tuple[BatchLoader, BatchLoader]:
    """(train, test) loaders of the kind `cfg.loader` names, for this process's place in the group."""
    if cfg.loader == "resident":
        from trainer.data.resident import build_resident_loaders as build
    else:
        from trainer.data.ffcv_loader import build_ffcv_loaders as build
    return build(cfg, group, seed, threads)


def build_val_loader(cfg: DataConfig, group: Dist, threads: int | None = None) -> BatchLoader | None:
    """The validation loader of the kind `cfg.loader` names (None when data.val_split is 0): the
    images build_loaders' training loader leaves out, with the test set's pipeline and sharding."""
    if not cfg.val_split:
        return None
    if cfg.loader == "resident":
        from trainer.data.resident import build_resident_val_loader as build
    else:
        from trainer.data.ffcv_loader import build_ffcv_val_loader as build
    return build(cfg, group, threads)


def __getattr__(name: str) -> Any:
    if name == "BatchLoader":  # `from trainer.data import BatchLoader`, as when it was imported here
        from trainer.data.common import BatchLoader

        return BatchLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BatchLoader", "build_loaders", "build_val_loader"]
