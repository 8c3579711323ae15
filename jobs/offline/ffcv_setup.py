"""setup.py for ffcv 1.0.2's sdist, as jobs/offline/build.sh builds it (it replaces the sdist's own).

Three changes from the original:

- Only opencv_core and opencv_imgproc are linked: libffcv.cpp uses cv::Mat and cv::resize and
  nothing else, and every other OpenCV library would be vendored into the wheel for nothing.
- The extension is built against the stable ABI (Py_LIMITED_API 3.11): libffcv.cpp uses no Python
  C-API beyond an empty module (ffcv calls it through ctypes), so one `_libffcv.abi3.so` serves
  CPython 3.11, 3.12 and 3.13, and the wheel is tagged cp311-abi3.
- It requires opencv-python-headless instead of opencv-python (both provide the `cv2` that ffcv's
  Python code imports): the full build needs libGL and X11 from the system, which headless
  cluster nodes lack.

Everything else (package list, metadata, the other requirements) is the original's. Built with
setuptools' own setup/Extension: distutils has neither py_limited_api nor, on Python 3.12, a module.
"""

import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup

LIMITED_API = 0x030B0000  # CPython 3.11


def pkgconfig(*packages: str) -> dict:
    """include_dirs / library_dirs from pkg-config (its -l flags are not used: see above)."""
    kw: dict = {"include_dirs": [], "library_dirs": []}
    for package in packages:
        r = subprocess.run(["pkg-config", "--cflags", "--libs-only-L", package], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"Could not find required package: {package} ({r.stderr.strip()})")
        for token in r.stdout.split():
            if token.startswith("-I"):
                kw["include_dirs"].append(token[2:])
            elif token.startswith("-L"):
                kw["library_dirs"].append(token[2:])
    return kw


kw = pkgconfig("opencv4", "libturbojpeg")
libffcv = Extension(
    "ffcv._libffcv",
    sources=["./libffcv/libffcv.cpp"],
    libraries=["opencv_core", "opencv_imgproc", "turbojpeg", "pthread"],
    define_macros=[("Py_LIMITED_API", hex(LIMITED_API))],
    py_limited_api=True,
    extra_link_args=["-Wl,--as-needed"],
    **kw,
)

setup(
    name="ffcv",
    version="1.0.2",
    description=" FFCV: Fast Forward Computer Vision ",
    author="MadryLab",
    author_email="ffcv@mit.edu",
    url="https://github.com/libffcv/ffcv",
    license_files=("LICENSE",),
    packages=find_packages(),
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    ext_modules=[libffcv],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
    install_requires=[
        "terminaltables",
        "pytorch_pfn_extras",
        "fastargs",
        "opencv-python-headless",
        "assertpy",
        "tqdm",
        "psutil",
        "numba",
    ],
)
