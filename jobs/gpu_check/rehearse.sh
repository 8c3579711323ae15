#!/usr/bin/env bash
# The GPU check rehearsed here on the GPU machine's software, so that a version difference fails on
# this machine and not in the lease (device time is 15 minutes in all, one command at most 10).
#
#     jobs/gpu_check/rehearse.sh [OUT]        (default OUT: /tmp/gpu-rehearsal-out)
#
# The GPU image (the device tool's KINDS.md, "Python packages already there"; its pip list) has
# Python 3.12.3, torch 2.11.0 (+cu130), torchvision 0.26.0, numpy 2.5.2, numba, OpenCV (headless),
# Pillow, pytest, PyYAML, tqdm, matplotlib, rich, setuptools, cloudpickle, safetensors 0.8.0 — and
# no ffcv, submitit or wandb: those come only from the kit's wheels (.kit/wheels), as there.
#
#   venv    $REHEARSAL_VENV (default /tmp/gpu-rehearsal-venv, outside the repository), made from a
#           CPython 3.12 (PYTHON312, default: pyenv's newest 3.12) and filled by pip from PyPI.
#           Where the wheels come from: download.pytorch.org (the +cpu builds) does not resolve
#           from this machine, so torch==2.11.0 and torchvision==0.26.0 are PyPI's Linux wheels,
#           which are the CUDA 13.0 build — the GPU image's own build — and pull the nvidia-*
#           runtime wheels (about 3 GiB; some come from the local indexes in pip's configuration).
#           They run on the CPU here. The rest at the GPU image's versions where known
#           (REQUIREMENTS below), the newest otherwise. Kept between runs: rebuilt only when
#           REQUIREMENTS change (a hash in $REHEARSAL_VENV/.rehearsal-requirements).
#   check   the versions installed, and that ffcv, submitit and wandb are NOT importable from it.
#   kit     jobs/gpu_check/build.sh, only if .kit/wheels or .kit/cifar10.pack is missing (builds
#           the ffcv wheel for Python 3.12 and the data pack; minutes on a cold cache).
#   run     PYTHON=<venv python> jobs/gpu_check/run.sh --cpu OUT with small knobs (KIT_* from the
#           caller win): the seven through the sweep, the smoke-sized step bench of airbench94 and
#           alexnet only (KIT_STEP_ARCHS; all eight compiled took over 30 minutes on a shared 2-core
#           CPU, and the CPU's inductor code is not the GPU's anyway), in
#           KIT_WORK=/tmp/gpu-rehearsal-work so that it does not empty another run's work folder.
#
# Settings: REHEARSAL_VENV, PYTHON312, REHEARSAL_REBUILD=1 (remake the venv), and two variants of
# the GPU image that this venv is not, made in every process run.sh starts by a sitecustomize on
# PYTHONPATH (run.sh puts the caller's PYTHONPATH after its own, so path order alone cannot do it):
#   REHEARSAL_SHIM=1     setuptools without its distutils-precedence.pth (its import hook taken off
#                        sys.meta_path): `import distutils.log` fails as on a bare Python 3.12, so
#                        run.sh writes its distutils.log shim for ffcv, while `import setuptools`
#                        (torch.compile's cpp_extension imports it) still works, as it would there.
#                        Not SETUPTOOLS_USE_DISTUTILS=stdlib: that breaks `import setuptools` on 3.12,
#                        which no image with setuptools does.
#   REHEARSAL_NO_FFCV=1  the kit's ffcv installed but failing to import (a wheel that does not load
#                        on an unseen image): a package `ffcv` raising ImportError first on sys.path.
# The steps run under `nice -n 10` (a shared machine); each step's seconds are printed, and the
# exit code is run.sh's.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${1:-/tmp/gpu-rehearsal-out}
VENV=${REHEARSAL_VENV:-/tmp/gpu-rehearsal-venv}
case $OUT in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac

# numpy 2.5.2, safetensors 0.8.0, torch, torchvision: the GPU image's pip list; the others' versions
# there are not recorded, so pip takes the newest that resolves with these.
REQUIREMENTS="torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 numba opencv-python-headless pillow pytest
pyyaml tqdm matplotlib rich setuptools cloudpickle safetensors==0.8.0"

T0=$SECONDS
step_t0=$SECONDS
say() { printf '[rehearse %4ds] %s\n' $((SECONDS - T0)) "$*"; }
step_done() { say "$1 took $((SECONDS - step_t0)) s"; step_t0=$SECONDS; }

PY312=${PYTHON312:-}
if [[ -z $PY312 ]] && command -v pyenv >/dev/null; then
    PY312=$(ls -d "$(pyenv root)"/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -1 || true)
