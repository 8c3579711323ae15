"""Pack CIFAR-10 (the official python layout) small enough to travel with the GPU check.

    python jobs/gpu_check/pack_data.py [--source DIR] [--out .kit/cifar10.pack] [--limit N] [--workers N]

The GPU machine takes at most 64 MiB of working tree, wheels and data included, and the CIFAR-10
batches are 178 MiB that zlib hardly shrinks. The project's shared copy
(../shared/data/cifar10/cifar-10-batches-py) was itself decoded from quality-75 4:2:0 JPEGs, so
re-encoding each image with those settings gives back nearly the same JPEG. The pack stores that
JPEG per image (without its header, identical for every image and stored once) and, per batch, an
LZMA-compressed correction for the images that do not decode to the source exactly;
unpack_data.py reverses both, so the unpacked pixels are the source's, bit for bit.

Beside the pack, `<pack>.json` records the source (files and SHA-256), the encoder, the sizes,
and the fidelity measured by decoding the written pack with unpack_data.py's own code and
comparing with the source: mean absolute error, PSNR, largest error, identical images — for the
full pack (corrections applied) and for the JPEG layer alone. Anything measured on data unpacked
from the pack should quote that record.

--limit N keeps the first N images of every batch (for tests); such a pack unpacks to short
batches that trainer.data.cifar10.read_batch reads but read_split rejects (it wants 50,000 + 10,000).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from trainer import cli
from trainer.data.cifar10 import IMAGE_BYTES, TEST_FILES, TRAIN_FILES, DataError, unpickle
from trainer.files import atomic_path, write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unpack_data  # noqa: E402  (this folder, not a package)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = Path(os.environ.get("CIFAR10_SOURCE", REPO.parent / "shared/data/cifar10/cifar-10-batches-py"))
BATCH_FILES = TRAIN_FILES + TEST_FILES
JPEG_QUALITY = 75  # the source's own JPEG settings (see the shared copy's README)
JPEG_SUBSAMPLING = 2  # Pillow's code for 4:2:0


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_source_batch(path: Path, limit: int | None = None) -> dict:
    b = unpickle(path)
    data = np.asarray(b["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {IMAGE_BYTES})")
    n = len(data) if limit is None else min(limit, len(data))
    return {"data": np.ascontiguousarray(data[:n]), "labels": np.asarray(b["labels"][:n], dtype=np.int64),
            "batch_label": _text(b["batch_label"]), "filenames": [_text(f) for f in b["filenames"][:n]]}


def encode_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING, optimize=False)
    return buf.getvalue()


def header_length(jpeg: bytes) -> int:
    """Bytes up to the end of the start-of-scan segment: everything before the entropy-coded data."""
    i = jpeg.find(b"\xff\xda")
    if i < 0:
        raise ValueError("no start-of-scan marker")
    return i + 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")


def _stats(source: np.ndarray, decoded: np.ndarray) -> dict:
    """Per-batch sums from which the whole set's fidelity is computed."""
    diff = source.astype(np.int16) - decoded
    sq = (diff.astype(np.int64) ** 2).sum(1)
    return {"images": len(source), "abs_sum": int(np.abs(diff).sum()), "values": int(diff.size),
            "max_abs": int(np.abs(diff).max(initial=0)), "identical": int((sq == 0).sum()),
            "mse": (sq / diff.shape[1]).tolist()}


def _pack_batch(path: str, limit: int | None, preset: int) -> dict:
    """Worker: one batch file -> its JPEG payloads, corrections and checksums."""
    b = read_source_batch(Path(path), limit)
    rows = b["data"]
    images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    jpegs = [encode_jpeg(im) for im in images]
    header = jpegs[0][:header_length(jpegs[0])]
    odd = [i for i, j in enumerate(jpegs) if not j.startswith(header) or header_length(j) != len(header)]
    if odd:
        raise DataError(f"{path}: image {odd[0]} has a different JPEG header; the pack format assumes one")
    payloads = [j[len(header):] for j in jpegs]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in payloads])]).astype(np.int64)
    decoded = unpack_data.planar(unpack_data.decode_jpegs(header, np.frombuffer(b"".join(payloads), np.uint8), offsets))
    residual = rows - decoded  # uint8: wraps, i.e. mod 256
    index = np.flatnonzero(residual.any(1))
    blob = lzma.compress(residual[index].tobytes(), preset=preset)
    return {"file": Path(path).name, "header": header, "payload": b"".join(payloads), "offsets": offsets,
            "labels": b["labels"], "batch_label": b["batch_label"], "filenames": b["filenames"],
            "index": index, "residual": blob, "crc32": unpack_data.crc32_rows(rows),
            "data_sha256": hashlib.sha256(rows.tobytes()).hexdigest(), "jpeg_stats": _stats(rows, decoded)}


