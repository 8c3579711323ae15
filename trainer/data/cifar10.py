"""CIFAR-10 in the official "python version" layout -> FFCV .beton files.

    python -m trainer.data prepare --out DIR [--source SRC] [--force]

SRC is a `cifar-10-batches-py/` folder (data_batch_1..5, test_batch, batches.meta), read directly
with pickle rather than through torchvision's class, which refuses any copy whose MD5 sums differ
from the official files. Without --source the official archive is downloaded with torchvision.
Images are stored raw (lossless). Both files are written under temporary names and renamed into
place only after everything was read, validated and written, so an interrupted run or a bad source
never replaces good files. A sidecar (cifar10.json) records what was converted; a second run with
the same sources finds the outputs current and does nothing. Both loaders call verify() before
reading: the files' layout, and their sizes, counts and SHA-256 against the sidecar; a run records
the hashes computed then (data_record).
"""

from __future__ import annotations

import argparse
import json
import pickle
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer import UserError, cli
from trainer.files import atomic_path, sha256, write_text_atomic

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
URL_MD5 = "c58f30108f718f92721af3b95e74349a"  # the official archive's, as published
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
CASES_PER_BATCH = 10_000  # the official files': 5 x 10,000 training and 10,000 test images
NUM_CLASSES = 10
SIDE = 32  # CIFAR-10 images are SIDE x SIDE x 3
IMAGE_BYTES = 3 * SIDE * SIDE
SPLITS = ("train", "test")
# Per-channel statistics of the official training set, on the [0, 1] scale.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

SIDECAR = "cifar10.json"
# Bump when the conversion itself changes, so existing outputs are rebuilt.
FORMAT_VERSION = 1


class DataError(UserError):
    pass


@dataclass
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8, HWC as ffcv's RGBImageField wants
    labels: np.ndarray  # (N,) int64 in 0..9

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class _BatchUnpickler(pickle.Unpickler):
    """The batch files are pickles: allow only what they contain (numpy arrays), so a damaged or
    foreign file is an error instead of arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def unpickle(path: Path) -> dict:
    """A batch or meta file read through the restricted unpickler, its keys as str."""
    if not path.is_file():
        raise DataError(
            f"{path}: missing (a CIFAR-10 python-version folder holds {', '.join(TRAIN_FILES + TEST_FILES)}, {META_FILE})"
        )
    try:
        with path.open("rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # EOFError (truncated), UnpicklingError, ValueError... all mean "not a batch"
        raise DataError(f"{path}: truncated or malformed ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: malformed: expected a pickled dict, got {type(obj).__name__}")
    # Python-2 pickles give bytes keys; normalise so both spellings work.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images (N,32,32,3) uint8, labels (N,) int64), validated."""
    batch = unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path}: malformed: needs a 'data' array and 'labels'")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise DataError(f"{path}: malformed: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {IMAGE_BYTES})")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path}: malformed: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: malformed: labels outside 0..{NUM_CLASSES - 1}")
    # The rows are channel-planar (1024 R, 1024 G, 1024 B); ffcv wants height x width x channel.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def read_meta(source: Path) -> list[str]:
    meta = unpickle(source / META_FILE)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise DataError(f"{source / META_FILE}: malformed: expected {NUM_CLASSES} label_names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def cases_per_batch(source: Path) -> int:
    """The images each batch file holds, as batches.meta declares it (10,000 in the official files;
    smaller in a test set made in the same layout)."""
    declared = unpickle(source / META_FILE).get("num_cases_per_batch", CASES_PER_BATCH)
    if not isinstance(declared, int) or declared < 1:
        raise DataError(f"{source / META_FILE}: malformed: num_cases_per_batch is {declared!r}")
    return declared


def read_split(source: Path, split: str) -> Split:
    """The split's batch files in order, each checked to hold the declared number of images, so a
    short file is named instead of silently shrinking the data set."""
    files = TRAIN_FILES if split == "train" else TEST_FILES
    expected = cases_per_batch(source)
    parts = [read_batch(source / name) for name in files]
    for name, (_, labels) in zip(files, parts):
        if len(labels) != expected:
            raise DataError(f"{source / name}: holds {len(labels)} images; batches.meta declares {expected} per batch")
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    labels = np.concatenate([p[1] for p in parts])
    return Split(images, labels)



def _describe(paths: list[Path]) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in paths}


def _source_files(source: Path) -> list[Path]:
    return [source / name for name in TRAIN_FILES + TEST_FILES + (META_FILE,)]


def _outputs(out: Path) -> list[Path]:
    return [out / "train.beton", out / "test.beton"]


