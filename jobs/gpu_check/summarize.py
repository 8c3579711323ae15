"""The GPU check's record of a run, in OUT: results.json (every number), summary.md (the same,
compact, for the device tool's output tail), provenance.json, and with --final results.tar.gz.

    python jobs/gpu_check/summarize.py OUT --keep KEEP --command CMD --started T [--exit-code N] [--final] \
        [--kit .kit] [--unpack-record F] [--data-dir D]

run.sh calls it after the preflight, the data and each part (without --exit-code: the run is still
going) and last, after whatever failed, so it tolerates anything missing and says what is there and
what is not. It needs the standard library, PyYAML and this repository on the path, not torch (the
device facts come from run.sh's preflight.json). It reads what run.sh leaves in KEEP:

    stages.tsv        stage, exit code, seconds, note
    plan.json         jobs/gpu_check/plan.py --json;  sweep-plan.json: the sweep's budget and limit
    preflight.json    python, torch, CUDA, device, which packages import
    data.json         the data path the runs took ("ffcv .beton" or "batch files, no ffcv")
    gpu-tests.txt     pytest's output
    speed/s0/         the speed run's folder;  runs/<sweep>/: the sweep (its run folders, sweep.json, report.md)
    step.json         python -m trainer.bench --parts step --json, written as each row is measured

--final packs KEEP, small files first and without checkpoints, into OUT/results.tar.gz within 16 MiB
(what the device tool brings back of one file); what did not fit is listed in results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

from trainer import provenance, sweep_file
from trainer.files import sha256, write_text_atomic
from trainer.run_files import CONFIG, SUMMARY, read_metrics

TARBALL = "results.tar.gz"
TAR_LIMIT = 16 * 2**20  # the device tool's limit for one file
LEFT_OUT = (".pt", ".safetensors", ".ckpt", ".pkl")  # checkpoints: too big, and nothing to read
SPEED_TARGET = 94.0
DATA_NOTE = {"ffcv .beton": "ffcv .beton", "batch files, no ffcv": "batch files, no ffcv (data.format=python, resident loader)"}


def _load(path: Path | str | None):
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def _metrics(run: Path) -> list[dict]:
    try:
        return read_metrics(run, skipped=[])
    except (OSError, ValueError):
        return []


def _config(run: Path) -> dict:
    try:
        return yaml.safe_load((run / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _get(d: dict, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


# ---- what the run left ------------------------------------------------------------------------------


def read_stages(path: Path) -> list[dict]:
    stages = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                name, rc, seconds, *note = line.split("\t")
                stages.append({"stage": name, "exit_code": int(rc), "seconds": int(seconds), "note": note[0] if note else ""})
    return stages


def run_row(run: Path) -> dict:
    """One run folder's numbers: its summary.json if it finished, else what metrics.jsonl holds."""
    s, m, cfg = _load(run / SUMMARY), _metrics(run), _config(run)
    budget = (s or {}).get("budget") or {}
    row = {"name": run.name, "arch": _get(cfg, "model", "arch"), "finished": s is not None,
           "epochs_set": _get(cfg, "train", "epochs"), "epochs_logged": len(m),
           "test_acc": s["test_acc"] if s else (m[-1].get("test_acc") if m else None),
           "best_test_acc": (s or {}).get("best_test_acc"), "best_epoch": (s or {}).get("best_epoch"),
           "epochs_run": (s or {}).get("epochs_run"), "params": (s or {}).get("params"),
           "wall_time_s": (s or {}).get("wall_time_s"), "images_per_s": m[-1].get("images_per_s") if m else None,
           "budget_s": budget.get("budget_s"), "used_s": budget.get("used_s"),
           "within_budget": budget.get("within_budget"), "fitted_epochs": budget.get("fitted_epochs")}
    hit = next((r for r in m if (r.get("test_acc") or 0) >= SPEED_TARGET), None)
    row["time_to_target_s"], row["target_epoch"] = (hit["elapsed_s"], hit["epoch"]) if hit else (None, None)
    return row


def speed_results(keep: Path) -> list[dict]:
    folder = keep / "speed"
    runs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name) if folder.is_dir() else []
    return [{"seed": int(r.name[1:]) if r.name[1:].isdigit() else r.name, **run_row(r)} for r in runs]


