#!/usr/bin/env bash
# The GPU check's one command: install, data, then three parts (the step bench of the seed's seven,
# the speed profile, the `budget` sweep of the seven), each written into OUT as it finishes.
#
#     jobs/gpu_check/run.sh [--cpu] OUT
#
# Run from a copy of this repository that holds .kit/ and trainer/_stamp.json
# (jobs/gpu_check/build.sh makes them), on a machine with Python >= 3.11, torch, torchvision,
# numba, numpy, Pillow, OpenCV (headless), PyYAML, tqdm and matplotlib but no package registry.
# In order, each stage timed and its exit code kept:
#
#   install    pip install --no-index --no-deps --target $KIT_WORK/site .kit/wheels/*.whl; the project
#              itself runs from the tree (PYTHONPATH=$KIT_WORK/site:<repo>)
#   data       .kit/cifar10.pack -> cifar-10-batches-py (unpack_data.py, checked against the CRC-32s
#              recorded at packing) -> train/test.beton (python -m trainer.data prepare)
#   step-ARCH  python -m trainer.bench --parts step --archs ARCH, one process per architecture, each
#              writing OUT/step/ARCH.json: eager, AMP and compiled images/s, compile seconds, MFU.
#              The seven share KIT_STEP_S (default 100 s; --cpu: no limit); an architecture whose
#              turn comes after that is left out (summary.md says so)
#   speed-sN   python -m trainer --config jobs/configs/speed.yaml train.seed=N, seeds 0, 1, ... while
#              KIT_SPEED_S (default 110 s) holds another run as long as the last one, at most
#              KIT_SPEED_SEEDS (default 3; --cpu: 1); each run's summary, metrics and config are
#              copied to OUT/speed/sN/ when it ends
#   sweep      python jobs/launch.py --all --local --profile budget -C gpus_per_node=1
#              -C array_parallelism=1: the seven one after another, each alone on the GPU, each fitted
#              to train.budget_s (below), then the launcher's report. Every 10 s the runs' summaries,
#              metrics and configs are copied to OUT/sweep/ARCH/, so a cut-off sweep keeps what finished
#   report     python jobs/report.py --no-deploy, only if the sweep ended without its report.md
#
# summary.md and provenance.json (summarize.py) are rewritten after each part, and at the end OUT
# also gets report.md (the sweep's report, if one was written) and sweep.tar.gz (the sweep folder
# without checkpoints: logs, plots too). OUT then holds:
#   run.log          this script's whole output
#   summary.md       stages, the step table, the speed runs, the sweep's results, provenance in brief
#   provenance.json  command, code (commit from git or the stamp), device, software, wheels, data
#                    (pack fidelity, unpack verification, .beton hashes), stages
#   step/ARCH.json, speed/sN/*, sweep/ARCH/*, sweep/sweep.json, report.md, sweep.tar.gz
#
# Time: on the GPU the whole run is held to KIT_DEADLINE_S (default 540 s), inside the device
# tool's 10 minutes: set-up (~1 min), the step bench (KIT_STEP_S), the speed runs (KIT_SPEED_S),
# and the sweep gets what is left minus 35 s for the wrap-up; each of its jobs gets
# train.budget_s = (that - 25 s for the report) / jobs - 12 s (a job's start and data loading), at
# most KIT_TIME_BUDGET (default: the budget profile's 60 s) and at least 10 s. --cpu (a check
# without a GPU): the same path on 512 training images, the smoke-sized bench (KIT_BENCH_ARGS), one
# speed epoch, train.budget_s=KIT_TIME_BUDGET (default 8) per job, no deadline.
#
# Other settings: PYTHON (default python3), KIT_WORK (default /tmp/cifar-kit; emptied first),
# KIT_DIR (default <repo>/.kit), KIT_ARCHS (comma-separated, for the step bench and the sweep;
# default: the seed's seven), KIT_STEP_ARCHS (the step bench's, if not KIT_ARCHS), KIT_BENCH_ARGS (to each bench; default --steps 10, --cpu: --quick),
# KIT_SWEEP_ARGS (key=value overrides for every sweep job), KIT_SKIP (comma-separated parts to
# leave out: step, speed, sweep).
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
    DEADLINE=${KIT_DEADLINE_S:-0} STEP_S=${KIT_STEP_S:-0} SPEED_S=${KIT_SPEED_S:-0} SPEED_SEEDS=${KIT_SPEED_SEEDS:-1}
    BUDGET=${KIT_TIME_BUDGET:-8} GPUS=0 BENCH_DEFAULT=--quick
    SIZE=(data.train_subset=512 data.test_subset=256 data.batch_size=64 data.num_workers=1 logging.log_every=4)
    SPEED_SIZE=(train.epochs=1)
    SWEEP_SIZE=(train.epochs=2)  # an upper bound: the budget plan decides