def _verify_batch(pack_path: str, k: int, source: str, limit: int | None) -> dict:
    """Worker: decodes batch k from the written pack with the unpacker's code; compares with the source."""
    pack = unpack_data.load_pack(Path(pack_path))
    name = pack["meta"]["batches"][k]["file"]
    return _stats(read_source_batch(Path(source) / name, limit)["data"], unpack_data.batch_rows(pack, k))


def _fidelity(parts: list[dict]) -> dict:
    mse = np.concatenate([np.asarray(p["mse"], dtype=np.float64) for p in parts])
    psnr = 10 * np.log10(255.0**2 / mse[mse > 0]) if (mse > 0).any() else np.array([])
    images = sum(p["images"] for p in parts)
    return {
        "images": images,
        "identical_images": sum(p["identical"] for p in parts),
        "mean_abs_error": sum(p["abs_sum"] for p in parts) / sum(p["values"] for p in parts),
        "max_abs_error": max(p["max_abs"] for p in parts),
        "psnr_db": None if not len(psnr) else {
            "overall": 10 * math.log10(255.0**2 / mse.mean()),
            "mean_over_differing_images": float(psnr.mean()),
            "min": float(psnr.min()),
            "note": "identical images (infinite PSNR) are left out of mean and min",
        },
        "lossless": all(p["abs_sum"] == 0 for p in parts),
    }


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pack(source: Path, out: Path, limit: int | None = None, workers: int | None = None, preset: int = 6) -> dict:
    """Writes the pack and its sidecar; returns the sidecar record."""
    from PIL import __version__ as pillow_version

    start = time.perf_counter()
    source = Path(source)
    missing = [f for f in (*BATCH_FILES, unpack_data.META_FILE) if not (source / f).is_file()]
    if missing:
        raise DataError(f"{source}: missing {', '.join(missing)} (expected a cifar-10-batches-py folder)")
    workers = max(1, min(len(BATCH_FILES), workers or len(os.sched_getaffinity(0))))
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_pack_batch, [str(source / f) for f in BATCH_FILES], [limit] * 6, [preset] * 6))
    if len({p["header"] for p in parts}) != 1:
        raise DataError("the batches' JPEG headers differ; the pack format assumes one")
    meta_src = unpickle(source / unpack_data.META_FILE)

    batches, first, payload_base = [], 0, 0
    offsets, residual_index = [], []
    for p in parts:
        n = len(p["labels"])
        batches.append({"file": p["file"], "batch_label": p["batch_label"], "first": first, "count": n,
                        "data_sha256": p["data_sha256"]})
        offsets.append(p["offsets"][:-1] + payload_base)
        residual_index.append(p["index"] + first)
        first += n
        payload_base += len(p["payload"])
    offsets.append(np.array([payload_base], dtype=np.int64))
    encoder = {"pillow": pillow_version, "libjpeg_turbo": unpack_data.libjpeg_turbo_version(), "quality": JPEG_QUALITY,
               "subsampling": "4:2:0", "optimize": False, "progressive": False}
    meta = {
        "format": unpack_data.FORMAT,
        "scheme": "per image: baseline JPEG q75 4:2:0 (shared header stored once); per batch: LZMA(source - decoded mod 256) for the images that differ",
        "encoder": encoder,
        "batches": batches,
        "num_cases_per_batch": int(meta_src.get("num_cases_per_batch", 10000)),
        "label_names": [_text(n) for n in meta_src["label_names"]],
        "num_vis": int(meta_src.get("num_vis", 3072)),
        "limit": limit,
    }
    arrays = {
        "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
        "filenames": np.frombuffer(lzma.compress("\n".join(f for p in parts for f in p["filenames"]).encode()), np.uint8),
        "labels": np.concatenate([p["labels"] for p in parts]).astype(np.uint8),
        "header": np.frombuffer(parts[0]["header"], np.uint8),
        "payload": np.frombuffer(b"".join(p["payload"] for p in parts), np.uint8),
        "offsets": np.concatenate(offsets).astype(np.uint32),
        "residual_index": np.concatenate(residual_index).astype(np.int64),
        "crc32": np.concatenate([p["crc32"] for p in parts]),
        **{f"residual_{k}": np.frombuffer(p["residual"], np.uint8) for k, p in enumerate(parts)},
    }
    out = Path(out)
    with atomic_path(out) as tmp, tmp.open("wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, **arrays)

    with ProcessPoolExecutor(workers) as pool:  # fidelity of what was written, read back as the unpacker reads it
        final = list(pool.map(_verify_batch, [str(out)] * 6, range(6), [str(source)] * 6, [limit] * 6))

    sizes = {k: int(v.nbytes) for k, v in arrays.items() if not k.startswith("residual_")}
    sizes["residuals"] = int(sum(len(p["residual"]) for p in parts))
    record = {
        "pack": out.name,
        "bytes": out.stat().st_size,
        "sha256": _sha256(out),
        "what": "CIFAR-10 in the official python layout, re-encoded for transport: per image a baseline JPEG at the "
                "source's own settings (q75, 4:2:0), plus LZMA-compressed corrections for the images whose JPEG does "
                "not decode to the source exactly",
        "source": {
            "dir": str(source.resolve()),
            "note": "the project's shared copy, itself decoded from q75 4:2:0 JPEGs of CIFAR-10 (see its README: "
                    "mean abs error 5.81 against the original on 4,000 images)",
            "files": {f: {"bytes": (source / f).stat().st_size, "sha256": _sha256(source / f)}
                      for f in (*BATCH_FILES, unpack_data.META_FILE)},
            "data_sha256": {b["file"]: b["data_sha256"] for b in batches},
        },
        "images": first,
        "limit": limit,
        "encoder": encoder,
        "sizes_bytes": sizes,
        "images_with_corrections": int(len(arrays["residual_index"])),
        "fidelity": _fidelity(final),
        "fidelity_jpeg_layer_only": _fidelity([p["jpeg_stats"] for p in parts]),
        "fidelity_measured_with": {"decoder": f"Pillow {pillow_version}, libjpeg-turbo {unpack_data.libjpeg_turbo_version()}",
                                   "how": "the written pack decoded by unpack_data.batch_rows and compared with the source, pixel by pixel"},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_text_atomic(out.with_name(out.name + ".json"), json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"a cifar-10-batches-py folder (default {DEFAULT_SOURCE})")
    parser.add_argument("--out", type=Path, default=REPO / ".kit/cifar10.pack", help="the pack to write (default .kit/cifar10.pack)")
    parser.add_argument("--limit", type=int, help="keep only the first N images of every batch (tests)")
    parser.add_argument("--workers", type=int, help="processes, one batch each (default: the cores available)")
    parser.add_argument("--preset", type=int, default=6, help="LZMA preset for the corrections, 0-9 (default 6)")
    args = parser.parse_args()
    r = pack(args.source, args.out, args.limit, args.workers, args.preset)
    f = r["fidelity"]
    quality = "lossless (bit-identical)" if f["lossless"] else (
        f"mean abs error {f['mean_abs_error']:.3f}, max {f['max_abs_error']}, {f['identical_images']:,} of {f['images']:,} identical")
    print(f"wrote {args.out} ({r['bytes'] / 2**20:.1f} MiB, {r['images']:,} images) in {r['seconds']:.0f} s: {quality}; "
          f"record in {args.out.name}.json")


if __name__ == "__main__":
    cli.run(main)
