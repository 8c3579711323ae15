#!/usr/bin/env bash
# The GPU check's one command: install, preflight, data, then the parts in order of value (the
# gpu-marked tests, the speed profile, the `budget` sweep of the seven, the step bench), each under
# the time plan's limit, and OUT as the device tool brings it back.
#
#     jobs/gpu_check/run.sh [--cpu] OUT
#
# Run from a copy of this repository that holds .kit/ and trainer/_stamp.json
# (jobs/gpu_check/build.sh makes them), on a machine with Python >= 3.11, torch, torchvision,
# numba, numpy, Pillow, PyYAML and tqdm but no package registry. In order, each stage timed, its
# exit code kept and its limit from jobs/gpu_check/plan.py (the plan's one place):
#
#   install    pip install --no-index --no-deps --target $KIT_WORK/site .kit/wheels/*.whl (skipped,
#              saying so, when the kit has no wheels: this Python's own packages are used); the
#              project itself runs from the tree (PYTHONPATH=$KIT_WORK/site:<repo>)
#   preflight  torch, CUDA, bf16, and whether ffcv, submitit and pytest import (preflight.json)
#   unpack     .kit/cifar10.pack -> cifar-10-batches-py (checked against the CRC-32s of the packing)
#   prepare    -> train/test.beton (python -m trainer.data prepare), only if ffcv imports. Without
#              ffcv, or if prepare fails, the speed run and the sweep read the batch files directly:
#              data.format=python data.dir=<cifar-10-batches-py> data.loader=resident
#   gpu-tests  python -m pytest -m gpu on the test files that hold gpu-marked tests (exit 5, no
#              tests, counts as 0; on a CPU they skip)
#   speed      python -m trainer --config jobs/configs/speed.yaml train.seed=0
#   sweep      python jobs/launch.py --arch <the seven> --local --profile budget: one job after
#              another, each alone on the GPU, each fitted to the plan's train.budget_s (at most the
#              profile's), then the launcher's report (report: jobs/report.py, if it did not get to it)
#   step       python -m trainer.bench --parts step: eager fp32 and AMP of every architecture, then
#              the compiled steps; each row written as it is measured, so a cut-off keeps the rest
#
# OUT gets at most these files, flat (what the device tool brings back):
#   summary.md        stages, speed run, sweep table, step table, data path, provenance in brief
#   results.json      every number: plan, stages, preflight, gpu tests, speed, sweep (budget given vs
#                     the profile's), step rows, data path
#   provenance.json   command, code (commit from git or the stamp), device, software, wheels, data
#   run.log           this script's whole output
#   results.tar.gz    everything else (run folders without checkpoints, step.json, report.md,
#                     pytest output, ...), small files first, cut to fit 16 MiB
# summary.md, results.json and provenance.json are rewritten after the preflight, the data and each
# part, so a run killed anywhere keeps what it finished; the script's last output is summary.md itself.
#
# Time: on the GPU the whole run is held to the plan's 480 s (KIT_DEADLINE_S overrides). --cpu (a
# check without a GPU): the same path on 512 training images (the speed run 256, one epoch), the
# bench as KIT_BENCH_ARGS says, train.budget_s=KIT_TIME_BUDGET (default 8) per job, no deadline.
#
# Other settings: PYTHON (default python3), KIT_WORK (default /tmp/cifar-kit; emptied first),
# KIT_DIR (default <repo>/.kit), KIT_ARCHS (comma-separated, the sweep's; default: the seed's seven),
# KIT_STEP_ARCHS (the step bench's; default KIT_ARCHS and the speed profile's arch), KIT_BENCH_ARGS
# (default --steps 10; --cpu: --quick), KIT_TIME_BUDGET (each sweep job's budget: on the GPU a cap),
# KIT_SWEEP_ARGS (key=value overrides for every sweep job), KIT_SKIP (comma-separated parts to leave
# out: gpu-tests, speed, sweep, step).
set -euo pipefail
# The whole script is one compound command (the braces, closed on the last line): bash parses all of
# it before running any, so a copy edited while a run is under way (seen in a rehearsal) cannot
# make that run execute half-old, half-new lines.
{
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
KEEP=$WORK/keep  # what results.tar.gz carries
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
STAGES=$KEEP/stages.tsv
SWEEP=gpu-check-$(date -u +%Y%m%d-%H%M%S)
SWEEP_DIR=$KEEP/runs/$SWEEP
# The folder names say where the data came from: runs and the bench record them.
UNPACKED=$WORK/unpacked-from-kit-pack/cifar-10-batches-py
DATA_DIR=$WORK/data/cifar10-from-kit-pack
log() { printf '[check %3ds] %s\n' $((SECONDS - START)) "$*"; }
skipped() { [[ ,${KIT_SKIP:-}, == *,$1,* ]]; }
# record NAME EXIT SECONDS NOTE: a stage line without running anything (a skip, a fallback)
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STAGES"; log "=== $1: $4"; }

# stage NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` (its whole process group: the
# launcher's jobs too), TERM at LIMIT_S less a grace, KILL at LIMIT_S; records the exit code and
# seconds; returns the exit code.
stage() {
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    local grace=$((limit / 4 < 10 ? limit / 4 : 10))
    log "=== $name (at most ${limit} s): $*"
    # TERM first: the trainer saves its state and writes its summary on TERM
    timeout -k "$grace" $((limit - grace)) "$@" &
    local pid=$!
    STAGE_PID=$pid STAGE_NAME=$name STAGE_T0=$t0
    wait "$pid" || rc=$?
    # timeout runs COMMAND in a process group of its own (its pid) and signals that group when time
    # is up; what survives the signal (a job's trainer finishing its step, submitit's controller
    # waiting for it) would go on using the GPU and hold this log open: end it now.
    kill -KILL -- "-$pid" 2>/dev/null || true
    STAGE_PID=
    local note=""
    [[ $rc == 124 || $rc == 137 ]] && note="timed out after ${limit} s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$note" >> "$STAGES"
    log "=== $name: exit $rc after $((SECONDS - t0)) s${note:+ ($note)}"
    return "$rc"
}

# summarize [EXIT_CODE]: results.json, summary.md and provenance.json from what KEEP holds so far
# (without an exit code: the run is still going); with one, results.tar.gz first.
summarize() {
    "$PY" jobs/gpu_check/summarize.py "$OUT" --keep "$KEEP" --command "$COMMAND" --started "$STARTED" \
        ${1:+--exit-code "$1" --final} --kit "$KIT" --unpack-record "$UNPACKED/unpack.json" --data-dir "$DATA_DIR" \
        || log "summarize.py failed (exit $?)"
}

finish() {
    local rc=$?
    set +e
    if [[ -n ${STAGE_PID:-} ]]; then  # a stage cut short by a signal to run.sh: end it, and say so
        kill -KILL -- "-$STAGE_PID" 2>/dev/null
        printf '%s\t%s\t%s\t%s\n' "$STAGE_NAME" "$rc" $((SECONDS - STAGE_T0)) "cut off: run.sh was stopped" >> "$STAGES"
    fi
    log "=== wrap-up (exit so far: $rc)"
    summarize "$rc"
    log "=== done in $((SECONDS - START)) s, exit $rc; OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    # the last output: the device tool's reply carries the output's tail even if no file comes back
    cat "$OUT/summary.md" 2>/dev/null
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$rc"
}

# left_s: seconds left before the deadline (a big number without one)
left_s() { if [[ $DEADLINE -gt 0 ]]; then echo $((DEADLINE - (SECONDS - START))); else echo 100000; fi; }

rm -rf "$WORK"
mkdir -p "$KEEP"
: > "$STAGES"
trap finish EXIT
trap 'exit 143' TERM INT  # so that a kill still writes OUT's files
log "GPU check: $COMMAND (repo $REPO, work $WORK, python $PY)"
PLAN_ARGS=()
[[ $CPU == 1 ]] && PLAN_ARGS=(--cpu)
eval "$("$PY" jobs/gpu_check/plan.py --shell "${PLAN_ARGS[@]}")"
"$PY" jobs/gpu_check/plan.py --json "${PLAN_ARGS[@]}" > "$KEEP/plan.json"
if [[ $CPU == 1 ]]; then
    DEADLINE=${KIT_DEADLINE_S:-0} BUDGET=${KIT_TIME_BUDGET:-8} GPUS=0 BENCH_DEFAULT=--quick
    SIZE=(data.train_subset=512 data.test_subset=256 data.batch_size=64 data.num_workers=1 logging.log_every=4)
    SPEED_SIZE=(train.epochs=1 data.train_subset=256 data.test_subset=128)
    SWEEP_SIZE=(train.epochs=2)  # an upper bound: the budget plan decides
else
    DEADLINE=${KIT_DEADLINE_S:-$PLAN_TOTAL_S} BUDGET=${KIT_TIME_BUDGET:-} GPUS=1 BENCH_DEFAULT="--steps 10"
    SIZE=() SPEED_SIZE=() SWEEP_SIZE=()
fi
read -r -a BENCH_ARGS <<<"${KIT_BENCH_ARGS-$BENCH_DEFAULT}"
[[ -f $KIT/cifar10.pack ]] || { log "error: $KIT lacks cifar10.pack: run jobs/gpu_check/build.sh here first (and carry .kit)"; exit 1; }
[[ -d .git || -f trainer/_stamp.json ]] || log "warning: no .git and no trainer/_stamp.json: results will not name their commit"

# ---- install -----------------------------------------------------------------------------------
shopt -s nullglob
WHEELS=("$KIT"/wheels/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]})); then
    stage install "$LIMIT_INSTALL" "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$WORK/site" "${WHEELS[@]}" || log "install failed: going on with what this Python has"
