"""The GPU check's record of a run: provenance.json (what code, data, software and device it used)
and summary.md (stages, the sweep's results, the bench, provenance in brief), both in OUT.

    python jobs/gpu_check/summarize.py OUT --command CMD --started T --exit-code N --stages TSV \
        [--kit .kit] [--unpack-record F] [--data-dir D] [--sweep SWEEP_DIR]

It runs last in run.sh, after whatever failed, so it tolerates anything missing and says what is
there and what is not. It needs the standard library and this repository on the path; torch is
asked in a child process, so a broken install is reported, not fatal. OUT/bench.json and
OUT/report.md are read where the run left them.
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


def sweep_table(sweep: Path | None) -> list[str]:
    if not sweep or not sweep.is_dir():
        return ["(no sweep folder)"]
    record = _load(sweep / "sweep.json") or {}
    archs = record.get("archs") or sorted(p.name for p in sweep.iterdir() if (p / CONFIG).exists())
    lines = [f"Sweep `{sweep.name}`, profile `{record.get('profile')}`, overrides: `{' '.join(record.get('overrides', []))}`", "",
             "| arch | best test acc % | final test acc % | best epoch | epochs run / set | stopped early | params M | training s | img/s, last epoch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missing = []
    results = []
    for arch in archs:
        run = sweep / arch
        s = _load(run / SUMMARY)
        m = _metrics(run)
        epochs = _epochs_set(run)
        ips = f"{m[-1]['images_per_s']:,.0f}" if m else "-"
        if s is None:
            best = f"{max(r['test_acc'] for r in m):.2f} (unfinished)" if m else "-"
            missing.append(f"{arch} ({len(m)} epochs logged, no {SUMMARY})")
            results.append((-1, f"| {arch} | {best} | - | - | {len(m)} / {epochs} | - | - | - | {ips} |"))
            continue
        results.append((s["best_test_acc"], f"| {arch} | {s['best_test_acc']:.2f} | {s['test_acc']:.2f} | {s['best_epoch']} | "
                                            f"{s['epochs_run']} / {epochs} | {'yes' if s.get('stopped_early') else 'no'} | "
                                            f"{s['params'] / 1e6:.1f} | {s['wall_time_s']:.0f} | {ips} |"))
    lines += [row for _, row in sorted(results, key=lambda t: -t[0])]
    if missing:
        lines += ["", "Not finished: " + "; ".join(missing)]
    lines += ["", "All jobs ran at the same time on one device, so images/s are shares of it, not each network's speed "
                  "(bench.json has those); accuracies are of the short schedule above, cut by the time budget where "
                  "'stopped early' says yes — not comparable with the seed's 150-epoch table."]
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


def bench_lines(bench: dict | None, stages: list[dict]) -> list[str]:
    if bench is None:
        return ["bench.json: missing (see run.log)"]
    stage = next((s for s in stages if s["stage"] == "bench"), {})
    state = "complete" if bench.get("complete") else (
        f"incomplete: the bench stage ended with exit {stage.get('exit_code')} {stage.get('note', '')}".rstrip()
        + "; the parts listed are the ones that finished")
    lines = [f"bench.json ({bench.get('mode', '?')} mode, {state}): parts {', '.join(bench.get('parts_done') or []) or 'none'}"]
    for key in ("loader_ratio_ffcv", "loader_ratio_resident"):
        if key in bench:
            lines.append(f"- {key}: {bench[key]:.2f}x")
    acc = bench.get("time_to_accuracy") or {}
    if acc.get("runs"):
        mean = acc.get("mean_time_to_target_s")
        lines.append(f"- time to {acc.get('target_acc')}% ({acc.get('config')}): "
                     + (f"{mean:.1f} s" if mean is not None else "not reached") + f", final accuracy {acc.get('mean_final_test_acc'):.2f}%")
    return lines


def summary(p: dict, args: argparse.Namespace, out: Path) -> str:
    failed = [s["stage"] for s in p["stages"] if s["exit_code"] != 0]
    code_ = p.get("exit_code")
    verdict = (f"run.sh exit code {code_}; " if code_ is not None else "") + (
        "every stage exited 0" if p["stages"] and not failed else f"stages that failed or timed out: {', '.join(failed) or 'none recorded'}")
    report = out / "report.md"
    text = ["# GPU check", "", verdict, "", "## Provenance", "", *provenance_lines(p), "", "## Stages", "", *stage_table(p),
            "", "## Sweep", "", *sweep_table(args.sweep), "", "## Bench", "", *bench_lines(_load(out / "bench.json"), p["stages"]),
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
