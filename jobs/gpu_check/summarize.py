"""The GPU check's record of a run: provenance.json (what code, data, software and device it used)
and summary.md (stages, the step bench, the speed runs, the sweep's results, provenance in brief),
both in OUT.

    python jobs/gpu_check/summarize.py OUT --command CMD --started T [--exit-code N] --stages TSV \
        [--kit .kit] [--unpack-record F] [--data-dir D] [--sweep SWEEP_DIR]

run.sh calls it after each part (without --exit-code: the run is still going) and last, after
whatever failed, so it tolerates anything missing and says what is there and what is not. It needs
the standard library and this repository on the path; torch is asked in a child process, so a
broken install is reported, not fatal. The parts are read where run.sh leaves them: OUT/step/ARCH.json
(trainer.bench), OUT/speed/sN/ and the sweep folder (run folders: summary.json, metrics.jsonl,
config.yaml), OUT/report.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

from trainer import provenance
from trainer.files import write_text_atomic
from trainer.run_files import CONFIG, SUMMARY, read_metrics

def _load(path: Path | str | None):
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def _metrics(run: Path) -> list[dict]:
    try:
        return read_metrics(run)
    except (OSError, ValueError):
        return []


def _epochs_set(run: Path) -> int | None:
    try:
        return yaml.safe_load((run / CONFIG).read_text())["train"]["epochs"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


_TORCH_PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
print(json.dumps(info))
"""


