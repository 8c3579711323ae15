"""The checks every run makes before a loader reads its data, and the record of what it read.

data.format=beton: the layout prepare writes (field names, 32x32x3 images, labels 0..9, complete
files) and, against the sidecar prepare wrote (cifar10.json), size, images per class and SHA-256.
data.format=python (the official batch files, read without ffcv): the restricted reader's own
validation (cifar10.read_split: every file present and unpickled safely, the declared images per
batch, 32x32x3 uint8 rows, labels 0..9) and the files' SHA-256. A mismatch is one DataError naming
the file and what differs; the verified hashes are what the run's summary records (data_record)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.cifar10 import (
    META_FILE, NUM_CLASSES, SIDE, SIDECAR, SPLITS, TEST_FILES, TRAIN_FILES, DataError, Split, read_meta, read_split,
)
from trainer.files import sha256

def open_beton(path: Path):
    """ffcv's Reader of a .beton, with whatever its parser raises on a cut or foreign file turned into
    one DataError naming the file."""
    from ffcv.reader import Reader

    try:
        return Reader(str(path))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:  # ffcv reads the header with numpy and trusts it: a cut or foreign file
        # raises ValueError, IndexError, KeyError or AssertionError from deep inside, depending on where it ends
        reason = f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: not a readable .beton, truncated or of another format ({reason})") from None


def check_beton(path: Path) -> np.ndarray:
    """The labels of a .beton whose layout is what prepare writes: fields image (RGB) and label
    (int), every image 32x32x3, labels in 0..9, and every image's bytes present. Read from ffcv's
    header, metadata and allocation table only (the labels are stored in the metadata), so it costs
    milliseconds; a DataError names the file and what is wrong."""
    from ffcv.fields import IntField, RGBImageField

    reader = open_beton(path)
    names, handlers = list(reader.field_names), list(reader.handlers.values())
    kinds_ok = names == ["image", "label"] and isinstance(handlers[0], RGBImageField) and isinstance(handlers[1], IntField)
    if not kinds_ok:
        found = ", ".join(f"{n} ({type(h).__name__})" for n, h in zip(names, handlers)) or "none"
        raise DataError(
            f"{path}: fields {found}; expected image (RGBImageField) and label (IntField), as prepare writes them"
        )
    n = int(reader.num_samples)
    meta = reader.metadata
    if n == 0:
        raise DataError(f"{path}: holds no images")
    if len(meta) != n:
        raise DataError(f"{path}: truncated: {len(meta):,} of the {n:,} samples its header declares are described")
    images, labels = meta[meta.dtype.names[0]], meta[meta.dtype.names[1]].astype(np.int64)
    wrong = np.flatnonzero((images["height"] != SIDE) | (images["width"] != SIDE))
    if len(wrong):
        i = int(wrong[0])
        raise DataError(
            f"{path}: {len(wrong):,} of {n:,} images are not {SIDE}x{SIDE}x3 "
            f"(image {i} is {images['height'][i]}x{images['width'][i]}x3); CIFAR-10 images are {SIDE}x{SIDE}x3"
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: labels from {labels.min()} to {labels.max()}; CIFAR-10's are 0..{NUM_CLASSES - 1}")
    # The allocation table (one entry per image: where its bytes are) is the file's last part, so a
    # file cut short loses entries first and then image bytes, which ffcv's Reader does not notice.
    size, table, table_at = path.stat().st_size, reader.alloc_table, int(reader.header["alloc_table_ptr"])
    if (
        table_at > size
        or (size - table_at) % table.dtype.itemsize
        or len(table) != n
        or int((table["ptr"] + table["size"]).max()) > table_at
    ):
        raise DataError(f"{path}: truncated: its {size:,} bytes do not hold the {n:,} images its header declares")
    return labels


@dataclass(frozen=True)
class _Claim:
    """What cifar10.json says one .beton is."""

    bytes: int
    sha256: str
    counts: list[int]  # images per class


def _read_sidecar(data_dir: Path) -> dict | None:
    """The sidecar's JSON, None if there is none; a DataError if it is unreadable."""
    sidecar = data_dir / SIDECAR
    try:
        return json.loads(sidecar.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"not JSON: {e}"
        raise DataError(f"{sidecar}: unreadable ({reason}); convert again: {_reconvert(data_dir)}") from None


def _claims(record: dict, data_dir: Path) -> dict[str, _Claim]:
    try:
        return {
            split: _Claim(
                int(record["outputs"][f"{split}.beton"]["bytes"]),
                str(record["outputs"][f"{split}.beton"]["sha256"]),
                [int(c) for c in record["counts"][split]],
            )
            for split in SPLITS
        }
    except (KeyError, TypeError, ValueError) as e:
        what = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) else "outputs or counts of the wrong kind"
        raise DataError(f"{data_dir / SIDECAR}: malformed ({what}); convert again: {_reconvert(data_dir)}") from None


