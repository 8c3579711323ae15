"""The FFCV train and test loaders (`data.loader: ffcv`), built from a DataConfig in one place.

Train: RANDOM order, flip / translate / cutout as configured, sharded across ranks by ffcv
(`distributed=True`, reshuffled every epoch). Test: SEQUENTIAL, no augmentation, each rank reading
a disjoint slice of its own (common.shard_indices). Validation (data.val_split): the held-out images
of train.beton, read like the test set. All normalise with the CIFAR-10 mean/std, hand
out NCHW tensors (channels_last in memory if configured) of the configured dtype with int64 labels,
and move batches to CUDA inside the ffcv pipeline when the device is a GPU.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from queue import Empty

import numpy as np
import torch

from trainer import UserError
from trainer.cli import described
from trainer.config import DataConfig
from trainer.data.checks import check_beton, verify
from trainer.data.cifar10 import MEAN, STD
from trainer.data.common import (
    DTYPES, MEAN_PIXEL, WITHOUT_FFCV, check_data_dir, check_train_batch, default_threads, held_out, import_ffcv,
    loader_workers, per_process_batch, shard_indices, train_val_indices,
)
from trainer.distributed import Dist

# ffcv decodes an epoch in a thread of its own (its EpochIterator), ahead of the training loop, into
# a queue that the loop's next() waits on. A thread that dies (numba failing to compile the
# pipeline on its first batch, a read that fails) would leave that wait unanswered for ever, after
# a traceback on stderr. The thread hook, set by ffcv_loader, keeps such a thread's error instead
# and puts ffcv's own end-of-epoch marker in its queue; check_epoch then raises the error as one line.
_thread_errors: weakref.WeakKeyDictionary[threading.Thread, BaseException] = weakref.WeakKeyDictionary()


class _KeepFFCVThreadErrors:
    """A threading.excepthook for ffcv's epoch threads; any other thread's error goes to the hook
    it replaced."""

    def __init__(self, others) -> None:
        self.others = others

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        thread = args.thread
        if type(thread).__name__ != "EpochIterator" or not type(thread).__module__.startswith("ffcv."):
            self.others(args)
            return
        _thread_errors[thread] = args.exc_value
        thread.output_queue.put(None)


def check_epoch(batches: Iterator, path: str | Path) -> None:
    """After an ffcv epoch's iterator ended: if its thread died rather than finished, a UserError
    naming the file and the thread's error, in one line."""
    error = _thread_errors.pop(batches, None)
    if error is not None:
        raise UserError(f"{path}: ffcv's loader thread failed ({described(error)}); ./setup.sh installs "
                        f"ffcv and numba at the tested versions, or {WITHOUT_FFCV}")


def ffcv_loader(path: str | Path, **options):
    """ffcv's Loader of the .beton at `path`, or a UserError naming the file if ffcv cannot start
    one here."""
    import_ffcv()
    from ffcv.loader import Loader

    # Set for every loader, not once: a hook set since (pytest sets its own for each test) replaces it.
    if not isinstance(threading.excepthook, _KeepFFCVThreadErrors):
        threading.excepthook = _KeepFFCVThreadErrors(threading.excepthook)
    try:
        return Loader(str(path), **options)
    except (ValueError, MemoryError) as e:  # numba's refusal of a thread count, no memory for the buffers
        raise UserError(f"{path}: ffcv could not start its loader ({described(e)})") from None


class FFCVLoader:
    """An ffcv Loader (a BatchLoader) that also puts torch's CPU thread count back after starting
    each epoch.

    ffcv sets torch's thread count to its own worker count on import and at every epoch start, the
    latter in its decoding thread as that starts (a race with this process's own setting, which
    that thread won on one core); left alone, the model would then run with as many threads as the
    loader decodes with.
    """

    def __init__(self, loader, threads: int, num_samples: int, batch_size: int):
        self.loader = loader
        self.threads = threads
        self.num_samples = num_samples  # images this rank sees per epoch
        self.batch_size = batch_size  # this process's batch (the last of a test epoch may be shorter)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch  # ffcv shuffles with seed + epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)
        try:
            for i, batch in enumerate(batches):
                if i == 0:  # ffcv's thread set its count as it started, before its first batch: ours again
                    torch.set_num_threads(self.threads)
                yield batch
            check_epoch(batches, self.loader.fname)
        finally:
            # Left mid-epoch (an error, a stop signal), ffcv's thread goes on decoding with numba,
            # and a process that exits while it does aborts ("terminate called without an active
            # exception"). Told to stop, the thread ends once its queue stays full for 0.5 s; a slot
            # freed each second lets through the end-of-epoch marker it may be blocked on.
            batches.terminate_event.set()
            while batches.is_alive():
                batches.join(timeout=1)
                with suppress(Empty):
                    batches.output_queue.get_nowait()
            batches.close()