def software() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "torchvision", "numpy", "numba", "llvmlite", "pillow", "opencv-python-headless", "opencv-python",
                 "ffcv", "submitit", "pytorch-pfn-extras", "fastargs", "terminaltables", "assertpy", "pyyaml", "tqdm", "wandb"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    r = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=120)
    torch_info = json.loads(r.stdout) if r.returncode == 0 else {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    smi = None
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        smi = q.stdout.strip() if q.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": sys.version.split()[0], "python_executable": sys.executable, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "nvidia_smi": smi, "torch_probe": torch_info, "packages": versions}


def provenance_lines(p: dict | None) -> list[str]:
    if not p:
        return ["- provenance.json: missing"]
    sw = p.get("software") or {}
    probe = sw.get("torch_probe") or {}
    pk = sw.get("packages") or {}
    device = probe.get("device") or sw.get("nvidia_smi") or ("CPU (" + str(sw.get("cpu_count")) + " cores)")
    lines = [f"- command: `{p.get('command')}`, started {p.get('started')}, finished {p.get('finished')} on {p.get('host')}",
             f"- device: {device}" + (f" ({probe.get('memory_gib')} GiB, capability {probe.get('capability')}; nvidia-smi: {sw.get('nvidia_smi')})" if probe.get("device") else ""),
             f"- software: Python {sw.get('python')}, torch {probe.get('torch', pk.get('torch'))} (CUDA {probe.get('cuda')}, cuDNN {probe.get('cudnn')}), "
             f"torchvision {pk.get('torchvision')}, numpy {pk.get('numpy')}, numba {pk.get('numba')}, ffcv {pk.get('ffcv')} (built by jobs/offline/build.sh), submitit {pk.get('submitit')}"]
    code = p.get("code") or {}
    if code.get("git_sha"):
        differing = code.get("files_differing_from_stamp")
        lines.append(f"- code: {code['git_sha']}" + (f" (stamped {code['stamp_git_sha']}; files differing from the stamp: "
                                                     f"{', '.join(differing) or 'none'})" if code.get("stamp_git_sha") else ""))
    else:
        lines.append("- code: unknown: no .git and no trainer/_stamp.json (run jobs/gpu_check/build.sh and carry the stamp)")
    data = p.get("data") or {}
    pack, unpacked, prepared = data.get("pack") or {}, data.get("unpacked") or {}, data.get("prepared") or {}
    fid = pack.get("fidelity") or {}
    if fid:
        packed = ("lossless: all {:,} images bit-identical".format(fid.get("images", 0)) if fid.get("lossless") else
                  f"mean abs error {fid.get('mean_abs_error')}, max {fid.get('max_abs_error')}, PSNR {fid.get('psnr_db')}")
        here = ("bit-identical to the packed source (CRC-32 and SHA-256 checked)" if unpacked.get("exact") else
                f"{unpacked.get('images_differing')} images differ from the packed source (decoder: {unpacked.get('decoder')})" if unpacked else "not unpacked")
        lines.append(f"- data: CIFAR-10 from the check's pack ({pack.get('bytes', 0) / 2**20:.1f} MiB, sha256 {str(pack.get('sha256'))[:16]}), a transport "
                     f"re-encoding (JPEG q75 4:2:0 + corrections) of the project's shared copy, which is itself JPEG-derived from CIFAR-10 "
                     f"(mean abs error 5.81 vs the original on 4,000 images). Pack vs shared copy, measured at packing: {packed}. Unpacked here: {here}.")
    else:
        lines.append("- data: no pack record")
    outputs = prepared.get("outputs") if isinstance(prepared, dict) else None
    if outputs:
        lines.append("- .beton: " + ", ".join(f"{k} sha256 {v.get('sha256', '')[:16]}" for k, v in outputs.items()))
    return lines


def stage_table(p: dict | None) -> list[str]:
    stages = (p or {}).get("stages") or []
    if not stages:
        return ["(no stages recorded)"]
    lines = ["| stage | exit | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['stage']} | {s['exit_code']} | {s['seconds']} | {s.get('note', '')} |" for s in stages]
    lines.append(f"| **total** | | {sum(s['seconds'] for s in stages)} | |")
    return lines


def _budget_cells(s: dict) -> str:
    b = s.get("budget")
    if not b:
        return "- | -"
    return f"{b['budget_s']:g} / {b['used_s']:.0f}{'' if b.get('within_budget') else ' (over)'} | {b['fitted_epochs']:.1f}"


def sweep_table(sweep: Path | None) -> list[str]:
    if not sweep or not sweep.is_dir():
        return ["(no sweep folder)"]
    record = _load(sweep / "sweep.json") or {}
    archs = [r.get("name", r.get("arch")) for r in record.get("runs", [])] or record.get("archs") or []
    archs = list(dict.fromkeys([*archs, *sorted(p.name for p in sweep.iterdir() if (p / CONFIG).exists())]))
    lines = [f"Sweep `{record.get('sweep', sweep.name)}`, profile `{record.get('profile')}`, overrides: "
             f"`{' '.join(record.get('overrides', []))}`", "",
             "| arch | final test acc % | best test acc % | best epoch | epochs run / set | budget s / used s | fitted epochs "
             "| params M | training s | img/s, last epoch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missing = []
    results = []
    for arch in archs:
        run = sweep / arch
        s = _load(run / SUMMARY)
        m = _metrics(run)
        epochs = _epochs_set(run)
        ips = f"{m[-1]['images_per_s']:,.0f}" if m else "-"
        if s is None:
            last = f"{m[-1]['test_acc']:.2f} (unfinished)" if m else "-"
            missing.append(f"{arch} ({len(m)} epochs logged, no {SUMMARY})" if run.is_dir() else f"{arch} (not started)")
            results.append((-1, f"| {arch} | {last} | - | - | {len(m)} / {epochs} | - | - | - | - | {ips} |"))
            continue
        results.append((s["test_acc"], f"| {arch} | {s['test_acc']:.2f} | {s['best_test_acc']:.2f} | {s['best_epoch']} | "
                                       f"{s['epochs_run']} / {epochs} | {_budget_cells(s)} | "
                                       f"{s['params'] / 1e6:.1f} | {s['wall_time_s']:.0f} | {ips} |"))
    lines += [row for _, row in sorted(results, key=lambda t: -t[0])]
    if missing:
        lines += ["", "Not finished: " + "; ".join(missing)]
    lines += ["", "Each job had the device to itself (one after another), each fitted its schedule to its "
                  "train.budget_s: the final test accuracy is the run's result (no selection on the test set); the "
                  "best is over the epochs evaluated. A budget of seconds, not the seed's 150 epochs: not comparable "
                  "with the seed's table."]
    return lines


def step_table(folder: Path) -> list[str]:
    """OUT/step/ARCH.json, one trainer.bench step part per architecture."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return ["(no step bench results)"]
    first = _load(files[0]) or {}
    settings = first.get("step_settings") or {}
    lines = [f"trainer.bench --parts step on {first.get('device')}, torch {first.get('torch_version')}: training images/s at "
             f"batch {settings.get('batch')}, the median of {settings.get('steps')} steps; AMP = {settings.get('amp_dtype')} "
             "autocast; ratios to eager fp32", "",
             "| arch | eager fp32 | AMP | compiled AMP | compiled x | compile s | MFU |", "| --- | --- | --- | --- | --- | --- | --- |"]
    unfinished = []
    for path in files:
        data = _load(path) or {}
        rows = data.get("step") or {}
        if "step" not in (data.get("parts_done") or []) or not rows:
            unfinished.append(path.stem)
            continue
        for arch, x in rows.items():
            mfu = f"{100 * x['mfu']:.0f}%" if x.get("mfu") is not None else "-"
            lines.append(f"| {arch} | {x['eager_fp32']:,.0f} | {x['amp']:,.0f} | {x['compiled_amp']:,.0f} | "
                         f"{x['step_ratio_compiled_amp']:.2f}x | {x['compile_s']:.1f} | {mfu} |")
    if unfinished:
        lines += ["", "Started but not finished (time limit or failure; see run.log): " + ", ".join(unfinished)]
    return lines


def speed_table(folder: Path, target: float = 94.0) -> list[str]:
    """OUT/speed/sN/: the speed profile's runs, one per seed."""
    runs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name) if folder.is_dir() else []
    if not runs:
        return ["(no speed runs)"]
    lines = [f"jobs/configs/speed.yaml, one run per seed; time to {target}% counts training, evaluation and compiling", "",
             "| seed | final test acc % | epochs | training s | time to target s |", "| --- | --- | --- | --- | --- |"]
    finals = []
    for run in runs:
        s, m = _load(run / SUMMARY), _metrics(run)
        hit = next((r for r in m if r["test_acc"] >= target), None)
        to_target = f"{hit['elapsed_s']:.1f} (epoch {hit['epoch']})" if hit else "not reached"
        if s is None:
            lines.append(f"| {run.name} | unfinished ({len(m)} epochs logged) | {len(m)} | - | {to_target} |")
            continue
        finals.append(s["test_acc"])
        lines.append(f"| {run.name} | {s['test_acc']:.2f} | {s['epochs_run']} | {s['wall_time_s']:.1f} | {to_target} |")
    if finals:
        lines += ["", f"Mean final test accuracy over {len(finals)} finished run(s): {sum(finals) / len(finals):.2f}%"]
    return lines


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def code() -> dict:
    """The commit (from git, or from the stamp where the tree came without .git) and, with a stamp,
    the stamped files that differ here."""
    try:
        stamp = json.loads(provenance.STAMP.read_text())
    except (OSError, ValueError):
        stamp = None
    return {"git_sha": provenance.git_sha(), "stamp_git_sha": stamp and stamp["git_sha"],
            "files_differing_from_stamp": provenance.stamp_status(stamp) if stamp else None}


def read_stages(path: Path | None) -> list[dict]:
    stages = []
    if path and path.is_file():
        for line in path.read_text().splitlines():
            name, rc, seconds, *note = line.split("\t")
            stages.append({"stage": name, "exit_code": int(rc), "seconds": int(seconds), "note": note[0] if note else ""})
    return stages


def record(args: argparse.Namespace) -> dict:
    kit = Path(args.kit)
    wheels = {p.name: _sha256(p) for p in sorted((kit / "wheels").glob("*.whl"))}
    beton = _load(Path(args.data_dir) / "cifar10.json") if args.data_dir else None
    return {
        "what": "a run of jobs/gpu_check/run.sh",
        "command": args.command,
        "started": args.started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "code": code(),
        "software": software(),
        "wheels_sha256": wheels,
        "data": {
            "note": "CIFAR-10 from the check's pack: a transport re-encoding of the project's shared copy (itself "
                    "JPEG-derived from CIFAR-10, q75 4:2:0); see pack.fidelity and unpacked.exact for how close it is",
            "pack": _load(kit / "cifar10.pack.json"),
            "unpacked": _load(args.unpack_record),
            "prepared": {k: beton.get(k) for k in ("outputs", "counts", "created")} if isinstance(beton, dict) else beton,
        },
        "stages": read_stages(args.stages),
        "exit_code": args.exit_code,
    }


def summary(p: dict, args: argparse.Namespace, out: Path) -> str:
    failed = [s["stage"] for s in p["stages"] if s["exit_code"] != 0]
    code_ = p.get("exit_code")
    verdict = (f"run.sh exit code {code_}; " if code_ is not None else "run.sh still running (a snapshot after a part); ") + (
        "every stage exited 0" if p["stages"] and not failed else f"stages that failed or timed out: {', '.join(failed) or 'none recorded'}")
    report = out / "report.md"
    text = ["# GPU check", "", verdict, "", "## Provenance", "", *provenance_lines(p), "", "## Stages", "", *stage_table(p),
            "", "## Step bench", "", *step_table(out / "step"), "", "## Speed profile", "", *speed_table(out / "speed"),
            "", "## Budget sweep", "", *sweep_table(args.sweep),
            "", "## Report", "", "report.md: the sweep's report (jobs/report.py)" if report.is_file() else "report.md: none was written", ""]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder that gets provenance.json and summary.md")
    parser.add_argument("--command", default="")
    parser.add_argument("--started")
    parser.add_argument("--exit-code", type=int, help="the run's exit code, as far as it got")
    parser.add_argument("--stages", type=Path, help="a TSV of stage, exit code, seconds[, note]")
    parser.add_argument("--kit", default=".kit", help="the folder with wheels/ and cifar10.pack.json (default .kit)")
    parser.add_argument("--unpack-record", type=Path)
    parser.add_argument("--data-dir")
    parser.add_argument("--sweep", type=Path)
    args = parser.parse_args()
    p = record(args)
    write_text_atomic(args.out / "provenance.json", json.dumps(p, indent=1) + "\n")
    write_text_atomic(args.out / "summary.md", summary(p, args, args.out))


if __name__ == "__main__":
    main()
