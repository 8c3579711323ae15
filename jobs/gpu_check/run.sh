#!/usr/bin/env bash
# The GPU check's one command: install, data, bench, sweep of the seed's seven, report.
#
#     jobs/gpu_check/run.sh [--cpu] OUT
#
# Run from a copy of this repository that holds .kit/ and trainer/_stamp.json
# (jobs/gpu_check/build.sh makes them), on a machine with Python >= 3.11, torch, torchvision,
# numba, numpy, Pillow, OpenCV (headless), PyYAML, tqdm and matplotlib but no package registry.
# In order, each stage timed and its exit code kept:
#
#   install  pip install --no-index --no-deps --target $KIT_WORK/site .kit/wheels/*.whl; the project
#            itself runs from the tree (PYTHONPATH=$KIT_WORK/site:<repo>)
#   data     .kit/cifar10.pack -> cifar-10-batches-py (unpack_data.py, checked against the CRC-32s
#            recorded at packing) -> train/test.beton (python -m trainer.data prepare)
#   bench    python -m trainer.bench --json OUT/bench.json, parts loader, accuracy, step; the step
#            part times resnet9 and resnet only (KIT_BENCH_ARGS): more compiles would not fit. The
#            bench rewrites its JSON after every part, so a bench cut by its time limit keeps the
#            parts it finished. --cpu: --quick, parts loader and step
#   sweep    python jobs/launch.py --all --local --profile gpu_check -C gpus_per_node=1 -C jobs_per_gpu=7
#            -C array_parallelism=7: the seven run at once on the one GPU, each stopped by
#            train.time_budget_s, then the launcher's report
#   report   python jobs/report.py --no-deploy, only if the sweep ended without its report.md
#
# and, whatever happened, OUT gets (at most 8 files, none in subfolders, as the device tool returns):
#   run.log          this script's whole output
#   bench.json       the bench's results and their provenance
#   summary.md       stage times and exit codes, the sweep's results, provenance in brief
#   report.md        the sweep's report (jobs/report.py), if one was written
#   sweep.tar.gz     the sweep folder without checkpoints: summaries, metrics, configs, logs, plots
#   provenance.json  command, code (commit from git or the stamp), device, software, wheels, data
#                    (pack fidelity, unpack verification, .beton hashes), stages
#
# Time: on the GPU the whole run is held to KIT_DEADLINE_S (default 540 s), inside the device
# tool's 10 minutes. The bench gets at most KIT_BENCH_TIMEOUT (200 s). The sweep gets what is left
# minus 35 s for the wrap-up, at most KIT_SWEEP_TIMEOUT (290 s), and each job's training budget is
# that minus 110 s (starting, the epoch that crosses the budget, the summary, the report), at most
# KIT_TIME_BUDGET (170 s). --cpu (a check without a GPU): bench --quick, the sweep on 512 images
# for one epoch, no deadline.
#
# Other settings: PYTHON (default python3), KIT_WORK (default /tmp/cifar-kit; emptied first),
# KIT_DIR (default <repo>/.kit), KIT_ARCHS (comma-separated, default: --all), KIT_BENCH_ARGS (to
# the bench), KIT_SWEEP_ARGS (key=value overrides for every job, e.g. data.loader=resident),
# KIT_SKIP (comma-separated stages to leave out: bench, sweep).
set -euo pipefail
export PYTHONUNBUFFERED=1

CPU=0 OUT=
for arg in "$@"; do
    case $arg in
        --cpu) CPU=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "run.sh: unknown option $arg" >&2; exit 2 ;;
        *) OUT=$arg ;;
    esac
done
[[ -n $OUT ]] || { echo "usage: $0 [--cpu] OUT" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KIT=${KIT_DIR:-$REPO/.kit}
WORK=${KIT_WORK:-/tmp/cifar-kit}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
export PYTHONPATH=$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}

exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
START=$SECONDS
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
COMMAND="jobs/gpu_check/run.sh $*"
STAGES=$WORK/stages.tsv
SWEEP=gpu-check-$(date -u +%Y%m%d-%H%M%S)
SWEEP_DIR=$WORK/runs/$SWEEP
# The folder names say where the data came from: runs and the bench record them.
UNPACKED=$WORK/unpacked-from-kit-pack/cifar-10-batches-py
DATA_DIR=$WORK/data/cifar10-from-kit-pack
log() { printf '[check %3ds] %s\n' $((SECONDS - START)) "$*"; }
skipped() { [[ ,${KIT_SKIP:-}, == *,$1,* ]]; }

if [[ $CPU == 1 ]]; then
    DEADLINE=${KIT_DEADLINE_S:-0} BENCH_LIMIT=${KIT_BENCH_TIMEOUT:-1200} SWEEP_LIMIT=${KIT_SWEEP_TIMEOUT:-1200}
    BUDGET=${KIT_TIME_BUDGET:-60} GPUS=0
    BENCH=(--quick --parts loader,step) BENCH_DEFAULT=
    SIZE=(data.train_subset=512 data.test_subset=256 data.batch_size=64 data.num_workers=1 train.epochs=1 logging.log_every=4)
else
    DEADLINE=${KIT_DEADLINE_S:-540} BENCH_LIMIT=${KIT_BENCH_TIMEOUT:-200} SWEEP_LIMIT=${KIT_SWEEP_TIMEOUT:-290}
    BUDGET=${KIT_TIME_BUDGET:-170} GPUS=1
    BENCH=(--parts loader,accuracy,step) BENCH_DEFAULT="--archs resnet9,resnet"
    SIZE=()
fi
read -r -a BENCH_ARGS <<<"${KIT_BENCH_ARGS-$BENCH_DEFAULT}"

# stage NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` (its whole process group: the
# launcher's jobs too), logs and records the exit code and seconds; returns the exit code.
stage() {
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    log "=== $name (at most ${limit} s): $*"
    timeout -k 15 "$limit" "$@" &
    local pid=$!
    STAGE_PID=$pid
    wait "$pid" || rc=$?
    # timeout runs COMMAND in a process group of its own (its pid) and signals that group when time
    # is up; what survives the signal (a job's trainer finishing its step, submitit's controller
    # waiting for it) would go on using the GPU and hold this log open: end it now.
    kill -KILL -- "-$pid" 2>/dev/null || true
    local note=""
    [[ $rc == 124 || $rc == 137 ]] && note="timed out after ${limit} s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$note" >> "$STAGES"
    log "=== $name: exit $rc after $((SECONDS - t0)) s${note:+ ($note)}"
    return "$rc"
}

finish() {
    local rc=$?
    set +e
    log "=== wrap-up (exit so far: $rc)"
    [[ -n ${STAGE_PID:-} ]] && kill -KILL -- "-$STAGE_PID" 2>/dev/null  # a stage cut short by a signal to run.sh
    if [[ -f $SWEEP_DIR/report.md ]]; then cp "$SWEEP_DIR/report.md" "$OUT/report.md"; fi
    if [[ -d $SWEEP_DIR ]]; then
        tar -czf "$OUT/sweep.tar.gz" -C "$WORK/runs" --exclude='*.pt' "$SWEEP"
    fi
    "$PY" jobs/gpu_check/summarize.py "$OUT" --command "$COMMAND" --started "$STARTED" --exit-code "$rc" \
        --stages "$STAGES" --kit "$KIT" --unpack-record "$UNPACKED/unpack.json" --data-dir "$DATA_DIR" --sweep "$SWEEP_DIR"
    log "=== done in $((SECONDS - START)) s, exit $rc; OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$rc"
}

rm -rf "$WORK"
mkdir -p "$WORK"
: > "$STAGES"
trap finish EXIT
trap 'exit 143' TERM INT  # so that a kill still writes OUT's files
log "GPU check: $COMMAND (repo $REPO, work $WORK, python $PY)"
[[ -f $KIT/cifar10.pack && -d $KIT/wheels ]] || { log "error: $KIT lacks cifar10.pack or wheels/: run jobs/gpu_check/build.sh here first (and carry .kit)"; exit 1; }
[[ -d .git || -f trainer/_stamp.json ]] || log "warning: no .git and no trainer/_stamp.json: results will not name their commit"