def sweep_results(keep: Path) -> dict | None:
    sweeps = sorted(p for p in (keep / "runs").iterdir() if p.is_dir()) if (keep / "runs").is_dir() else []
    plan = _load(keep / "sweep-plan.json")
    if not sweeps and not plan:
        return None
    folder = sweeps[-1] if sweeps else None
    try:  # a sweep cut off before its sweep.json was written is still reported from its run folders
        record = sweep_file.read(folder) if folder else None
    except sweep_file.SweepFileError:
        record = None
    names = [j.name for j in record.runs] if record else []
    if folder:
        names = list(dict.fromkeys([*names, *sorted(p.name for p in folder.iterdir() if (p / CONFIG).exists())]))
    rows = []
    for name in names:
        run = folder / name
        rows.append(run_row(run) if run.is_dir() else {"name": name, "arch": name, "finished": False, "started": False})
    profile, given = (plan or {}).get("profile_budget_s"), (plan or {}).get("budget_s")
    return {"name": record.sweep if record else folder.name if folder else None,
            "profile": record.profile if record else None, "overrides": record.overrides if record else None,
            "budget_s": given, "profile_budget_s": profile,
            "budget_cut": given is not None and profile is not None and given < profile, "limit_s": (plan or {}).get("limit_s"),
            "rows": rows, "report_md": bool(folder and (folder / "report.md").is_file())}


def step_results(keep: Path) -> dict | None:
    data = _load(keep / "step.json")
    if data is None:
        return None
    return {"device": data.get("device"), "torch_version": data.get("torch_version"), "settings": data.get("step_settings"),
            "part_finished": "step" in (data.get("parts_done") or []), "rows": data.get("step") or {},
            "wall_s": data.get("wall_s"), "command": data.get("command")}


