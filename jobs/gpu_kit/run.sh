#!/usr/bin/env bash
# The GPU run kit's one command: install, data, bench, sweep of the seed's seven, report.
#
#     jobs/gpu_kit/run.sh [--cpu] OUT
#
# Run from a copy of this repository that holds .kit/ (jobs/gpu_kit/build.sh makes it), on a
# machine with Python 3.12 (>= 3.11), torch, torchvision, numba, numpy, Pillow, PyYAML and tqdm but
# no package registry — the GPU benchmark machine, an air-gapped node. In order, each stage timed
# and its exit code kept:
#
#   install  pip install --no-index --no-deps --target $KIT_WORK/site .kit/wheels/*.whl; the repo
#            itself is imported from the tree (PYTHONPATH=$KIT_WORK/site:<repo>)
#   data     .kit/cifar10.pack -> cifar-10-batches-py (unpack_data.py, checked against the CRC-32s
#            recorded at packing) -> train/test.beton (python -m trainer.data prepare)
#   bench    python -m trainer.bench, one process per part (loader, accuracy, step: a part that runs
#            out of time loses only itself), merged into OUT/bench.json (merge_bench.py); the step
#            part times resnet9 and resnet only (KIT_BENCH_STEP_ARGS): eight compiles would not fit.
#            --cpu: --quick, parts loader and step
#   sweep    python jobs/launch.py --all --local --profile gpu_kit -C gpus_per_node=1: the seven run
#            at once on the one GPU, each stopped by train.time_budget_s, then the launcher's report
#   report   python jobs/report.py --no-deploy, only if the sweep ended without its report.md
#
# and, whatever happened, OUT gets (at most 8 files, none in subfolders, as the device tool returns):
#   run.log          this script's whole output
#   bench.json       the bench's results and their provenance
#   summary.md       stage times and exit codes, the sweep's results, provenance in brief
#   report.md        the sweep's report (jobs/report.py), if one was written
#   sweep.tar.gz     the sweep folder without checkpoints: summaries, metrics, configs, logs, plots
#   provenance.json  command, code (commit + content hash vs .kit/stamp.json), device, software,
#                    wheels, data (pack fidelity, unpack verification, .beton hashes), stages
#
# Time: on the GPU the whole run is held to KIT_DEADLINE_S (default 540 s). The bench gets at most
# KIT_BENCH_TIMEOUT (200 s), shared in order by KIT_BENCH_PARTS ("loader:80 accuracy step": the
# loader part at most 80 s, accuracy what is left, step what is left after that). The sweep gets
# what is left minus 35 s for the wrap-up, at most KIT_SWEEP_TIMEOUT (290 s), and each job's
# training budget is that minus 110 s (starting, the epoch that crosses the budget, the summary,
# the report), at most KIT_TIME_BUDGET (170 s). --cpu (a check of the kit without a GPU): bench
# --quick, the sweep on 512 images for one epoch, no deadline.
#
# Other settings: PYTHON (default python3), KIT_WORK (default /tmp/cifar-kit; emptied first),
# KIT_DIR (the kit, default <repo>/.kit), KIT_ARCHS (comma-separated, default: --all),
# KIT_BENCH_ARGS (to every bench part), KIT_BENCH_STEP_ARGS (to the step part), KIT_SWEEP_ARGS
# (key=value overrides for every job, e.g. data.loader=resident), KIT_SKIP (comma-separated
# stages to leave out: bench, sweep).
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

exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
START=$SECONDS
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
COMMAND="jobs/gpu_kit/run.sh $*"
STAGES=$WORK/stages.tsv
SWEEP=gpu-kit-$(date -u +%Y%m%d-%H%M%S)
SWEEP_DIR=$WORK/runs/$SWEEP
# The folder names say where the data came from: runs and the bench record them.
UNPACKED=$WORK/unpacked-from-kit-pack/cifar-10-batches-py
DATA_DIR=$WORK/data/cifar10-from-kit-pack
log() { printf '[kit %3ds] %s\n' $((SECONDS - START)) "$*"; }
skipped() { [[ ,${KIT_SKIP:-}, == *,$1,* ]]; }

if [[ $CPU == 1 ]]; then
    DEADLINE=${KIT_DEADLINE_S:-0} BENCH_LIMIT=${KIT_BENCH_TIMEOUT:-1200} SWEEP_LIMIT=${KIT_SWEEP_TIMEOUT:-1200}
    BUDGET=${KIT_TIME_BUDGET:-60}
    BENCH_MODE=(--quick) GPUS=0 BENCH_PARTS=${KIT_BENCH_PARTS:-loader step} BENCH_STEP_ARGS=${KIT_BENCH_STEP_ARGS-}
    SIZE=(data.train_subset=512 data.test_subset=256 data.batch_size=64 data.num_workers=1 train.epochs=1 logging.log_every=4)