def is_current(out: Path, source: Path) -> bool:
    """True if `out` holds intact outputs converted from exactly these source files."""
    try:
        record = json.loads((out / SIDECAR).read_text())
        if record.get("format") != FORMAT_VERSION:
            return False
        if not all(p.is_file() for p in _source_files(source) + _outputs(out)):
            return False
        return record["sources"] == _describe(_source_files(source)) and record["outputs"] == _describe(_outputs(out))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def download(root: Path) -> Path:
    """Fetches and unpacks the official archive into `root`; returns its cifar-10-batches-py folder."""
    from torchvision.datasets.utils import download_and_extract_archive

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable host must fail, not hang
    try:
        download_and_extract_archive(URL, download_root=str(root), md5=URL_MD5)
    except Exception as e:  # URLError, timeouts, HTTP errors, a bad checksum
        raise DataError(
            f"could not download CIFAR-10 from {URL} ({cli.first_line(e)}); pass --source DIR, or set {SOURCE_ENV}=DIR, with a local "
            "cifar-10-batches-py folder"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return root / "cifar-10-batches-py"


SOURCE_ENV = "CIFAR10_SOURCE"


def find_source(source: Path | None, out: Path) -> Path:
    """Where the CIFAR-10 python files come from, in this order: the --source given, the folder
    $CIFAR10_SOURCE names (an offline copy a site or a CI keeps), else the official download."""
    if source is not None:
        return Path(source)
    if os.environ.get(SOURCE_ENV):
        print(f"using {SOURCE_ENV}={os.environ[SOURCE_ENV]}")
        return Path(os.environ[SOURCE_ENV])
    return download(out / "download")


def write_beton(split: Split, path: Path, workers: int) -> None:
    from trainer.data.numba_cache import cache_ffcv_compiles

    cache_ffcv_compiles()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    with atomic_path(path) as tmp:
        fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
        # ffcv's writer shows its own progress bar.
        DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(split)


def prepare(out: Path, source: Path | None = None, force: bool = False, workers: int = 2) -> bool:
    """Converts CIFAR-10 into out/{train,test}.beton; returns False if they were already current."""
    out = Path(out)
    if out.exists() and not out.is_dir():  # before a download or a read of the source that would be wasted
        raise DataError(f"{out}: not a folder (--out names the folder for train.beton, test.beton and {SIDECAR})")
    source = find_source(source, out)
    if not source.is_dir():
        raise DataError(f"{source}: no such folder (expected a CIFAR-10 'cifar-10-batches-py' folder)")
    if not force and is_current(out, source):
        print(f"{out}: train.beton and test.beton are current for {source}; nothing to do")
        return False

    start = time.perf_counter()
    # Read and validate everything before writing anything.
    label_names = read_meta(source)
    splits = {name: read_split(source, name) for name in ("train", "test")}
    sources = _describe(_source_files(source))

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a parent folder belongs, a read-only file system
        raise DataError(f"{out}: cannot create the folder ({e.strerror})") from None
    (out / SIDECAR).unlink(missing_ok=True)  # from here until the end, the old record is void
    for name, split in splits.items():
        print(f"writing {out / f'{name}.beton'} ({len(split):,} images)")
        write_beton(split, out / f"{name}.beton", workers)

    record = {
        "format": FORMAT_VERSION,
        "source_dir": str(source.resolve()),
        "sources": sources,
        "outputs": _describe(_outputs(out)),
        "label_names": label_names,
        "counts": {name: np.bincount(split.labels, minlength=NUM_CLASSES).tolist() for name, split in splits.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(out / SIDECAR, json.dumps(record, indent=2) + "\n")
    print(f"converted {source} -> {out} in {time.perf_counter() - start:.1f} s")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="convert CIFAR-10 to FFCV .beton files")
    p.add_argument("--out", type=Path, required=True, help="folder for train.beton, test.beton, cifar10.json")
    p.add_argument("--source", type=Path,
                   help=f"a local cifar-10-batches-py folder (default: ${SOURCE_ENV} if set, else download)")
    p.add_argument("--force", action="store_true", help="convert even if the outputs are current")
    p.add_argument("--workers", type=int, default=2, help="ffcv writer processes")
    args = parser.parse_args(argv)
    # A prepare process allowed one core (taskset, a 1-CPU SLURM task or container) hung at its exit
    # in numba's TBB thread pool (OpenMP's alike) after ffcv's writer, its files written; numba's own
    # workqueue pool does not, and the writer's work is done in its processes, not these threads.
    # Only this command's process, before numba loads; a NUMBA_THREADING_LAYER of the user's wins.
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    cli.run(lambda: prepare(args.out, args.source, args.force, args.workers) and None)
