"""Turn the GPU check's CIFAR-10 pack back into a `cifar-10-batches-py` folder (the official layout).

    python jobs/gpu_check/unpack_data.py [PACK] --out DIR [--workers N]

PACK (default .kit/cifar10.pack) is what jobs/gpu_check/pack_data.py writes. DIR gets
data_batch_1..5, test_batch and batches.meta holding what the source's hold: `data` (uint8,
N x 3072, channel-planar rows), `labels`, `batch_label`, `filenames`, and {num_cases_per_batch,
label_names, num_vis}. They are protocol-4 pickles with str keys and strings (the originals are
Python 2 pickles; Python 3's protocol 2 would store the pixels through _codecs.encode, 45% larger
and refused by the project's restricted unpickler), so `python -m trainer.data prepare --source
DIR` and torchvision's loading style both read them. Each file is written under a temporary name
and renamed into place.

DIR also gets unpack.json: per batch, whether the pixels are bit-identical to the source the pack
was made from (a CRC-32 per image and a SHA-256 per batch, recorded at packing), and the decoder
used. Exactness depends on the JPEG decoder: libjpeg-turbo decodes deterministically, but a
different decoder can be off by one in some pixels; those images are counted, not hidden.

Needs only numpy, Pillow and the standard library, not this project: it runs on machines without
the project's dependencies.

The pack (format 1) is a .npz (no pickled objects) holding, per image, a baseline JPEG at the
source's own settings (quality 75, 4:2:0, IJG tables) stored without its header (one header is
shared), and, per batch, an LZMA-compressed correction (source minus decoded, mod 256) for the
images whose decoded JPEG differs from the source.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import pickle
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

FORMAT = 1
DEFAULT_PACK = Path(__file__).resolve().parents[2] / ".kit/cifar10.pack"
META_FILE = "batches.meta"
RECORD_FILE = "unpack.json"


class PackError(Exception):
    pass


def load_pack(path: Path) -> dict:
    """The pack's arrays (memory-mapped where possible) and its decoded meta record."""
    try:
        z = np.load(path, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zlib.error) as e:
        raise PackError(f"{path}: not a readable CIFAR-10 pack ({type(e).__name__}: {e})") from None
    meta = json.loads(bytes(arrays.pop("meta")).decode())
    if meta.get("format") != FORMAT:
        raise PackError(f"{path}: pack format {meta.get('format')!r}, this unpacker reads format {FORMAT}")
    filenames = lzma.decompress(bytes(arrays.pop("filenames"))).decode().split("\n")
    return {"meta": meta, "filenames": filenames, **arrays}