def _image_pipeline(cfg: DataConfig, train: bool, device: torch.device) -> list:
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import Convert, Cutout, RandomHorizontalFlip, RandomTranslate, ToTensor, ToTorchImage
    from torchvision.transforms import Normalize

    ops: list = [SimpleRGBImageDecoder()]
    if train and cfg.flip:
        ops.append(RandomHorizontalFlip())
    if train and cfg.translate:
        ops.append(RandomTranslate(padding=cfg.translate, fill=MEAN_PIXEL))
    if train and cfg.cutout:
        ops.append(Cutout(cfg.cutout, fill=MEAN_PIXEL))
    ops.append(ToTensor())
    # channels_last: ToTorchImage only permutes the dimensions of the (NHWC) batch, wherever it is.
    # Otherwise it copies into an NCHW buffer that ffcv always allocates on the CPU, so it must
    # run before the batch moves to the GPU, or the model gets a CPU tensor.
    if not cfg.channels_last:
        ops.append(ToTorchImage(channels_last=False))
    if device.type == "cuda":
        ops.append(_to_device(device))
    if cfg.channels_last:
        ops.append(ToTorchImage(channels_last=True))
    ops += [
        # Normalise in float32 and only then narrow, so bf16/fp16 round the final values once.
        Convert(torch.float32),
        Normalize([255 * m for m in MEAN], [255 * s for s in STD]),
    ]
    if cfg.dtype != "float32":
        ops.append(Convert(DTYPES[cfg.dtype]))
    return ops


def _label_pipeline(device: torch.device) -> list:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Convert, Squeeze, ToTensor

    ops: list = [IntDecoder(), ToTensor(), Squeeze(1), Convert(torch.int64)]  # cross-entropy wants int64
    if device.type == "cuda":
        ops.append(_to_device(device))
    return ops


def _to_device(device: torch.device):
    """The copy of a decoded batch to the GPU, in ffcv's loader thread.

    ffcv decodes into a ring of batches_ahead + 2 pinned host buffers and reuses them without
    waiting for the GPU: it only makes its copy stream wait for the training stream, which holds the
    GPU buffers, not the host ones. With an asynchronous copy, a training thread that runs further
    ahead of the GPU than the ring (small, fast steps queue up) lets ffcv overwrite a host buffer
    before its copy has run, and the GPU trains on a later batch's images. A blocking copy ends
    before ffcv's thread decodes the next batch, so the buffer is free again, and it holds that
    thread (hence the training thread, which waits for batches) within the ring of the GPU; it
    costs the loader thread the copy time (0.8 MB per 256 images), not the training thread. A GPU
    run must confirm the throughput and that batches arrive intact (data.loader: resident, which
    keeps the data on the GPU, has no such ring and is the faster choice there anyway).
    """
    from ffcv.transforms import ToDevice

    return ToDevice(device, non_blocking=False)


def _eval_loader(path: Path, indices: np.ndarray, cfg: DataConfig, batch: int, device: torch.device):
    """SEQUENTIAL over `indices` (this rank's shard), no augmentation: the test pipeline, which
    the validation images get too."""
    from ffcv.loader import OrderOption

    return ffcv_loader(
        path,
        batch_size=batch,
        num_workers=loader_workers(cfg.num_workers),
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        indices=indices.astype(np.uint64),
        os_cache=True,
        pipelines={"image": _image_pipeline(cfg, False, device), "label": _label_pipeline(device)},
    )


def build_ffcv_loaders(
    cfg: DataConfig, group: Dist, seed: int = 0, threads: int | None = None
) -> tuple[FFCVLoader, FFCVLoader]:
    """(train, test) FFCV loaders for this process, sharded by the group's rank. Training reads
    train.beton without the validation split's images (common.train_val_indices)."""
    device = group.device
    data_dir = check_data_dir(cfg.dir)
    import_ffcv()
    from ffcv.loader import OrderOption

    found = verify(data_dir, warn=group.rank == 0)  # before ffcv reads a byte: it trusts any file
    threads = threads or default_threads()
    rank, world = group.rank, group.world_size

    train_indices, _ = train_val_indices(check_beton(data_dir / "train.beton"), cfg)
    n_train = len(train_indices)
    check_train_batch(cfg.batch_size, n_train)
    batch = per_process_batch(cfg.batch_size, world)  # data.batch_size is the global batch
    train = ffcv_loader(
        data_dir / "train.beton",
        batch_size=batch,
        num_workers=loader_workers(cfg.num_workers),
        order=OrderOption.RANDOM,
        drop_last=True,  # equal-sized steps keep BatchNorm statistics and DDP ranks in step
        distributed=world > 1,
        seed=seed,
        indices=train_indices.astype(np.uint64),
        # One page-cache copy of the file shared by every rank on the node.
        os_cache=True,
        pipelines={"image": _image_pipeline(cfg, True, device), "label": _label_pipeline(device)},
    )

    n_test = found["test_images"]
    if cfg.test_subset:
        n_test = min(n_test, cfg.test_subset)
    shard = shard_indices(n_test, rank, world)
    test = _eval_loader(data_dir / "test.beton", shard, cfg, batch, device)
    # Importing ffcv and building loaders reset torch's thread count.
    torch.set_num_threads(threads)
    train_per_rank = (n_train // world // batch) * batch
    return FFCVLoader(train, threads, train_per_rank, batch), FFCVLoader(test, threads, len(shard), batch)


def build_ffcv_val_loader(cfg: DataConfig, group: Dist, threads: int | None = None) -> FFCVLoader:
    """The validation loader: the held-out images of train.beton through the test pipeline,
    sharded across ranks as the test set is, so each is counted once."""
    data_dir, val = held_out(cfg)
    threads = threads or default_threads()
    shard = val[shard_indices(len(val), group.rank, group.world_size).astype(np.int64)]
    batch = per_process_batch(cfg.batch_size, group.world_size)
    loader = _eval_loader(data_dir / "train.beton", shard, cfg, batch, group.device)
    torch.set_num_threads(threads)
    return FFCVLoader(loader, threads, len(shard), batch)
