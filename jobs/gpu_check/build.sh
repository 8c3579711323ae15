#!/usr/bin/env bash
# Build what the GPU check carries, here: .kit/wheels, .kit/cifar10.pack and trainer/_stamp.json.
#
#     jobs/gpu_check/build.sh [--no-data]
#
# .kit/wheels   jobs/offline/build.sh --packages: the self-contained ffcv wheel and the few pure
#               Python wheels the GPU machine lacks (ffcv's terminaltables, pytorch-pfn-extras,
#               fastargs, assertpy; the launcher's submitit), for its Python 3.12. Not carried:
#               wandb (imported only when logging is on; the check runs with logging.mode=disabled)
#               and the project's wheel (the tree travels, and jobs/ is not in the package).
# .kit/cifar10.pack (+ .json)  the shared CIFAR-10 copy packed to fit the transfer limit, if missing
#               (pack_data.py; needs ../shared or CIFAR10_SOURCE)
# trainer/_stamp.json          the commit and the tracked files' hashes: the tree travels without
#               .git, and trainer.provenance answers from the stamp there. Run this again right
#               before carrying: with everything built it takes seconds.
#
# Carry both: run(command='bash jobs/gpu_check/run.sh "$OUT"', carry=[".kit", "trainer/_stamp.json"]).
# Needs a CPython 3.12 (PYTHON312, default: pyenv's newest 3.12) and what jobs/offline/build.sh needs.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DATA=1
for arg in "$@"; do
    case $arg in
        --no-data) DATA=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
cd "$REPO"
PROJECT_PY=${PROJECT_PYTHON:-$REPO/.venv/bin/python}

# The GPU machine's Python (3.12) and what it lacks, pinned: what was built and checked together.
PY312=${PYTHON312:-}
if [[ -z $PY312 ]] && command -v pyenv >/dev/null; then
    PY312=$(ls -d "$(pyenv root)"/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -1 || true)
fi
PY312=${PY312:-$(command -v python3.12 || true)}
[[ -n $PY312 && -x $PY312 ]] || { echo "build.sh: no CPython 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 1; }
jobs/offline/build.sh .kit/wheels --python "$PY312" \
    --packages "terminaltables==3.1.10 pytorch-pfn-extras==0.9.0 fastargs==1.2.0 assertpy==1.1 submitit==1.5.4"

if [[ $DATA == 1 && ! -f .kit/cifar10.pack.json ]]; then
    echo "packing CIFAR-10 into .kit/cifar10.pack"
    "$PROJECT_PY" jobs/gpu_check/pack_data.py --out .kit/cifar10.pack
fi

"$PROJECT_PY" -m trainer.provenance stamp

kit=$(du -sb .kit | cut -f1)
# (du counts what exists and fails on tracked files deleted from the tree: the total is still right)
tree=$({ git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null || true; } | tail -1 | cut -f1)
awk -v k="$kit" -v t="$tree" 'BEGIN {printf "travels: .kit %.1f MiB + working tree %.1f MiB of the device tool'"'"'s 64 MiB\n", k / 2^20, t / 2^20}'
