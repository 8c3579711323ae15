"""Check an installed ffcv wheel: its native library loads and works, from its own vendored libraries.

    python jobs/offline/check_ffcv.py SITE [--native]

SITE is the folder the wheelhouse was installed into (`pip install --no-index --no-deps --target
SITE`). Default check (needs torch, numba, numpy, Pillow): `import ffcv` from SITE, write a .beton
of 256 images in raw and in jpg mode, read both back with ffcv's Loader and compare: raw must be
pixel-exact; jpg (libturbojpeg inside ffcv) within JPEG error (mean under 3 levels); a centre-crop decoder exercises
OpenCV's resize. --native (needs only numpy and Pillow): load ffcv/_libffcv.abi3.so by path, without
importing ffcv, and call its resize and imdecode through ctypes — for a Python that has no torch.

Both then resolve the extension's dependencies (ldd) and fail if any library beyond glibc, libstdc++
and zlib is missing or resolves outside SITE/ffcv.libs; the libraries the process mapped from
there are listed too. Run it with the system's copies hidden (build.sh
does so in a private mount namespace) to show the wheel needs none of them. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# What every Linux machine has (glibc, the C++ runtime, zlib): the manylinux allow-list's core.
SYSTEM = ("linux-vdso", "ld-linux", "libc.so", "libm.so", "libpthread", "libdl.so", "librt.so", "libstdc++", "libgcc_s", "libz.so")


def mapped_libraries() -> list[str]:
    """The shared objects this process has mapped (/proc/self/maps)."""
    paths = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and ".so" in parts[5]:
            paths.add(parts[5].strip())
    return sorted(paths)


def resolved_dependencies(so: Path) -> dict[str, str]:
    """soname -> path as the dynamic loader resolves them, recursively (ldd)."""
    out = subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=True).stdout
    deps = {}
    for line in out.splitlines():
        name, sep, rest = line.strip().partition(" => ")
        if not sep:  # the vdso and the loader itself: "name (address)"
            name, rest = line.strip().split()[0], "(system)"
        path = rest.split(" (")[0].strip()
        deps[Path(name).name] = str(Path(path).resolve()) if path.startswith("/") else path
    return deps


def check_vendored(site: Path) -> dict:
    """Every library ffcv's extension needs, beyond glibc, libstdc++ and zlib, resolves into
    SITE/ffcv.libs; nothing is missing."""
    (so,) = (site / "ffcv").glob("_libffcv*.so")
    libs_dir = str((site / "ffcv.libs").resolve())
    deps = resolved_dependencies(so)
    missing = [n for n, p in deps.items() if p == "not found"]
    foreign = [f"{n} => {p}" for n, p in deps.items()
               if p != "not found" and not n.startswith(SYSTEM) and not p.startswith(libs_dir + "/")]
    if missing or foreign:
        raise SystemExit(f"error: {so.name}: missing {missing}, resolved outside the wheel {foreign}")
    mapped = [Path(p).name for p in mapped_libraries() if str(Path(p).resolve()).startswith(libs_dir + "/")]
    return {"dependencies_in_wheel": sorted(n for n, p in deps.items() if p.startswith(libs_dir)),
            "dependencies_from_system": sorted(n for n, p in deps.items() if not p.startswith(libs_dir)),
            "mapped_from_wheel": len(mapped)}


def test_images(n: int = 256) -> np.ndarray:
    """Smooth images with structure that differs from image to image (JPEG-friendly, unlike noise)."""
    y, x = np.mgrid[0:32, 0:32]
    k = np.arange(n)[:, None, None]
    r = (128 + 100 * np.sin((x + k) / 5.0)).astype(np.uint8)
    g = (128 + 100 * np.cos((y * (k % 3 + 1)) / 9.0)).astype(np.uint8)
    b = (128 + 100 * np.sin((x + y + 3 * k) / 7.0)).astype(np.uint8)
    return np.stack([r, g, b], axis=-1)


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def native(site: Path) -> dict:
    """_libffcv through ctypes only: the same calls ffcv/libffcv.py makes."""
    import importlib.machinery
    import importlib.util

    from PIL import Image

    (so,) = (site / "ffcv").glob("_libffcv*.so")
    spec = importlib.util.spec_from_file_location("_libffcv", so, loader=importlib.machinery.ExtensionFileLoader("_libffcv", str(so)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the CPython extension itself (abi3) imports
    lib = ctypes.CDLL(str(so))
    lib.resize.argtypes = 11 * [ctypes.c_int64]
    lib.imdecode.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                             ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                             ctypes.c_uint32, ctypes.c_bool, ctypes.c_bool]
    image = test_images(1)[0]
    encoded = np.frombuffer(jpeg(image), np.uint8)
    decoded = np.zeros((32, 32, 3), np.uint8)
    rc = lib.imdecode(encoded.ctypes.data, encoded.size, 32, 32, decoded.ctypes.data, 32, 32, 0, 0, 1, 1, False, False)
    reference = np.asarray(Image.open(io.BytesIO(encoded.tobytes())).convert("RGB"))
    diff = np.abs(decoded.astype(int) - reference)
    err = float(diff.mean())  # libffcv decodes with TurboJPEG's fast DCT and upsampling, Pillow with the exact ones
    if rc != 0 or err > 3 or diff.max() > 32:
        raise SystemExit(f"error: libffcv imdecode returned {rc}; differs from Pillow by {err:.2f} on average, {diff.max()} at most")
    small = np.zeros((16, 16, 3), np.uint8)
    lib.resize(0, image.ctypes.data, 32, 32, 0, 32, 0, 32, small.ctypes.data, 16, 16)
    expected = image.reshape(16, 2, 16, 2, 3).mean((1, 3))  # INTER_AREA by 2 = 2x2 means
    rerr = float(np.abs(small - expected).max())
    if rerr > 1:
        raise SystemExit(f"error: libffcv resize differs from 2x2 means by {rerr}")
    return {"mode": "native", "imdecode_mean_diff_vs_pillow": round(err, 3), "resize_max_diff": rerr}


def full(site: Path) -> dict:
    import ffcv
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from ffcv.writer import DatasetWriter

    if not Path(ffcv.__file__).resolve().is_relative_to(site.resolve()):
        raise SystemExit(f"error: ffcv was imported from {ffcv.__file__}, not from {site}")
    images = test_images()
    labels = np.arange(len(images)) % 10

    class Data:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    def read(path: Path, decoder) -> tuple[np.ndarray, np.ndarray]:
        loader = Loader(str(path), batch_size=64, num_workers=2, order=OrderOption.SEQUENTIAL,
                        pipelines={"image": [decoder], "label": [IntDecoder(), ToTensor()]})
        xs, ys = [], []
        for x, y in loader:
            xs.append(np.array(x, copy=True))  # ffcv reuses its batch buffers
            ys.append(y.numpy().ravel().copy())
        return np.concatenate(xs), np.concatenate(ys)

    from importlib.metadata import distribution

    result = {"mode": "full", "ffcv": distribution("ffcv").version}  # ffcv.__version__ says 0.0.3rc1
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("raw", "jpg"):
            path = Path(tmp) / f"{mode}.beton"
            DatasetWriter(str(path), {"image": RGBImageField(write_mode=mode, jpeg_quality=95), "label": IntField()},
                          num_workers=2).from_indexed_dataset(Data())
            x, y = read(path, SimpleRGBImageDecoder())
            if not np.array_equal(y, labels):
                raise SystemExit(f"error: {mode}: labels differ after the round trip")
            diff = np.abs(x.astype(int) - images)
            if (mode == "raw" and diff.max() != 0) or diff.mean() > 3:
                raise SystemExit(f"error: {mode}: pixels differ by {diff.mean():.2f} on average, {diff.max()} at most, after the round trip")
            result[f"{mode}_mean_diff"] = round(float(diff.mean()), 3)
        x, _ = read(Path(tmp) / "jpg.beton", CenterCropRGBImageDecoder((16, 16), ratio=1.0))  # cv::resize
        if x.shape != (len(images), 16, 16, 3):
            raise SystemExit(f"error: centre crop gave {x.shape}")
        result["center_crop_shape"] = list(x.shape)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the folder the wheels were installed into")
    parser.add_argument("--native", action="store_true", help="ctypes only: no torch needed")
    args = parser.parse_args()
    result = native(args.site) if args.native else full(args.site)
    result.update(check_vendored(args.site))
    result["python"] = sys.version.split()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