# ---- install -----------------------------------------------------------------------------------
stage install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$WORK/site" "$KIT"/wheels/*.whl
if ! "$PY" -c "import distutils.log" 2>/dev/null; then  # Python >= 3.12 without setuptools
    log "no distutils here: adding a distutils.log shim for ffcv's 'from distutils.log import warn'"
    mkdir -p "$WORK/site/distutils"
    : > "$WORK/site/distutils/__init__.py"
    printf 'import logging\n\n\ndef warn(msg, *args):\n    logging.getLogger("distutils").warning(msg, *args)\n' > "$WORK/site/distutils/log.py"
fi
stage preflight 120 "$PY" -c "
import sys, torch, ffcv, submitit, trainer, numba, numpy
from importlib.metadata import version
from trainer import provenance
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, torch.cuda.is_available(),
      '| ffcv', version('ffcv'), ffcv.__file__, '| submitit', submitit.__version__, '| numba', numba.__version__, '| numpy', numpy.__version__)
print('code:', provenance.git_sha())
if $GPUS and not torch.cuda.is_available():
    sys.exit('error: no CUDA device: run with --cpu to check without a GPU')
if torch.cuda.is_available():
    print('device:', torch.cuda.get_device_name(0))
"

# ---- data --------------------------------------------------------------------------------------
stage unpack 120 "$PY" jobs/gpu_check/unpack_data.py "$KIT/cifar10.pack" --out "$UNPACKED"
WRITERS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
stage prepare 180 "$PY" -m trainer.data prepare --out "$DATA_DIR" --source "$UNPACKED" --workers "$WRITERS"

# ---- bench -------------------------------------------------------------------------------------
if ! skipped bench; then
    stage bench "$BENCH_LIMIT" "$PY" -m trainer.bench "${BENCH[@]}" --json "$OUT/bench.json" --data "$DATA_DIR" "${BENCH_ARGS[@]}" \
        || log "the bench failed or ran out of time: bench.json keeps the parts it finished"
fi

# ---- sweep -------------------------------------------------------------------------------------
if ! skipped sweep; then
    limit=$SWEEP_LIMIT budget=$BUDGET
    if [[ $DEADLINE -gt 0 ]]; then
        left=$((DEADLINE - (SECONDS - START) - 35))
        ((left < limit)) && limit=$left
        ((limit - 110 < budget)) && budget=$((limit - 110))
        ((budget < 20)) && budget=20
        ((limit < 60)) && { log "only ${left} s left before the ${DEADLINE} s deadline: the sweep gets 60 s"; limit=60; }
    fi
    if [[ -n ${KIT_ARCHS:-} ]]; then which=(--arch "$KIT_ARCHS"); else which=(--all); fi
    log "sweep: ${limit} s in all, train.time_budget_s=${budget} per job"
    # shellcheck disable=SC2086
    stage sweep "$limit" "$PY" jobs/launch.py "${which[@]}" --local --profile gpu_check --runs "$WORK/runs" --sweep "$SWEEP" \
        -C gpus_per_node=$GPUS -C jobs_per_gpu=7 -C array_parallelism=7 data.dir="$DATA_DIR" "${SIZE[@]}" train.time_budget_s="$budget" \
        ${KIT_SWEEP_ARGS:-} || log "the sweep ended with an error or ran out of time: reporting what finished"
    if [[ -d $SWEEP_DIR && ! -f $SWEEP_DIR/report.md ]]; then  # the sweep ran out of time before its report
        left=60
        [[ $DEADLINE -gt 0 ]] && left=$((DEADLINE - (SECONDS - START) - 20))
        ((left < 20)) && left=20
        ((left > 60)) && left=60
        stage report "$left" "$PY" jobs/report.py "$SWEEP_DIR" --no-deploy --wandb-mode disabled || true
    fi
fi

failed=$(awk -F'\t' '$2 != 0 {print $1}' "$STAGES" | tr '\n' ' ')
[[ -z $failed ]] || { log "stages with a non-zero exit: $failed"; exit 1; }