else
    record install 0 0 "skipped: the kit has no wheels; this Python's own packages are used"
fi
if ! "$PY" -c "import distutils.log" 2>/dev/null; then  # Python >= 3.12 without setuptools
    log "no distutils here: adding a distutils.log shim for ffcv's 'from distutils.log import warn'"
    mkdir -p "$WORK/site/distutils"
    : > "$WORK/site/distutils/__init__.py"
    printf 'import logging\n\n\ndef warn(msg, *args):\n    logging.getLogger("distutils").warning(msg, *args)\n' > "$WORK/site/distutils/log.py"
fi

# ---- preflight: what this machine has ----------------------------------------------------------
# Only torch (and CUDA on the GPU) is required; ffcv, submitit and pytest decide which paths run.
cat > "$WORK/preflight.py" <<'EOF'
import json, subprocess, sys, time
out, env, need_gpu, ffcv_s = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
info, flags = {"python": sys.version.split()[0]}, {}
# ffcv in a child with its own limit, started first to overlap the rest: an import that hangs (numba
# compiling) or crashes the interpreter must not cost the preflight
ffcv_t0 = time.perf_counter()
ffcv_child = subprocess.Popen([sys.executable, "-c", "import ffcv; from ffcv.loader import Loader; "
                               "from ffcv.writer import DatasetWriter"], stderr=subprocess.PIPE, text=True)