fi
PY312=${PY312:-$(command -v python3.12 || true)}
[[ -n $PY312 && -x $PY312 ]] || { echo "rehearse.sh: no CPython 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 1; }

# ---- venv ----------------------------------------------------------------------------------------
want=$(printf '%s\n%s\n' "$("$PY312" -V)" "$REQUIREMENTS" | sha256sum | cut -c1-16)
if [[ ${REHEARSAL_REBUILD:-0} == 1 || ! -x $VENV/bin/python || $(cat "$VENV/.rehearsal-requirements" 2>/dev/null) != "$want" ]]; then
    say "venv: making $VENV from $PY312 ($("$PY312" -V))"
    rm -rf "$VENV"
    "$PY312" -m venv "$VENV"
    # shellcheck disable=SC2086
    nice -n 10 "$VENV/bin/python" -m pip install -q --disable-pip-version-check $REQUIREMENTS
    echo "$want" > "$VENV/.rehearsal-requirements"
else
    say "venv: $VENV is up to date"
fi
VPY=$VENV/bin/python
step_done venv

# ---- check: the versions, and that only the kit can bring ffcv, submitit and wandb ----------------
# PYTHONNOUSERSITE: nothing from ~/.local; PYTHONPATH emptied: nothing from the project's own venv.
export PYTHONNOUSERSITE=1
unset PYTHONPATH
"$VPY" - <<'EOF'
import importlib.util, sys
from importlib.metadata import version, PackageNotFoundError
print("python", sys.version.split()[0], sys.executable)
for name in ["torch", "torchvision", "numpy", "numba", "llvmlite", "opencv-python-headless", "pillow", "pytest",
             "pyyaml", "tqdm", "matplotlib", "rich", "setuptools", "cloudpickle", "safetensors", "triton"]:
    try:
        print(f"  {name} {version(name)}")
    except PackageNotFoundError:
        print(f"  {name}: not installed")
present = [m for m in ("ffcv", "submitit", "wandb") if importlib.util.find_spec(m) is not None]
if present:
    sys.exit(f"rehearse.sh: {present} importable from the venv: the GPU image has none of them")
try:
    import distutils.log
    print("  distutils.log from", distutils.log.__file__)
except ImportError:
    print("  distutils.log: not importable (run.sh adds its shim)")
EOF
step_done check

# ---- kit ----------------------------------------------------------------------------------------
cd "$REPO"
if [[ ! -d .kit/wheels || ! -f .kit/cifar10.pack ]]; then
    say "kit: building .kit (jobs/gpu_check/build.sh)"
    PYTHON312=$PY312 nice -n 10 bash jobs/gpu_check/build.sh
else
    say "kit: .kit is there ($(ls .kit/wheels | tr '\n' ' '))"
fi
step_done kit

# ---- run ----------------------------------------------------------------------------------------
# Small knobs: the quick bench for each of the seven, one speed epoch on run.sh's --cpu subset, a
# few seconds per sweep job — enough to import and run every code path once under these versions.
export KIT_WORK=${KIT_WORK:-/tmp/gpu-rehearsal-work}
export KIT_BENCH_ARGS=${KIT_BENCH_ARGS---smoke}
export KIT_TIME_BUDGET=${KIT_TIME_BUDGET:-6}
export KIT_STEP_ARCHS=${KIT_STEP_ARCHS:-airbench94,alexnet}
if [[ ${REHEARSAL_SHIM:-0} == 1 || ${REHEARSAL_NO_FFCV:-0} == 1 ]]; then
    site=${KIT_WORK}-sitecustomize  # outside KIT_WORK, which run.sh empties
    rm -rf "$site"
    mkdir -p "$site"
    echo "import sys" > "$site/sitecustomize.py"
    if [[ ${REHEARSAL_SHIM:-0} == 1 ]]; then
        echo "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != 'DistutilsMetaFinder']" >> "$site/sitecustomize.py"
    fi
    if [[ ${REHEARSAL_NO_FFCV:-0} == 1 ]]; then
        mkdir -p "$site/first/ffcv"
        echo "raise ImportError('ffcv hidden by rehearse.sh (REHEARSAL_NO_FFCV=1)')" > "$site/first/ffcv/__init__.py"
        echo "sys.path.insert(0, '$site/first')" >> "$site/sitecustomize.py"
    fi
    export PYTHONPATH=$site
    if [[ ${REHEARSAL_SHIM:-0} == 1 ]]; then
        if "$VPY" -c "import distutils.log" 2>/dev/null; then say "REHEARSAL_SHIM=1 did not hide distutils"; exit 1; fi
        "$VPY" -c "import setuptools" || { say "REHEARSAL_SHIM=1 broke 'import setuptools'"; exit 1; }
        say "setuptools' distutils hook off (REHEARSAL_SHIM=1): run.sh's distutils.log shim will be used"
    fi
    if [[ ${REHEARSAL_NO_FFCV:-0} == 1 ]]; then
        if "$VPY" -c "import ffcv" 2>/dev/null; then say "REHEARSAL_NO_FFCV=1 did not hide ffcv"; exit 1; fi
        say "ffcv hidden (REHEARSAL_NO_FFCV=1): every 'import ffcv' raises ImportError"
    fi
fi
say "run: PYTHON=$VPY jobs/gpu_check/run.sh --cpu $OUT (KIT_WORK=$KIT_WORK KIT_BENCH_ARGS=$KIT_BENCH_ARGS KIT_TIME_BUDGET=$KIT_TIME_BUDGET KIT_STEP_ARCHS=$KIT_STEP_ARCHS)"
rc=0
PYTHON=$VPY nice -n 10 bash jobs/gpu_check/run.sh --cpu "$OUT" || rc=$?
step_done run
say "run.sh exit $rc; OUT: $OUT; total $((SECONDS - T0)) s"
exit "$rc"
