"""The GPU check's time plan: every stage limit of run.sh and the sweep's per-job budget, here only.

    python jobs/gpu_check/plan.py --shell [--cpu]            stage limits as shell assignments
    python jobs/gpu_check/plan.py sweep --left S --jobs N [--cpu] [--record F]
    python jobs/gpu_check/plan.py report --left S [--cpu]    the sweep's report, when the sweep ran out of time
    python jobs/gpu_check/plan.py step --left S [--cpu]      the step bench's limit
    python jobs/gpu_check/plan.py --json [--cpu]             the whole plan, for results.json

On the GPU the whole command is held to TOTAL_S (480 s): the device tool allows 10 minutes a
command and 15 minutes a lease, so a run of 8 minutes leaves the lease room for the machine's start
and one rerun. The stages, in order of value, each killed at its limit (run.sh's `timeout` sends
TERM, then KILL after a grace inside the limit, so no stage outlasts it):

    install, preflight, unpack, prepare, gpu-tests, speed   fixed limits (FIXED_S)
    sweep      what is left at its start, less the step bench's minimum and the wrap-up
    step       what is left at its start, less the wrap-up (at least STEP_MIN_S when every stage
               before it ran to its limit)
    wrap-up    the results tarball, results.json, summary.md

The sum of the fixed limits, the bookkeeping between stages, the sweep's minimum, the step bench's
minimum and the wrap-up is at most TOTAL_S (tests/test_gpu_check.py checks it), so even a run
whose every stage hits its limit ends inside it. Each sweep job gets
train.budget_s = (sweep limit - REPORT_S) / jobs - JOB_START_S, at most the budget profile's own
train.budget_s (jobs/profiles.yaml, 60 s) and at least MIN_JOB_BUDGET_S; below the profile's, the
summary says the numbers are not the profile's. A limit below the stage's RUN_MIN_S is given as 0:
run.sh skips the stage, saying so. None of these seconds is measured on a GPU yet.

--cpu (run.sh --cpu, a check of the path without a GPU): no deadline, every stage CPU_LIMIT_S, and
each sweep job the budget given (run.sh: KIT_TIME_BUDGET, default 8 s).

Needs the standard library and PyYAML only (it runs before anything is installed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

TOTAL_S = 480
FIXED_S = {  # stage: its limit on the GPU, seconds
    "install": 15,  # pip --no-index of ~10 MiB of wheels: 3 s here
    "preflight": 30,  # import torch, CUDA init, bf16, ffcv (numba) import
    "unpack": 20,  # the pack to batch files: 11 s here on 2 cores, 16 cores there
    "prepare": 30,  # the .beton files (ffcv writer): 17 s here
    "gpu-tests": 45,  # pytest -m gpu
    "speed": 130,  # the speed profile, seed 0: start-up, compile, ~10 epochs, one evaluation
}
BOOKKEEPING_S = 20  # between stages: summarize.py snapshots, plan queries, listing the architectures
SWEEP_MIN_S = 100  # what the sweep gets when every stage before it ran to its limit
STEP_MIN_S = 60  # the step bench: eager and AMP of every architecture, then what compiles in time
WRAP_UP_S = 20  # the results tarball, results.json, summary.md
REPORT_S = 25  # the launcher's report at the end of the sweep
REPORT_MAX_S = 60  # jobs/report.py alone, after a sweep cut off before its report
JOB_START_S = 12  # a sweep job's start: interpreter, imports, CUDA, data onto the device
MIN_JOB_BUDGET_S = 10
RUN_MIN_S = {"sweep": 30, "report": 15, "step": 15}  # less than this: not worth starting
CPU_LIMIT_S = 1800  # --cpu: a check, not a plan: a stage stuck for half an hour is a failure
PROFILES = Path(__file__).resolve().parents[1] / "profiles.yaml"


def profile_budget(profiles: Path = PROFILES) -> float:
    """train.budget_s of the `budget` profile: the budget its numbers claim."""
    for item in yaml.safe_load(profiles.read_text())["budget"]:
        key, _, value = str(item).partition("=")
        if key.strip() == "train.budget_s":
            return float(value)
    raise SystemExit(f"error: {profiles}: the budget profile sets no train.budget_s")


def worst_case_s() -> int:
    """The whole command's seconds when every stage runs to its limit."""
    return sum(FIXED_S.values()) + BOOKKEEPING_S + SWEEP_MIN_S + STEP_MIN_S + WRAP_UP_S


