"""What both training loaders share: the batch dtypes, the fill colour, the validation split,
test-set sharding, the data folder check (of either data.format), thread defaults, and the
interface they both offer (BatchLoader)."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from trainer import UserError
from trainer.config import DataConfig
from trainer.data.checks import check_beton, python_split, verify, verify_python
from trainer.data.cifar10 import MEAN, NUM_CLASSES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Cutout and translate fill with the mean colour, so the filled area is zero after normalisation.
MEAN_PIXEL = tuple(int(round(255 * m)) for m in MEAN)


class BatchLoader(Protocol):
    """The interface of both loaders (FFCVLoader, ResidentLoader), which the trainer relies on.

    Batches are (images, labels): NCHW images normalised with the CIFAR-10 mean/std in the
    configured dtype (channels_last in memory if configured) and int64 labels, on the training
    device. A training loader is sharded by rank with equal steps on every rank; a test loader
    gives each rank a disjoint slice (see shard_indices).
    """

    num_samples: int  # images this rank sees per epoch
    batch_size: int  # this process's batch: data.batch_size / the world size (per_process_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...  # batches per epoch

    def set_epoch(self, epoch: int) -> None:
        """Play `epoch`'s order next; the trainer calls it before each epoch, also when resuming
        in the middle of one."""
        ...


# What to do where ffcv cannot read .beton files: the same images without it (docs/data.md).
WITHOUT_FFCV = ("train without ffcv: data.loader=resident data.format=python, data.dir a cifar-10-batches-py "
                "folder (docs/data.md)")


def import_ffcv() -> None:
    """Imports ffcv, or raises one UserError saying what to do: its wheel and the libraries it links
    (OpenCV, libjpeg-turbo) fail to load with a traceback from deep inside the import otherwise."""
    from trainer.data.numba_cache import cache_ffcv_compiles

    try:
        cache_ffcv_compiles()  # imports ffcv
        import ffcv.loader  # noqa: F401
    except ImportError as e:
        raise UserError(f"data.format=beton: ffcv, which reads the .beton files, does not import here ({e}); "
                        f"./setup.sh installs it with its libraries, or {WITHOUT_FFCV}") from None


_LOWERED: set[tuple[int, int]] = set()  # (asked, allowed) already warned about in this process


def loader_workers(num_workers: int) -> int:
    """data.num_workers, at most the cores this process may use: ffcv decodes on numba threads,
    and numba refuses more threads than cores (a 35-line traceback: "The number of threads must be
    between 1 and 2" on a 2-core machine, where base.yaml's 8 would otherwise crash every recipe).
    More threads than cores would only contend anyway. Nor more than numba allows itself
    (NUMBA_NUM_THREADS, when set lower). Lowered with one warning line per process."""
    import numba  # ffcv's own thread pool: imported by ffcv anyway, where this is asked

    cores = len(os.sched_getaffinity(0))
    allowed = min(cores, numba.config.NUMBA_NUM_THREADS)
    if num_workers <= allowed:
        return num_workers
    if (num_workers, allowed) not in _LOWERED:
        _LOWERED.add((num_workers, allowed))
        limit = (f"the {cores} cores this process may use" if allowed == cores else
                 f"the {allowed} threads numba may start here (NUMBA_NUM_THREADS)")
        print(f"warning: data.num_workers={num_workers} is more than {limit}; using {allowed}", file=sys.stderr)
    return allowed


def default_threads() -> int:
    """CPU threads for torch in this process: the cores we may use, split among the local ranks
    that share them.

    An srun task bound to its CPUs (task/affinity or task/cgroup) has an affinity of its own
    cpus-per-task CPUs: splitting that again among the node's tasks would leave each one thread.
    It is shared when SLURM does not bind (task/none: the affinity is the node's whole allocation)
    and among torchrun's workers (one task's CPUs for all of them).
    """
    cpus = len(os.sched_getaffinity(0))
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and cpus <= int(per_task) and "TORCHELASTIC_RUN_ID" not in os.environ:
        return cpus  # no more CPUs than one task gets: they are this task's own
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // local_world)


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous, disjoint slices that together cover all n test images exactly once.

    ffcv's distributed SEQUENTIAL order pads the last shard with repeated images
    (DistributedSampler), which would count some images twice in the test accuracy whenever
    n is not a multiple of the world size; explicit indices avoid that.
    """
    bounds = np.linspace(0, n, world + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.uint64)


def validation_split(labels: np.ndarray, val_split: int, seed: int) -> np.ndarray:
    """The held-out images of a training set with these labels: val_split / 10 of each class,
    drawn by `seed` alone, as sorted indices into the file.

    A pure function of the labels, the size and the seed: every rank, every resume and every
    loader computes the same split without exchanging it. Each class's draw is a permutation of
    that class's images by a generator of (seed, class), so another size keeps the same order
    (a smaller split is a subset of a larger one) and another seed gives another split.
    """
    per_class = val_split // 10
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if val_split and per_class >= counts.min():
        c = int(counts.argmin())
        raise UserError(f"data.val_split={val_split} holds out {per_class} images of each class, but the training "
                        f"set has {counts[c]} of class {c}, which would leave none to train on; use a smaller "
                        f"data.val_split")
    held = [
        np.random.default_rng([seed, c]).permutation(np.flatnonzero(labels == c))[:per_class]
        for c in range(NUM_CLASSES)
    ]
    return np.sort(np.concatenate(held)).astype(np.int64)


def train_val_indices(labels: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices into train.beton (or the batch files, in their order: the same
    images): the validation split (validation_split), then
    data.train_subset's first images of the rest, in file order. The split is drawn before the
    subset, so a smoke run's validation images are those of the full run with the same seed."""
    val = validation_split(labels, cfg.val_split, cfg.val_seed)
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), val, assume_unique=True)
    if cfg.train_subset:
        train = train[: cfg.train_subset]
    return train, val


