#!/usr/bin/env bash
# Sets up CIFAR-infinity on Debian/Ubuntu: the system libraries ffcv compiles against, a virtual
# environment in .venv, and the package (editable, with the test extra) at the versions in
# constraints.txt. Safe to re-run: each step checks first and skips what is already done.
#   ./setup.sh            # uses python3; PYTHON=/path/to/python3.11 ./setup.sh to choose
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# ffcv builds a C extension against OpenCV and libturbojpeg (found through pkg-config).
APT_PACKAGES=(libopencv-dev libturbojpeg0-dev pkg-config g++)

say() { echo "[setup] $*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# A bare image may have no Python; Debian's own python3 needs python3-venv for `-m venv` and
# python3-dev for the headers ffcv's extension compiles against (pyenv/conda Pythons have both).
if ! command -v "$PYTHON" >/dev/null; then
    missing+=(python3 python3-venv python3-dev)
else
    "$PYTHON" -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
    "$PYTHON" -c "import os, sysconfig; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" \
        2>/dev/null || missing+=(python3-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing system packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    say "system packages present"
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "[setup] error: $PYTHON is $("$PYTHON" -V 2>&1); Python >= 3.11 is required (set PYTHON=...)" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# The stamp records what the environment was installed from, so a re-run with nothing changed
# does not touch it.
stamp="$VENV/.cifar-infinity-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "python packages up to date ($VENV)"
else
    say "installing the package and its dependencies into $VENV (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev]'
    echo "$want" > "$stamp"
fi
say "ready: $VENV/bin/python"