def limits(cpu: bool) -> dict:
    return {name: CPU_LIMIT_S if cpu else s for name, s in FIXED_S.items()}


def sweep(left_s: float, jobs: int, cpu: bool, budget: float | None = None) -> dict:
    """The sweep's stage limit and each job's train.budget_s, from the seconds left before the deadline
    (--cpu: no deadline, the budget given)."""
    profile = profile_budget()
    if cpu:
        limit, each = CPU_LIMIT_S, budget if budget is not None else profile
    else:
        limit = int(left_s) - STEP_MIN_S - WRAP_UP_S
        each = (limit - REPORT_S) // max(jobs, 1) - JOB_START_S
        each = max(MIN_JOB_BUDGET_S, min(each, budget if budget is not None else profile, profile))
    return {"limit_s": _worth(int(limit), "sweep"), "budget_s": each, "profile_budget_s": profile, "budget_cut": each < profile,
            "jobs": jobs, "left_s_at_start": None if cpu else int(left_s)}


def _worth(limit: int, stage: str) -> int:
    return limit if limit >= RUN_MIN_S[stage] else 0


def report(left_s: float, cpu: bool) -> int:
    """The report's limit after a sweep that ran out of time: what the step bench and the wrap-up leave."""
    return REPORT_MAX_S if cpu else _worth(min(REPORT_MAX_S, int(left_s) - STEP_MIN_S - WRAP_UP_S), "report")


def step(left_s: float, cpu: bool) -> int:
    return CPU_LIMIT_S if cpu else _worth(int(left_s) - WRAP_UP_S, "step")


def plan(cpu: bool) -> dict:
    return {"total_s": None if cpu else TOTAL_S, "limits_s": limits(cpu), "bookkeeping_s": BOOKKEEPING_S,
            "sweep_min_s": SWEEP_MIN_S, "step_min_s": STEP_MIN_S, "wrap_up_s": WRAP_UP_S, "report_s": REPORT_S,
            "job_start_s": JOB_START_S, "run_min_s": RUN_MIN_S, "worst_case_s": None if cpu else worst_case_s(),
            "profile_budget_s": profile_budget(), "measured_on_gpu": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("sweep", "report", "step"))
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--shell", action="store_true", help="the stage limits as KEY=VALUE lines")
    parser.add_argument("--json", action="store_true", help="the whole plan")
    parser.add_argument("--left", type=float, help="seconds left before the deadline")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--budget", type=float, help="each sweep job's budget wanted (default: the profile's)")
    parser.add_argument("--record", type=Path, help="sweep: also write the sweep's plan here (JSON)")
    args = parser.parse_args()
    if args.what and args.left is None and not args.cpu:
        parser.error(f"{args.what}: --left is needed without --cpu")
    if args.shell:
        p = plan(args.cpu)
        print(f"PLAN_TOTAL_S={p['total_s'] or 0}")
        for name, s in p["limits_s"].items():
            print(f"LIMIT_{name.upper().replace('-', '_')}={s}")
    elif args.json:
        print(json.dumps(plan(args.cpu), indent=1))
    elif args.what == "sweep":
        s = sweep(args.left or 0, args.jobs, args.cpu, args.budget)
        if args.record:
            args.record.write_text(json.dumps(s, indent=1) + "\n")
        print(f"SWEEP_LIMIT={s['limit_s']}\nSWEEP_BUDGET={s['budget_s']:g}\nPROFILE_BUDGET={s['profile_budget_s']:g}")
    elif args.what == "report":
        print(report(args.left or 0, args.cpu))
    elif args.what == "step":
        print(step(args.left or 0, args.cpu))
    else:
        parser.error("give --shell, --json, sweep or step")


if __name__ == "__main__":
    sys.exit(main())