def probe(name, code):
    t0 = time.perf_counter()
    try:
        exec(code, {})
        info[name] = {"ok": True}
    except BaseException as e:  # an import can raise anything (a SystemExit from a broken build)
        info[name] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    info[name]["seconds"] = round(time.perf_counter() - t0, 2)
    flags[name.upper()] = int(info[name]["ok"])
probe("torch", "import torch")
if info["torch"]["ok"]:
    import torch
    info.update(torch_version=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
        probe("cuda_bf16_matmul", "import torch; a = torch.randn(64, 64, device='cuda', dtype=torch.bfloat16); "
                                  "torch.cuda.synchronize(); assert torch.isfinite(a @ a).all()")
for name, code in (("torchvision", "import torchvision"), ("numpy", "import numpy"), ("numba", "import numba"),
                   ("submitit", "import submitit"), ("pytest", "import pytest"), ("trainer", "import trainer.models")):
    probe(name, code)
try:
    _, err = ffcv_child.communicate(timeout=max(1.0, ffcv_s - (time.perf_counter() - ffcv_t0)))
    info["ffcv"] = {"ok": ffcv_child.returncode == 0}
    if ffcv_child.returncode:
        info["ffcv"]["error"] = (err.strip().splitlines() or [f"exit {ffcv_child.returncode}"])[-1][:300]
except subprocess.TimeoutExpired:
    ffcv_child.kill()
    info["ffcv"] = {"ok": False, "error": f"the import took more than {ffcv_s:g} s"}
info["ffcv"]["seconds"] = round(time.perf_counter() - ffcv_t0, 2)
flags["FFCV"] = int(info["ffcv"]["ok"])
try:
    from importlib.metadata import version
    info["versions"] = {}
    for name in ("torch", "torchvision", "numpy", "numba", "ffcv", "submitit", "pytest"):
        try:
            info["versions"][name] = version(name)
        except Exception:
            pass
except Exception:
    pass
with open(out, "w") as f:
    json.dump(info, f, indent=1)
# the architectures, asked here where trainer is imported anyway (one torch import less)
archs = {}
if info["trainer"]["ok"]:
    try:
        from trainer import models
        from trainer.config import load_config
        archs = {"SEED_ARCHS": ",".join(models.seed_names()),
                 "SPEED_ARCH": load_config("jobs/configs/speed.yaml").model.arch}
    except Exception as e:
        info["archs_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
import shlex
with open(env, "w") as f:
    f.writelines(f"HAVE_{k}={v}\n" for k, v in flags.items())
    f.writelines(f"{k}={shlex.quote(v)}\n" for k, v in archs.items())
print(json.dumps(info))
if not info["torch"]["ok"]:
    sys.exit("error: torch does not import: nothing to run")
if need_gpu and not info.get("cuda_available"):
    sys.exit("error: no CUDA device: run with --cpu to check without a GPU")
EOF
# ffcv's import (numba, torch) may take two thirds of the preflight's time
stage preflight "$LIMIT_PREFLIGHT" "$PY" "$WORK/preflight.py" "$KEEP/preflight.json" "$WORK/preflight.env" "$GPUS" \
    $((LIMIT_PREFLIGHT * 2 / 3)) || exit 1
# shellcheck disable=SC1091
source "$WORK/preflight.env"
summarize

# ---- data ----------------------------------------------------------------------------------------
DATA_OK=1
stage unpack "$LIMIT_UNPACK" "$PY" jobs/gpu_check/unpack_data.py "$KIT/cifar10.pack" --out "$UNPACKED" || DATA_OK=0
DATA_ARGS=()
if [[ $DATA_OK == 1 ]]; then
    WRITERS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
    why=""
    if [[ $HAVE_FFCV != 1 ]]; then
        why="ffcv does not import here: see preflight.json"
        record prepare 0 0 "skipped: $why; the runs read the batch files"
    elif ! stage prepare "$LIMIT_PREPARE" "$PY" -m trainer.data prepare --out "$DATA_DIR" --source "$UNPACKED" --workers "$WRITERS"; then
        why="prepare failed"
    fi
    if [[ -z $why ]]; then
        DATA_ARGS=(data.dir="$DATA_DIR")
        printf '{"path": "ffcv .beton", "dir": "%s"}\n' "$DATA_DIR" > "$KEEP/data.json"
    else
        DATA_ARGS=(data.format=python data.dir="$UNPACKED" data.loader=resident)
        printf '{"path": "batch files, no ffcv", "dir": "%s", "why": "%s"}\n' "$UNPACKED" "$why" > "$KEEP/data.json"
    fi
    log "data path: $(cat "$KEEP/data.json")"
else
    log "no data: the speed run and the sweep cannot run; the step bench (synthetic batches) still does"
fi

ARCH_LIST=${KIT_ARCHS:-${SEED_ARCHS:-}}  # SEED_ARCHS and SPEED_ARCH: from the preflight
SPEED_ARCH=${SPEED_ARCH:-}
IFS=, read -r -a ARCHS <<<"$ARCH_LIST"
STEP_LIST=${KIT_STEP_ARCHS:-$ARCH_LIST${SPEED_ARCH:+,$SPEED_ARCH}}
summarize

# ---- the gpu-marked tests ------------------------------------------------------------------------
if skipped gpu-tests; then
    record gpu-tests 0 0 "skipped (KIT_SKIP)"
else
    mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py 2>/dev/null || true)
    if [[ $HAVE_PYTEST != 1 ]]; then
        record gpu-tests 0 0 "skipped: pytest does not import here"
    elif ((${#GPU_TEST_FILES[@]} == 0)); then
        record gpu-tests 0 0 "skipped: no test file holds a gpu-marked test"
    else
        # pytest's exit 5 is "no tests collected": not a failure
        stage gpu-tests "$LIMIT_GPU_TESTS" bash -c 'out=$1; shift; "$@" 2>&1 | tee "$out"; rc=${PIPESTATUS[0]}; ((rc == 5)) && rc=0; exit $rc' \
            _ "$KEEP/gpu-tests.txt" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${GPU_TEST_FILES[@]}" \
            || log "gpu-marked tests failed or ran out of time"
    fi
    summarize
fi

# ---- the speed profile, seed 0 -------------------------------------------------------------------
if skipped speed; then
    record speed 0 0 "skipped (KIT_SKIP)"
elif ((${#DATA_ARGS[@]} == 0)); then
    record speed 1 0 "skipped: no data"
else
    stage speed "$LIMIT_SPEED" "$PY" -m trainer --config jobs/configs/speed.yaml --run-dir "$KEEP/speed/s0" \
        "${DATA_ARGS[@]}" train.seed=0 logging.mode=disabled "${SIZE[@]}" "${SPEED_SIZE[@]}" \
        || log "the speed run failed or ran out of time"
    summarize
fi

# ---- the budget sweep of the seven, one after another --------------------------------------------
if skipped sweep; then
    record sweep 0 0 "skipped (KIT_SKIP)"
elif ((${#DATA_ARGS[@]} == 0 || ${#ARCHS[@]} == 0)); then
    record sweep 1 0 "skipped: no data or no architectures"
else
    eval "$("$PY" jobs/gpu_check/plan.py sweep --left "$(left_s)" --jobs "${#ARCHS[@]}" "${PLAN_ARGS[@]}" \
        ${BUDGET:+--budget "$BUDGET"} --record "$KEEP/sweep-plan.json")"
    if ((SWEEP_LIMIT == 0)); then
        record sweep 1 0 "skipped: too little time left for it"
    else
        log "sweep: ${#ARCHS[@]} job(s) one after another, train.budget_s=${SWEEP_BUDGET} each (the profile's: ${PROFILE_BUDGET}), ${SWEEP_LIMIT} s in all"
        # shellcheck disable=SC2086
        stage sweep "$SWEEP_LIMIT" "$PY" jobs/launch.py --arch "$ARCH_LIST" --local --profile budget --runs "$KEEP/runs" \
            --sweep "$SWEEP" -C gpus_per_node=$GPUS -C jobs_per_gpu=1 -C array_parallelism=1 "${DATA_ARGS[@]}" \
            logging.mode=disabled "${SIZE[@]}" "${SWEEP_SIZE[@]}" train.budget_s="$SWEEP_BUDGET" ${KIT_SWEEP_ARGS:-} \
            || log "the sweep ended with an error or ran out of time: reporting what finished"
        if [[ -d $SWEEP_DIR && ! -f $SWEEP_DIR/report.md ]]; then  # the sweep ran out of time before its report
            limit=$("$PY" jobs/gpu_check/plan.py report --left "$(left_s)" "${PLAN_ARGS[@]}")
            if ((limit > 0)); then
                stage report "$limit" "$PY" jobs/report.py "$SWEEP_DIR" --no-deploy --wandb-mode disabled || true
            else
                record report 0 0 "skipped: no time left for the sweep's report (the sweep's rows are in results.json)"
            fi
        fi
    fi
    summarize
fi

# ---- the step bench, last -------------------------------------------------------------------------
if skipped step; then
    record step 0 0 "skipped (KIT_SKIP)"
else
    limit=$("$PY" jobs/gpu_check/plan.py step --left "$(left_s)" "${PLAN_ARGS[@]}")
    if ((limit == 0)); then
        record step 1 0 "skipped: too little time left for it"
    else
        stage step "$limit" "$PY" -m trainer.bench --parts step --archs "$STEP_LIST" --json "$KEEP/step.json" \
            "${BENCH_ARGS[@]}" || log "the step bench failed or ran out of time: its rows so far are kept"
    fi
fi

failed=$(awk -F'\t' '$2 != 0 {print $1}' "$STAGES" | tr '\n' ' ')
[[ -z $failed ]] || { log "stages with a non-zero exit: $failed"; exit 1; }
exit 0
}