def gpu_test_results(keep: Path, stages: list[dict]) -> dict | None:
    stage = next((s for s in stages if s["stage"] == "gpu-tests"), None)
    if stage is None:
        return None
    text = (keep / "gpu-tests.txt").read_text(errors="replace") if (keep / "gpu-tests.txt").is_file() else ""
    # pytest's last line: "2 passed, 1 skipped, 30 deselected in 4.1s"
    last = next((ln.strip("= ") for ln in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|skipped|error|deselected)", ln)), None)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", last or "")}
    failures = [ln.strip() for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return {"exit_code": stage["exit_code"], "note": stage["note"], "summary_line": last, "counts": counts, "failures": failures[:20]}


def pack_results(keep: Path, out: Path) -> dict:
    """OUT/results.tar.gz: KEEP's files, small first, without checkpoints, while their tar size (an
    upper bound of the compressed one, plus gzip's few bytes a block) stays within 16 MiB."""
    files = sorted((p for p in keep.rglob("*") if p.is_file() and not p.is_symlink()), key=lambda p: (p.stat().st_size, str(p)))
    bound, taken, left_out = 10 * 1024, [], []  # tar's end blocks and gzip's header
    for path in files:
        rel = path.relative_to(keep)
        size = path.stat().st_size
        cost = 512 + -(-size // 512) * 512  # a header block, the data padded to blocks
        if path.suffix in LEFT_OUT:
            left_out.append(f"{rel} ({size:,} bytes: a checkpoint)")
        elif bound + cost * 1.001 > TAR_LIMIT:
            left_out.append(f"{rel} ({size:,} bytes: over the 16 MiB limit)")
        else:
            bound += cost * 1.001 + 64
            taken.append((path, rel))
    tmp = out / f".{TARBALL}"
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        for path, rel in taken:
            tar.add(path, arcname=f"results/{rel}", recursive=False)
    os.replace(tmp, out / TARBALL)
    return {"file": TARBALL, "bytes": (out / TARBALL).stat().st_size, "files": len(taken), "left_out": left_out}


def collect(args: argparse.Namespace) -> dict:
    keep = args.keep
    stages = read_stages(keep / "stages.tsv")
    return {
        "what": "results of jobs/gpu_check/run.sh",
        "command": args.command, "started": args.started,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exit_code": args.exit_code, "running": args.exit_code is None,
        "plan": _load(keep / "plan.json"),
        "stages": stages,
        "preflight": _load(keep / "preflight.json"),
        "data": _load(keep / "data.json"),
        "gpu_tests": gpu_test_results(keep, stages),
        "speed": speed_results(keep),
        "sweep": sweep_results(keep),
        "step": step_results(keep),
    }


# ---- summary.md ---------------------------------------------------------------------------------------


def budget_line(sweep: dict) -> str:
    given, profile = sweep.get("budget_s"), sweep.get("profile_budget_s")
    if given is None:
        return "Budget per network: not recorded."
    if sweep.get("budget_cut"):
        return (f"**Budget cut to {given:g} s per network (profile: {profile:g} s): these are not the budget "
                f"profile's numbers.**")
    return f"Budget per network: {given:g} s, the profile's own."


def verdict(r: dict) -> str:
    failed = [s["stage"] for s in r["stages"] if s["exit_code"] != 0]
    head = "run.sh still running (a snapshot)" if r["running"] else f"run.sh exit code {r['exit_code']}"
    tail = "every stage exited 0" if r["stages"] and not failed else f"stages that failed or timed out: {', '.join(failed) or 'none recorded'}"
    return f"{head}; {tail}"


def device_line(pre: dict | None) -> str:
    if not pre:
        return "device: unknown (no preflight record)"
    dev = pre.get("device") or "CPU, no CUDA"
    extra = f", {pre.get('memory_gib')} GiB, capability {pre.get('capability')}, bf16 {pre.get('bf16')}" if pre.get("device") else ""
    imports = ", ".join(f"{k} {'ok' if _get(pre, k, 'ok') else 'FAILS'}" for k in ("ffcv", "submitit", "pytest") if k in pre)
    return (f"device: {dev}{extra}; Python {pre.get('python')}, torch {pre.get('torch_version')} (CUDA {pre.get('cuda')}); "
            f"imports: {imports}")


def data_line(data: dict | None) -> str:
    if not data:
        return "data path: none (the pack was not unpacked)"
    why = f" ({data['why']})" if data.get("why") else ""
    return f"data path: **{DATA_NOTE.get(data.get('path'), data.get('path'))}**{why}"


def stage_lines(r: dict) -> list[str]:
    if not r["stages"]:
        return ["(no stages recorded)"]
    limits = _get(r, "plan", "limits_s") or {}
    lines = ["| stage | exit | s | limit s | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['exit_code']} | {s['seconds']} | {limits.get(s['stage'], '')} | {s['note']} |" for s in r["stages"]]
    total = _get(r, "plan", "total_s")
    lines.append(f"| total | | {sum(s['seconds'] for s in r['stages'])} | {total or 'none (--cpu)'} | |")
    return lines


def speed_lines(r: dict) -> list[str]:
    if not r["speed"]:
        return ["(no speed run)"]
    lines = [f"jobs/configs/speed.yaml; time to {SPEED_TARGET:g}% counts training, evaluation and compiling", "",
             "| seed | arch | final test acc % | epochs | training s | time to target s |", "|---|---|---|---|---|---|"]
    for x in r["speed"]:
        to = f"{x['time_to_target_s']:.1f} (epoch {x['target_epoch']})" if x["time_to_target_s"] is not None else "not reached"
        if x["finished"]:
            lines.append(f"| {x['seed']} | {x['arch']} | {x['test_acc']:.2f} | {x['epochs_run']} | {_fmt(x['wall_time_s'], '.1f')} | {to} |")
        else:
            lines.append(f"| {x['seed']} | {x['arch']} | unfinished ({x['epochs_logged']} evaluations logged) | - | - | {to} |")
    return lines


def sweep_lines(r: dict) -> list[str]:
    sw = r["sweep"]
    if not sw:
        return ["(no sweep)"]
    head = (f"Sweep `{sw['name']}`, profile `{sw['profile']}`, {len(sw['rows'])} job(s), {sw['limit_s']} s in all."
            if sw["name"] else f"The launcher wrote no sweep folder ({sw['limit_s']} s given; see run.log).")
    lines = [head, "", budget_line(sw), "",
             "| arch | final test acc % | best % (epoch) | epochs run / set | budget s / used s | fitted epochs | params M | img/s |",
             "|---|---|---|---|---|---|---|---|"]
    missing, rows = [], []
    for x in sw["rows"]:
        if not x.get("finished"):
            missing.append(f"{x['name']} ({x['epochs_logged']} evaluations logged, no {SUMMARY})" if x.get("started", True) else f"{x['name']} (not started)")
            if x.get("started", True):
                rows.append((-1, f"| {x['name']} | {_fmt(x['test_acc'])} (unfinished) | - | - / {x['epochs_set']} | - | - | - | {_fmt(x['images_per_s'], ',.0f')} |"))
            continue
        over = "" if x.get("within_budget", True) else " (over)"
        rows.append((x["test_acc"], f"| {x['name']} | {x['test_acc']:.2f} | {_fmt(x['best_test_acc'])} ({x['best_epoch']}) | "
                                    f"{x['epochs_run']} / {x['epochs_set']} | {_fmt(x['budget_s'], 'g')} / {_fmt(x['used_s'], '.0f')}{over} | "
                                    f"{_fmt(x['fitted_epochs'], '.1f')} | {_fmt(x['params'] and x['params'] / 1e6, '.1f')} | "
                                    f"{_fmt(x['images_per_s'], ',.0f')} |"))
    lines += [row for _, row in sorted(rows, key=lambda t: -t[0])]
    if missing:
        lines += ["", "Not finished: " + "; ".join(missing)]
    lines += ["", "One job after another, each alone on the device, each fitting its schedule to its budget; the final "
                  "test accuracy is the run's result. Seconds of budget, not the seed's 150 epochs."]
    return lines


def step_lines(r: dict) -> list[str]:
    st = r["step"]
    if not st:
        return ["(no step bench results)"]
    s = st.get("settings") or {}
    lines = [f"trainer.bench --parts step on {st['device']}, torch {st['torch_version']}: training images/s at batch "
             f"{s.get('batch')}, {s.get('steps')} steps; AMP = {s.get('amp_dtype')}; eager and AMP of every arch before any compile"
             + ("" if st["part_finished"] else "; **cut off: the rows below are what it measured**"), "",
             "| arch | eager fp32 | AMP | compiled AMP | compiled x | compile s | MFU | modes |", "|---|---|---|---|---|---|---|---|"]
    for arch, x in st["rows"].items():
        mfu = f"{100 * x['mfu']:.0f}%" if x.get("mfu") is not None else "-"
        done = "all" if x.get("complete") else ", ".join(x.get("modes_done") or []) or "none"
        if x.get("errors"):
            done += "; failed: " + ", ".join(x["errors"])
        lines.append(f"| {arch} | {_fmt(x.get('eager_fp32'), ',.0f')} | {_fmt(x.get('amp'), ',.0f')} | "
                     f"{_fmt(x.get('compiled_amp'), ',.0f')} | {_fmt(x.get('step_ratio_compiled_amp'), '.2f')} | "
                     f"{_fmt(x.get('compile_s'), '.1f')} | {mfu} | {done} |")
    return lines


def gpu_test_line(r: dict) -> str:
    g = r["gpu_tests"]
    if not g:
        return "gpu-marked tests: not run"
    line = f"gpu-marked tests: exit {g['exit_code']}, {g['summary_line'] or g['note'] or 'no pytest summary'}"
    return line + ("; " + "; ".join(g["failures"][:5]) if g["failures"] else "")


def summary(r: dict, p: dict) -> str:
    code = p.get("code") or {}
    sha = code.get("git_sha") or "unknown (no .git and no trainer/_stamp.json)"
    differing = code.get("files_differing_from_stamp")
    if code.get("stamp_git_sha") and differing:
        sha += f" (files differing from the stamp: {', '.join(differing[:10])})"
    unpacked = _get(p, "data", "unpacked") or {}
    pack = "data: CIFAR-10 from the kit's pack (the project's shared copy, itself JPEG-derived); unpacked: " + (
        "bit-identical to the packed source" if unpacked.get("exact") else
        f"{unpacked.get('images_differing')} images differ from the packed source" if unpacked else "no record")
    tar = r.get("tarball")
    text = ["# GPU check", "", verdict(r), "",
            f"- {device_line(r['preflight'])}", f"- {data_line(r['data'])}", f"- {gpu_test_line(r)}",
            f"- code: {sha}; command `{r['command']}`, started {r['started']}", f"- {pack}",
            "- files: results.json (every number), provenance.json, run.log" +
            (f", {tar['file']} ({tar['bytes'] / 2**20:.1f} MiB, {tar['files']} files"
             + (f"; left out: {len(tar['left_out'])}" if tar["left_out"] else "") + ")" if tar else ""),
            "", "## Speed profile", "", *speed_lines(r), "", "## Budget sweep", "", *sweep_lines(r),
            "", "## Step bench", "", *step_lines(r), "", "## Stages", "", *stage_lines(r), ""]
    return "\n".join(text)


# ---- provenance.json ---------------------------------------------------------------------------------


def code() -> dict:
    """The commit (from git, or from the stamp where the tree came without .git) and, with a stamp,
    the stamped files that differ here."""
    try:
        stamp = json.loads(provenance.STAMP.read_text())
    except (OSError, ValueError):
        stamp = None
    return {"git_sha": provenance.git_sha(), "stamp_git_sha": stamp and stamp["git_sha"],
            "files_differing_from_stamp": provenance.stamp_status(stamp) if stamp else None}


def software(preflight: dict | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "torchvision", "numpy", "numba", "llvmlite", "pillow", "opencv-python-headless", "ffcv", "submitit",
                 "pytorch-pfn-extras", "fastargs", "terminaltables", "assertpy", "pyyaml", "tqdm", "pytest", "wandb"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    smi = None
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        smi = q.stdout.strip() if q.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": sys.version.split()[0], "python_executable": sys.executable, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "nvidia_smi": smi, "preflight": preflight, "packages": versions}


def provenance_record(args: argparse.Namespace, r: dict) -> dict:
    kit = Path(args.kit)
    beton = _load(Path(args.data_dir) / "cifar10.json") if args.data_dir else None
    return {
        "what": "a run of jobs/gpu_check/run.sh",
        "command": args.command, "started": args.started,
        "finished": None if args.exit_code is None else r["updated"],
        "host": socket.gethostname(),
        "code": code(),
        "software": software(r["preflight"]),
        "wheels_sha256": {p.name: sha256(p) for p in sorted((kit / "wheels").glob("*.whl"))},
        "data": {
            "note": "CIFAR-10 from the check's pack: a transport re-encoding of the project's shared copy (itself "
                    "JPEG-derived from CIFAR-10, q75 4:2:0); see pack.fidelity and unpacked.exact for how close it is",
            "path": r["data"],
            "pack": _load(kit / "cifar10.pack.json"),
            "unpacked": _load(args.unpack_record),
            "prepared": {k: beton.get(k) for k in ("outputs", "counts", "created")} if isinstance(beton, dict) else beton,
        },
        "stages": r["stages"],
        "exit_code": args.exit_code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder that gets results.json, summary.md and provenance.json")
    parser.add_argument("--keep", type=Path, required=True, help="run.sh's folder of stage records and run folders")
    parser.add_argument("--command", default="")
    parser.add_argument("--started")
    parser.add_argument("--exit-code", type=int, help="the run's exit code, as far as it got")
    parser.add_argument("--final", action="store_true", help=f"also pack KEEP into OUT/{TARBALL}")
    parser.add_argument("--kit", default=".kit", help="the folder with wheels/ and cifar10.pack.json (default .kit)")
    parser.add_argument("--unpack-record", type=Path)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    r = collect(args)
    p = provenance_record(args, r)
    r["code"] = p["code"]
    write_text_atomic(args.out / "provenance.json", json.dumps(p, indent=1) + "\n")
    if args.final:
        r["tarball"] = pack_results(args.keep, args.out)
    write_text_atomic(args.out / "results.json", json.dumps(r, indent=1) + "\n")
    write_text_atomic(args.out / "summary.md", summary(r, p))


if __name__ == "__main__":
    main()
