"""Provenance for the GPU run kit: what code, data, software and device a kit run used.

    python3 jobs/gpu_kit/provenance.py stamp [--out .kit/stamp.json]       # here, before the run
    python3 jobs/gpu_kit/provenance.py record --out FILE [options]         # there, after the run
    python3 jobs/gpu_kit/provenance.py travel-bytes                        # size of the tree that travels

The device machine gets a copy of the working tree without .git, so the trainer's own git_sha()
is null there. `stamp` (build.sh runs it) records here the commit, whether the tree is dirty, and
a SHA-256 over the content of every file that travels (tracked and untracked-not-ignored); `record`
recomputes that hash over the same files on the other side (code_matches_stamp), and adds the
device, the software versions, the wheels, the data pack's fidelity record, the unpacking's
verification and the prepared .beton hashes, the command and the stages' exit codes and times.
Standard library only (torch is asked in a child process, so a broken install is reported, not fatal).
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

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def travelling_files() -> list[str]:
    """Tracked and untracked-not-ignored files that exist: what the device tool copies (minus carried paths)."""
    out = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if out is None:
        raise SystemExit("error: not a git checkout (git ls-files failed)")
    return sorted({p for p in out.split("\0") if p and (REPO / p).is_file() and not p.startswith(".kit/")})


def code_hash(paths: list[str]) -> tuple[str, list[str]]:
    """SHA-256 over (path, content hash) of the paths that exist; and the ones missing."""
    h, missing = hashlib.sha256(), []
    for p in sorted(paths):
        f = REPO / p
        if not f.is_file():
            missing.append(p)
            continue
        h.update(p.encode() + b"\0" + hashlib.sha256(f.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest(), missing


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stamp(out: Path) -> dict:
    files = travelling_files()
    digest, _ = code_hash(files)
    sha = (_git("rev-parse", "HEAD") or "").strip() or None
    status = [ln for ln in (_git("status", "--porcelain") or "").splitlines() if ln.strip() and not ln[3:].startswith(".kit/")]
    record = {"commit": sha, "dirty": bool(status), "status": status, "code_sha256": digest, "files": files,
              "created": _now(), "host": socket.gethostname()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    state = "dirty: " + ", ".join(s[3:] for s in status[:6]) + (" ..." if len(status) > 6 else "") if status else "clean"
    print(f"stamp: commit {sha[:12] if sha else None} ({state}), code {digest[:12]} over {len(files)} files -> {out}")
    return record


def _read_json(path: Path | None) -> object:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return {"unreadable": str(path), "error": f"{type(e).__name__}: {e}"}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()



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


def record(args: argparse.Namespace) -> dict:
    st = _read_json(args.stamp) if args.stamp and Path(args.stamp).is_file() else None
    code = None
    if isinstance(st, dict) and "files" in st:
        digest, missing = code_hash(st["files"])
        code = {"commit": st.get("commit"), "dirty_at_stamp": st.get("dirty"), "status_at_stamp": st.get("status"),
                "stamped": st.get("created"), "code_sha256_stamp": st.get("code_sha256"), "code_sha256_here": digest,
                "code_matches_stamp": digest == st.get("code_sha256") and not missing, "files_missing_here": missing}
    wheels = {}
    if args.wheels and Path(args.wheels).is_dir():
        wheels = {p.name: _sha256(p) for p in sorted(Path(args.wheels).glob("*.whl"))}
    stages = []
    if args.stages and Path(args.stages).is_file():
        for line in Path(args.stages).read_text().splitlines():
            name, rc, seconds, *note = line.split("\t")
            stages.append({"stage": name, "exit_code": int(rc), "seconds": int(seconds), "note": note[0] if note else ""})
    beton = _read_json(Path(args.data_dir) / "cifar10.json") if args.data_dir else None
    result = {
        "what": "a run of jobs/gpu_kit/run.sh (the GPU run kit)",
        "command": args.command,
        "started": args.started,
        "finished": _now(),
        "host": socket.gethostname(),
        "code": code,
        "software": software(),
        "wheels_sha256": wheels,
        "data": {
            "note": "CIFAR-10 from the kit's pack: a transport re-encoding of the project's shared copy (itself "
                    "JPEG-derived from CIFAR-10, q75 4:2:0); see pack.fidelity and unpacked.exact for how close it is",
            "pack": _read_json(args.pack_record),
            "unpacked": _read_json(args.unpack_record),
            "prepared": {k: beton.get(k) for k in ("outputs", "counts", "created")} if isinstance(beton, dict) else beton,
        },
        "stages": stages,
        "exit_code": args.exit_code,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command_name", required=True)
    s = sub.add_parser("stamp", help="record the commit and the code's hash (here)")
    s.add_argument("--out", type=Path, default=REPO / ".kit/stamp.json")
    r = sub.add_parser("record", help="write a run's provenance (there)")
    r.add_argument("--out", required=True)
    r.add_argument("--stamp", default=str(REPO / ".kit/stamp.json"))
    r.add_argument("--wheels", default=str(REPO / ".kit/wheels"))
    r.add_argument("--pack-record", default=str(REPO / ".kit/cifar10.pack.json"))
    r.add_argument("--unpack-record")
    r.add_argument("--data-dir")
    r.add_argument("--stages", help="a TSV of stage, exit code, seconds[, note]")
    r.add_argument("--command", default="")
    r.add_argument("--started")
    r.add_argument("--exit-code", type=int, help="the run's exit code, as far as it got")
    sub.add_parser("travel-bytes", help="bytes of the working tree the device tool copies (without carried paths)")
    args = parser.parse_args()
    if args.command_name == "stamp":
        stamp(args.out)
    elif args.command_name == "record":
        record(args)
    else:
        print(sum((REPO / p).stat().st_size for p in travelling_files()))


if __name__ == "__main__":
    main()