else
    DEADLINE=${KIT_DEADLINE_S:-540} BENCH_LIMIT=${KIT_BENCH_TIMEOUT:-200} SWEEP_LIMIT=${KIT_SWEEP_TIMEOUT:-290}
    BUDGET=${KIT_TIME_BUDGET:-170}
    BENCH_MODE=() GPUS=1 SIZE=()
    BENCH_PARTS=${KIT_BENCH_PARTS:-loader:80 accuracy step} BENCH_STEP_ARGS=${KIT_BENCH_STEP_ARGS---archs resnet9,resnet}
fi

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
    "$PY" jobs/gpu_kit/provenance.py record --out "$OUT/provenance.json" --stamp "$KIT/stamp.json" \
        --wheels "$KIT/wheels" --pack-record "$KIT/cifar10.pack.json" \
        --unpack-record "$UNPACKED/unpack.json" --data-dir "$DATA_DIR" \
        --stages "$STAGES" --command "$COMMAND" --started "$STARTED" --exit-code "$rc"
    "$PY" jobs/gpu_kit/summarize.py --out "$OUT/summary.md" --provenance "$OUT/provenance.json" \
        --bench "$OUT/bench.json" --sweep "$SWEEP_DIR" --report "$OUT/report.md"
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
log "GPU run kit: $COMMAND (repo $REPO, work $WORK, python $PY)"
[[ -f $KIT/cifar10.pack && -d $KIT/wheels ]] || { log "error: $KIT lacks cifar10.pack or wheels/: run jobs/gpu_kit/build.sh here first (and carry .kit)"; exit 1; }

# ---- install -----------------------------------------------------------------------------------
stage install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$WORK/site" "$KIT"/wheels/*.whl
export PYTHONPATH=$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import distutils.log" 2>/dev/null; then  # Python >= 3.12 without setuptools
    log "no distutils here: adding a distutils.log shim for ffcv's 'from distutils.log import warn'"
    mkdir -p "$WORK/site/distutils"
    : > "$WORK/site/distutils/__init__.py"
    printf 'import logging\n\n\ndef warn(msg, *args):\n    logging.getLogger("distutils").warning(msg, *args)\n' > "$WORK/site/distutils/log.py"
fi
stage preflight 120 "$PY" -c "
import sys, torch, ffcv, submitit, trainer, numba, numpy
from importlib.metadata import version
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, torch.cuda.is_available(),
      '| ffcv', version('ffcv'), ffcv.__file__, '| submitit', submitit.__version__, '| numba', numba.__version__, '| numpy', numpy.__version__)
if $GPUS and not torch.cuda.is_available():
    sys.exit('error: no CUDA device: run with --cpu to check the kit without a GPU')
if torch.cuda.is_available():
    print('device:', torch.cuda.get_device_name(0))
"

# ---- data --------------------------------------------------------------------------------------
stage unpack 120 "$PY" jobs/gpu_kit/unpack_data.py "$KIT/cifar10.pack" --out "$UNPACKED"
WRITERS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
stage prepare 180 "$PY" -m trainer.data prepare --out "$DATA_DIR" --source "$UNPACKED" --workers "$WRITERS"

# ---- bench -------------------------------------------------------------------------------------
# One process per part, each under what is left of the bench's time (a part's own cap first):
# trainer.bench writes its JSON only at the end, so a part that runs out of time loses only itself.
if ! skipped bench; then
    bench_end=$((SECONDS + BENCH_LIMIT))
    for spec in $BENCH_PARTS; do
        part=${spec%%:*} cap=0
        [[ $spec == *:* ]] && cap=${spec#*:}
        left=$((bench_end - SECONDS)) limit=$((bench_end - SECONDS))
        ((cap > 0 && cap < left)) && limit=$cap
        if ((limit < 30)); then
            log "bench $part: ${left} s of the bench's ${BENCH_LIMIT} s left: skipped"
            printf 'bench-%s\t0\t0\tskipped: %s s of the bench time left\n' "$part" "$left" >> "$STAGES"
            continue
        fi
        part_args=()
        # shellcheck disable=SC2206  # word lists on purpose
        [[ $part == step ]] && part_args=($BENCH_STEP_ARGS)
        # shellcheck disable=SC2086
        stage "bench-$part" "$limit" "$PY" -m trainer.bench "${BENCH_MODE[@]}" --parts "$part" --json "$WORK/bench-$part.json" \
            --data "$DATA_DIR" "${part_args[@]}" ${KIT_BENCH_ARGS:-} || log "bench $part failed or ran out of time: going on"
    done
    "$PY" jobs/gpu_kit/merge_bench.py --out "$OUT/bench.json" --stages "$STAGES" "$WORK"/bench-*.json || true
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
    stage sweep "$limit" "$PY" jobs/launch.py "${which[@]}" --local --profile gpu_kit --runs "$WORK/runs" --sweep "$SWEEP" \
        -C gpus_per_node=$GPUS data.dir="$DATA_DIR" "${SIZE[@]}" train.time_budget_s="$budget" \
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