def decode_jpegs(header: bytes, payload: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 RGB: each image is `header + payload[offsets[i]:offsets[i+1]]`."""
    from PIL import Image

    n = len(offsets) - 1
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    raw = payload.tobytes()
    for i in range(n):
        with Image.open(io.BytesIO(header + raw[offsets[i]:offsets[i + 1]]), formats=("JPEG",)) as im:
            if im.mode != "RGB" or im.size != (32, 32):
                raise PackError(f"image {i}: decoded as {im.mode} {im.size}, expected RGB 32x32")
            out[i] = np.asarray(im)
    return out


def planar(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) HWC -> (N, 3072) rows as the batch files hold them: 1024 R, 1024 G, 1024 B."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def apply_residual(rows: np.ndarray, index: np.ndarray, blob: bytes) -> np.ndarray:
    """Adds the stored corrections (mod 256) to the rows listed in `index` (local indices)."""
    if len(index):
        residual = np.frombuffer(lzma.decompress(blob), dtype=np.uint8).reshape(len(index), rows.shape[1])
        rows[index] = rows[index] + residual  # uint8 arithmetic wraps: exactly mod 256
    return rows


def crc32_rows(rows: np.ndarray) -> np.ndarray:
    return np.array([zlib.crc32(r.tobytes()) for r in rows], dtype=np.uint32)


def batch_rows(pack: dict, k: int) -> np.ndarray:
    """The pixel rows of batch k, decoded and corrected."""
    b = pack["meta"]["batches"][k]
    lo, hi = b["first"], b["first"] + b["count"]
    offsets = pack["offsets"][lo:hi + 1].astype(np.int64)
    rows = planar(decode_jpegs(pack["header"].tobytes(), pack["payload"][offsets[0]:offsets[-1]], offsets - offsets[0]))
    res_index = pack["residual_index"]
    local = res_index[(res_index >= lo) & (res_index < hi)] - lo
    return apply_residual(rows, local, pack[f"residual_{k}"].tobytes())


def _write_pickle(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        pickle.dump(obj, f, protocol=4)
    os.replace(tmp, path)


def _unpack_batch(pack_path: str, k: int, out: str) -> dict:
    """Worker: writes batch k's pickle; returns its verification record."""
    pack = load_pack(Path(pack_path))
    b = pack["meta"]["batches"][k]
    lo, hi = b["first"], b["first"] + b["count"]
    rows = batch_rows(pack, k)
    bad = np.flatnonzero(crc32_rows(rows) != pack["crc32"][lo:hi])
    sha = hashlib.sha256(rows.tobytes()).hexdigest()
    _write_pickle(
        {
            "batch_label": b["batch_label"],
            "labels": pack["labels"][lo:hi].astype(int).tolist(),
            "data": rows,
            "filenames": pack["filenames"][lo:hi],
        },
        Path(out) / b["file"],
    )
    return {"file": b["file"], "images": b["count"], "images_differing": int(len(bad)),
            "data_sha256": sha, "data_sha256_matches": sha == b["data_sha256"]}


def unpack(pack_path: Path, out: Path, workers: int | None = None) -> dict:
    """Writes the folder; returns (and writes as unpack.json) the verification record."""
    start = time.perf_counter()
    pack_path = Path(pack_path)
    pack = load_pack(pack_path)
    meta = pack["meta"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD_FILE).unlink(missing_ok=True)
    n = len(meta["batches"])
    workers = max(1, min(n, workers or len(os.sched_getaffinity(0))))
    if workers == 1:
        records = [_unpack_batch(str(pack_path), k, str(out)) for k in range(n)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            records = list(pool.map(_unpack_batch, [str(pack_path)] * n, range(n), [str(out)] * n))
    _write_pickle({"num_cases_per_batch": meta["num_cases_per_batch"], "label_names": meta["label_names"],
                   "num_vis": meta["num_vis"]}, out / META_FILE)

    import PIL

    record = {
        "pack": str(pack_path),
        "pack_sha256": _sha256(pack_path),
        "out": str(out),
        "exact": all(r["data_sha256_matches"] for r in records),
        "images": sum(r["images"] for r in records),
        "images_differing": sum(r["images_differing"] for r in records),
        "batches": records,
        "decoder": {"pillow": PIL.__version__, "libjpeg_turbo": libjpeg_turbo_version()},
        "packed_with": meta.get("encoder"),
        "seconds": round(time.perf_counter() - start, 2),
        "workers": workers,
    }
    tmp = out / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / RECORD_FILE)
    return record


def libjpeg_turbo_version() -> str | None:
    from PIL import features

    try:
        return features.version("libjpeg_turbo")
    except ValueError:  # a Pillow older than 9.1 has no such feature name
        return None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pack", nargs="?", type=Path, default=DEFAULT_PACK, help="the pack (default: .kit/cifar10.pack)")
    parser.add_argument("--out", type=Path, required=True, help="the cifar-10-batches-py folder to write")
    parser.add_argument("--workers", type=int, help="processes, one batch each (default: the cores available)")
    args = parser.parse_args()
    try:
        r = unpack(args.pack, args.out, args.workers)
    except (PackError, OSError) as e:
        sys.exit(f"error: {e}")
    state = "bit-identical to the packed source" if r["exact"] else f"{r['images_differing']} images differ from the packed source (JPEG decoder differences)"
    print(f"unpacked {r['images']:,} images into {r['out']} in {r['seconds']:.1f} s: {state}")


if __name__ == "__main__":
    main()