def _reconvert(data_dir: Path) -> str:
    return f"python -m trainer.data prepare --out {data_dir} [--source cifar-10-batches-py]"


def _stat_key(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# The record verify() made for each data folder in this process, with the files' stat keys it was
# made for: a second verify of unchanged files (the test loader after the train loader, a bench
# building loaders several times) does not hash again, and summary.json gets what training read.
_verified: dict[Path, tuple[tuple, dict]] = {}


def verify(data_dir: str | Path, warn: bool = True) -> dict:
    """Checks train.beton and test.beton before any loader reads them; returns the data record
    for the run's summary (see data_record). A mismatch is a DataError naming the file and what
    differs, so a damaged, replaced or foreign file never trains silently.

    Every file: the layout prepare writes (check_beton: field names and kinds, 32x32x3 images,
    labels 0..9, all image bytes present). Against the sidecar (cifar10.json, written by prepare
    after the files): the size first (cheap, catches a cut file), then the images per class, then
    the SHA-256, always computed (about 0.5 s for the real set, and a same-size edit changes nothing
    else that could be checked); the record holds the hashes computed here, never the sidecar's
    claim. Without a sidecar (files converted elsewhere) the layout is still checked, a warning says
    that provenance is not (if `warn`; ranks other than 0 pass False), and the hashes computed are
    recorded, with `sidecar_checked` false. Unchanged files are not hashed twice in one process.
    """
    data_dir = Path(data_dir)
    paths = {split: data_dir / f"{split}.beton" for split in SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"{path}: not found; convert CIFAR-10 first: {_reconvert(data_dir)}")
    key = tuple(_stat_key(p) for p in (*paths.values(), data_dir / SIDECAR))
    cached = _verified.get(data_dir.resolve())
    if cached and cached[0] == key:
        return cached[1]

    record = _read_sidecar(data_dir)
    claims = _claims(record, data_dir) if record is not None else None
    result: dict = {
        "format": "beton",
        "dir": str(data_dir.resolve()),
        "source_dir": record.get("source_dir") if isinstance(record, dict) else None,
        "sidecar_checked": claims is not None,
    }
    for split, path in paths.items():
        claim = claims[split] if claims else None
        size = path.stat().st_size
        if claim and size != claim.bytes:
            raise DataError(
                f"{path}: {size:,} bytes, but {SIDECAR} records {claim.bytes:,} (cut short or replaced since it was "
                f"converted); convert again: {_reconvert(data_dir)}"
            )
        labels = check_beton(path)
        counts = np.bincount(labels, minlength=NUM_CLASSES).tolist()
        if claim and counts != claim.counts:
            raise DataError(
                f"{path}: {len(labels):,} images, {counts} per class, but {SIDECAR} records "
                f"{sum(claim.counts):,}, {claim.counts} per class; convert again: {_reconvert(data_dir)}"
            )
        sha = sha256(path)
        if claim and sha != claim.sha256:
            raise DataError(
                f"{path}: SHA-256 {sha[:16]}… differs from the {claim.sha256[:16]}… recorded in {SIDECAR} "
                f"(modified since it was converted); convert again: {_reconvert(data_dir)}"
            )
        result.update({f"{split}_sha256": sha, f"{split}_bytes": size, f"{split}_images": len(labels)})
    if claims is None and warn:  # after the checks: a refused file is one error line, nothing else
        print(
            f"warning: {data_dir / SIDECAR}: missing; the .beton files were checked for their layout but not "
            "against what was converted (their hashes are recorded as found)",
            file=sys.stderr,
        )
    _verified[data_dir.resolve()] = (key, result)
    return result


def data_record(data_dir: str | Path, data_format: str = "beton") -> dict:
    """What a run trained on, for its summary: the record verify() (or verify_python()) made in this
    process for the folder — the hashes of the files as the loaders found them, not the sidecar's
    claim. For a folder not verified in this process (the bench's header, written before any loader
    is built), the hashes of the files as they are now, unchecked (`sidecar_checked` false)."""
    data_dir = Path(data_dir)
    if data_format == "python":
        cached = _python_read.get(data_dir.resolve())
        return cached[1] if cached else _python_record(data_dir, None)
    cached = _verified.get(data_dir.resolve())
    if cached:
        return cached[1]
    try:
        record = json.loads((data_dir / SIDECAR).read_text())
    except (OSError, ValueError):
        record = None
    result: dict = {
        "format": "beton",
        "dir": str(data_dir.resolve()),
        "source_dir": record.get("source_dir") if isinstance(record, dict) else None,
        "sidecar_checked": False,
    }
    for split in SPLITS:
        path = data_dir / f"{split}.beton"
        found = path.is_file()
        result.update({
            f"{split}_sha256": sha256(path) if found else None,
            f"{split}_bytes": path.stat().st_size if found else None,
            f"{split}_images": None,
        })
    return result


def describe_record(record: dict) -> str:
    """A data record (summary.json's `data`) in one line, for reports: the folder, where it came
    from, and the hashes that identify it (.beton files, or the batch files of data.format=python)."""
    if record.get("format") == "python":
        files = record.get("files") or {}
        test = (files.get("test_batch") or {}).get("sha256") or "?"
        return (f"{record.get('dir', '?')} (CIFAR-10's batch files, read without ffcv; test_batch sha256 "
                f"{test[:12]}…, {len(files)} files hashed in summary.json)")
    sha = (record.get("train_sha256") or "?")[:12], (record.get("test_sha256") or "?")[:12]
    return (f"{record.get('dir', '?')} (CIFAR-10 from {record.get('source_dir') or 'an unrecorded source'}; "
            f"train.beton sha256 {sha[0]}…, test.beton {sha[1]}…)")


PYTHON_FILES = TRAIN_FILES + TEST_FILES + (META_FILE,)

# The folder verify_python read last in this process: its files' stat keys, the record and both
# splits (180 MB for the real set). Kept, so that the training, test and validation loaders, the
# whitening fit and the summary read and hash the batch files once (1.5 s for the real set) and all
# see the same images; files changed since are read again.
_python_read: dict[Path, tuple[tuple, dict, dict[str, Split]]] = {}


def verify_python(data_dir: str | Path) -> dict:
    """Checks a folder of CIFAR-10's official batch files (data.format=python) before a loader uses
    it; returns the data record for the run's summary. The restricted reader validates every file
    (cifar10.read_split); the record holds each file's size and SHA-256 and the images per split.
    There is no sidecar to compare with: these are the source files themselves."""
    return _python(data_dir)[0]


def python_split(data_dir: str | Path, split: str) -> Split:
    """The split's images and labels in the batch files' order (the order prepare writes into the
    .beton), from the folder verify_python checked."""
    return _python(data_dir)[1][split]


def _python(data_dir: str | Path) -> tuple[dict, dict[str, Split]]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such folder; data.format=python reads CIFAR-10's official batch files "
                        f"({', '.join(PYTHON_FILES)}) from data.dir")
    key = tuple(_stat_key(data_dir / name) for name in PYTHON_FILES)
    cached = _python_read.get(data_dir.resolve())
    if cached and cached[0] == key:
        return cached[1], cached[2]
    read_meta(data_dir)  # ten label names: a foreign meta file is refused, not just its count
    splits = {split: read_split(data_dir, split) for split in SPLITS}
    record = _python_record(data_dir, splits)
    _python_read.clear()  # one folder's images at a time: a process trains on one
    _python_read[data_dir.resolve()] = (key, record, splits)
    return record, splits


def _python_record(data_dir: Path, splits: dict[str, Split] | None) -> dict:
    files = {}
    for name in PYTHON_FILES:
        path = data_dir / name
        found = path.is_file()
        files[name] = {"bytes": path.stat().st_size if found else None, "sha256": sha256(path) if found else None}
    return {
        "format": "python",
        "dir": str(data_dir.resolve()),
        "source_dir": str(data_dir.resolve()),  # the source files themselves: nothing converted
        "checked": splits is not None,  # read and validated by this process (not: hashed as found)
        "files": files,
        # The .beton hashes have no counterpart here: the files' own are in `files`.
        "train_sha256": None,
        "test_sha256": None,
        **{f"{split}_images": len(splits[split]) if splits else None for split in SPLITS},
    }
