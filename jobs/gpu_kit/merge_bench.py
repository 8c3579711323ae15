"""Merge `python -m trainer.bench --parts P --json F` results, one file per part, into one bench.json.

    python jobs/gpu_kit/merge_bench.py --out OUT/bench.json --stages STAGES.tsv PART_JSON...

run.sh runs the bench one part per process (loader, then accuracy, then step), each under its own
time limit, so that a part that runs out of time costs only its own numbers: trainer.bench writes
its JSON once, at the end. The parts' measured keys are disjoint, so the merged file has the keys
a single full run would have (loader, loader_ratio_*, step_settings, step, time_to_accuracy, and
the provenance fields of the first part), plus `parts`: per part its command, wall time, exit code
and whether it ran out of time — a part that left no file is listed there with why.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PROVENANCE = ("git_sha", "device", "torch_version", "data", "date", "mode", "threads", "load_average_at_start")


def merge(files: list[Path], stages: dict[str, dict]) -> dict:
    merged: dict = {"merged_by": "jobs/gpu_kit/merge_bench.py: one trainer.bench process per part (see parts)",
                    "commands": [], "parts": {}, "wall_s": 0.0}
    for path in files:
        part = path.stem.removeprefix("bench-")
        info = dict(stages.get(f"bench-{part}", {}))
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            merged["parts"][part] = {**info, "result": f"no results ({type(e).__name__})"}
            continue
        for key in PROVENANCE:
            merged.setdefault(key, data.get(key))
        for key, value in data.items():
            if key not in PROVENANCE and key not in ("command", "wall_s"):
                merged[key] = value
        merged["commands"].append(data.get("command"))
        merged["wall_s"] += data.get("wall_s") or 0.0
        merged["parts"][part] = {**info, "result": "ok", "wall_s": data.get("wall_s")}
    for name, info in stages.items():  # parts that ran but left no file (killed, failed)
        part = name.removeprefix("bench-")
        if name.startswith("bench-") and part not in merged["parts"]:
            merged["parts"][part] = {**info, "result": "no results: " + (info.get("note") or f"exit code {info.get('exit_code')}")}
    return merged


def read_stages(path: Path | None) -> dict[str, dict]:
    stages = {}
    if path and path.is_file():
        for line in path.read_text().splitlines():
            name, rc, seconds, *note = line.split("\t")
            stages[name] = {"exit_code": int(rc), "seconds": int(seconds), "note": note[0] if note else ""}
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", type=Path, help="run.sh's stage record (exit codes, seconds)")
    parser.add_argument("parts", type=Path, nargs="*", help="bench-<part>.json files")
    args = parser.parse_args()
    merged = merge([p for p in args.parts if p.is_file()], read_stages(args.stages))
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"bench parts merged into {args.out}: " + ", ".join(f"{k} ({v['result']})" for k, v in merged["parts"].items()))


if __name__ == "__main__":
    main()