else
    DEADLINE=${KIT_DEADLINE_S:-540} STEP_S=${KIT_STEP_S:-100} SPEED_S=${KIT_SPEED_S:-110} SPEED_SEEDS=${KIT_SPEED_SEEDS:-3}
    BUDGET=${KIT_TIME_BUDGET:-60} GPUS=1 BENCH_DEFAULT="--steps 10"
    SIZE=() SPEED_SIZE=() SWEEP_SIZE=()
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

# mirror_sweep: the sweep's small files (summaries, metrics, configs, sweep.json) into OUT/sweep, each
# replaced whole (copy, then rename), so OUT holds every finished job even if the run is cut off.
mirror_sweep() {
    [[ -d $SWEEP_DIR ]] || return 0
    mkdir -p "$OUT/sweep"
    local run name f
    [[ -f $SWEEP_DIR/sweep.json ]] && cp "$SWEEP_DIR/sweep.json" "$OUT/sweep/.sweep.json" && mv -f "$OUT/sweep/.sweep.json" "$OUT/sweep/sweep.json"
    for run in "$SWEEP_DIR"/*/; do
        name=$(basename "$run")
        [[ -f $run/config.yaml ]] || continue
        mkdir -p "$OUT/sweep/$name"
        for f in config.yaml metrics.jsonl summary.json; do
            [[ -f $run/$f ]] && cp "$run/$f" "$OUT/sweep/$name/.$f" && mv -f "$OUT/sweep/$name/.$f" "$OUT/sweep/$name/$f"
        done
    done
    return 0
}

# summarize [EXIT_CODE]: summary.md and provenance.json from what OUT and the stages hold so far
# (without an exit code: the run is still going).
summarize() {
    "$PY" jobs/gpu_check/summarize.py "$OUT" --command "$COMMAND" --started "$STARTED" ${1:+--exit-code "$1"} \
        --stages "$STAGES" --kit "$KIT" --unpack-record "$UNPACKED/unpack.json" --data-dir "$DATA_DIR" --sweep "$OUT/sweep" \
        || log "summarize.py failed (exit $?)"
}

finish() {
    local rc=$?
    set +e
    log "=== wrap-up (exit so far: $rc)"
    [[ -n ${STAGE_PID:-} ]] && kill -KILL -- "-$STAGE_PID" 2>/dev/null  # a stage cut short by a signal to run.sh
    [[ -n ${MIRROR_PID:-} ]] && kill "$MIRROR_PID" 2>/dev/null
    mirror_sweep
    if [[ -f $SWEEP_DIR/report.md ]]; then cp "$SWEEP_DIR/report.md" "$OUT/report.md"; fi
    if [[ -d $SWEEP_DIR ]]; then
        tar -czf "$OUT/sweep.tar.gz" -C "$WORK/runs" --exclude='*.pt' "$SWEEP"
    fi
    summarize "$rc"
    log "=== done in $((SECONDS - START)) s, exit $rc; OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$rc"
}

# left_s: seconds left before the deadline, less RESERVE (the parts after this one); a big number without one.
left_s() { if [[ $DEADLINE -gt 0 ]]; then echo $((DEADLINE - (SECONDS - START) - $1)); else echo 100000; fi; }

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

ARCH_LIST=${KIT_ARCHS:-$("$PY" -c "from trainer import models; print(','.join(models.seed_names()))" 2>/dev/null || true)}
IFS=, read -r -a ARCHS <<<"$ARCH_LIST"
((${#ARCHS[@]})) || { log "error: no architectures (KIT_ARCHS empty, and trainer.models did not answer)"; exit 1; }
IFS=, read -r -a STEP_ARCHS <<<"${KIT_STEP_ARCHS:-$ARCH_LIST}"

# ---- part 1: the step bench, one architecture at a time ------------------------------------------
# One process per architecture, so that one slow compile costs only its own row; the seven share
# STEP_S, and those whose turn comes after it are left out (summary.md lists them).
if ! skipped step; then
    mkdir -p "$OUT/step"
    part_end=$((SECONDS + STEP_S))
    for arch in "${STEP_ARCHS[@]}"; do
        limit=$(left_s $((SPEED_S + 120)))  # keep time for the speed runs and a minimal sweep
        if [[ $STEP_S -gt 0 ]]; then ((part_end - SECONDS < limit)) && limit=$((part_end - SECONDS)); fi
        ((limit > 300)) && limit=300
        if ((limit < 10)); then log "step bench: no time left for $arch and the rest"; break; fi
        stage "step-$arch" "$limit" "$PY" -m trainer.bench --parts step --archs "$arch" --json "$OUT/step/$arch.json" \
            --data "$DATA_DIR" "${BENCH_ARGS[@]}" || log "the step bench of $arch failed or ran out of time"
    done
    summarize
fi

# ---- part 2: the speed profile, seed after seed --------------------------------------------------
if ! skipped speed; then
    part_end=$((SECONDS + SPEED_S)) last=0
    for ((seed = 0; seed < SPEED_SEEDS; seed++)); do
        limit=$(left_s 150)  # keep time for a minimal sweep
        if [[ $SPEED_S -gt 0 ]]; then ((part_end - SECONDS < limit)) && limit=$((part_end - SECONDS)); fi
        ((limit > 300)) && limit=300
        # another seed only if it can take as long as the last one did
        if ((seed > 0 && limit < last + 5)) || ((limit < 20)); then log "speed: no time for seed $seed"; break; fi
        t0=$SECONDS
        # shellcheck disable=SC2086
        stage "speed-s$seed" "$limit" "$PY" -m trainer --config jobs/configs/speed.yaml --run-dir "$WORK/speed/s$seed" \
            data.dir="$DATA_DIR" train.seed="$seed" logging.mode=disabled "${SIZE[@]}" "${SPEED_SIZE[@]}" \
            || log "the speed run of seed $seed failed or ran out of time"
        last=$((SECONDS - t0))
        mkdir -p "$OUT/speed/s$seed"
        for f in config.yaml metrics.jsonl summary.json; do
            [[ -f $WORK/speed/s$seed/$f ]] && cp "$WORK/speed/s$seed/$f" "$OUT/speed/s$seed/"
        done
    done
    summarize
fi

# ---- part 3: the budget sweep of the seven, one after another ------------------------------------
if ! skipped sweep; then
    n=${#ARCHS[@]} budget=$BUDGET limit=$(left_s 35)
    if [[ $DEADLINE -gt 0 ]]; then
        # each job: its budget plus ~12 s to start and load the data; the report ~25 s at the end
        fit=$(((limit - 25) / n - 12))
        ((fit < budget)) && budget=$fit
        ((budget < 10)) && { log "only ${limit} s left: each job gets the minimum train.budget_s=10"; budget=10; }
        ((limit < 60)) && limit=60
    else
        limit=3600
    fi
    log "sweep: ${n} job(s) one after another, train.budget_s=${budget} each, ${limit} s in all"
    ( while sleep 10; do mirror_sweep; done ) &
    MIRROR_PID=$!
    # shellcheck disable=SC2086
    stage sweep "$limit" "$PY" jobs/launch.py --arch "$(IFS=,; echo "${ARCHS[*]}")" --local --profile budget --runs "$WORK/runs" \
        --sweep "$SWEEP" -C gpus_per_node=$GPUS -C jobs_per_gpu=1 -C array_parallelism=1 data.dir="$DATA_DIR" \
        logging.mode=disabled "${SIZE[@]}" "${SWEEP_SIZE[@]}" train.budget_s="$budget" ${KIT_SWEEP_ARGS:-} \
        || log "the sweep ended with an error or ran out of time: reporting what finished"
    kill "$MIRROR_PID" 2>/dev/null || true
    wait "$MIRROR_PID" 2>/dev/null || true  # 143: it ended by that TERM, as asked
    MIRROR_PID=
    mirror_sweep
    if [[ -d $SWEEP_DIR && ! -f $SWEEP_DIR/report.md ]]; then  # the sweep ran out of time before its report
        left=60
        [[ $DEADLINE -gt 0 ]] && left=$(left_s 20)
        ((left < 20)) && left=20
        ((left > 60)) && left=60
        stage report "$left" "$PY" jobs/report.py "$SWEEP_DIR" --no-deploy --wandb-mode disabled || true
    fi
fi

failed=$(awk -F'\t' '$2 != 0 {print $1}' "$STAGES" | tr '\n' ' ')
[[ -z $failed ]] || { log "stages with a non-zero exit: $failed"; exit 1; }