def held_out(cfg: DataConfig) -> tuple[Path, np.ndarray]:
    """The data folder and the validation split's indices into its training set, for a validation
    loader. The training loaders verified the folder already in this process (verify caches it)."""
    verify_data(cfg, warn=False)
    _, val = train_val_indices(train_labels(cfg), cfg)
    return Path(cfg.dir), val


def verify_data(cfg: DataConfig, warn: bool = True) -> dict:
    """Checks data.dir in its data.format before a loader reads it (checks.verify for .beton files,
    checks.verify_python for the batch files); returns the record the run's summary holds."""
    if cfg.format == "python":
        return verify_python(cfg.dir)
    data_dir = check_data_dir(cfg.dir)
    import_ffcv()  # the checks read the files' headers with it
    return verify(data_dir, warn=warn)


def train_labels(cfg: DataConfig) -> np.ndarray:
    """The training set's labels in file order, from data.dir in its data.format: what the
    validation split is drawn from. The batch files hold the images in train.beton's order (prepare
    writes them as read_split reads them), so both formats give the same split."""
    if cfg.format == "python":
        return python_split(cfg.dir, "train").labels
    return check_beton(Path(cfg.dir) / "train.beton")


def split_record(labels: np.ndarray, cfg: DataConfig) -> dict | None:
    """What summary.json records of the validation split (None when off): enough to tell that two
    runs held out the same images."""
    if not cfg.val_split:
        return None
    val = validation_split(labels, cfg.val_split, cfg.val_seed)
    return {"images": cfg.val_split, "seed": cfg.val_seed, "per_class": cfg.val_split // 10,
            "indices_sha256": hashlib.sha256(val.astype("<i8").tobytes()).hexdigest()}


def check_data_dir(data_dir: str | os.PathLike) -> Path:
    data_dir = Path(data_dir)
    for name in ("train.beton", "test.beton"):
        if not (data_dir / name).is_file():
            raise UserError(
                f"{data_dir / name}: not found; convert CIFAR-10 first: "
                f"python -m trainer.data prepare --out {data_dir} [--source cifar-10-batches-py]"
            )
    return data_dir


def per_process_batch(batch_size: int, world: int) -> int:
    """Each process's share of the global batch `data.batch_size`: the one place it is split; every
    loader exposes the result as its `batch_size`."""
    if batch_size % world:
        raise UserError(f"data.batch_size={batch_size} (the global batch) does not divide among {world} processes; "
                        f"use a multiple of {world}")
    return batch_size // world


def check_train_batch(batch_size: int, n_train: int) -> None:
    """Refuses a global batch that would leave no full training step."""
    if batch_size > n_train:
        raise UserError(f"data.batch_size={batch_size} exceeds the {n_train} training images")
