"""summary.md for a GPU run kit run: stages, the sweep's results and the provenance, in one page.

    python jobs/gpu_kit/summarize.py --out OUT/summary.md --provenance OUT/provenance.json \
        [--bench OUT/bench.json] [--sweep SWEEP_DIR] [--report OUT/report.md]

Standard library only, and tolerant of anything missing: it runs last in run.sh, after whatever
failed, so the summary says what is there and what is not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: Path | None):
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        return []


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
             f"torchvision {pk.get('torchvision')}, numpy {pk.get('numpy')}, numba {pk.get('numba')}, ffcv {pk.get('ffcv')} (the kit's wheel), submitit {pk.get('submitit')}"]
    code = p.get("code")
    if code:
        match = "match" if code.get("code_matches_stamp") else "DO NOT match"
        lines.append(f"- code: commit {code.get('commit')}{' + uncommitted changes' if code.get('dirty_at_stamp') else ''} (stamped {code.get('stamped')}); "
                     f"the files here {match} the stamp's content hash {str(code.get('code_sha256_stamp'))[:16]}")
    else:
        lines.append("- code: no .kit/stamp.json: commit unknown (run jobs/gpu_kit/build.sh before carrying .kit)")
    data = p.get("data") or {}
    pack, unpacked, prepared = data.get("pack") or {}, data.get("unpacked") or {}, data.get("prepared") or {}
    fid = pack.get("fidelity") or {}
    if fid:
        packed = ("lossless: all {:,} images bit-identical".format(fid.get("images", 0)) if fid.get("lossless") else
                  f"mean abs error {fid.get('mean_abs_error')}, max {fid.get('max_abs_error')}, PSNR {fid.get('psnr_db')}")
        here = ("bit-identical to the packed source (CRC-32 and SHA-256 checked)" if unpacked.get("exact") else
                f"{unpacked.get('images_differing')} images differ from the packed source (decoder: {unpacked.get('decoder')})" if unpacked else "not unpacked")
        lines.append(f"- data: CIFAR-10 from the kit's pack ({pack.get('bytes', 0) / 2**20:.1f} MiB, sha256 {str(pack.get('sha256'))[:16]}), a transport "
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
    archs = record.get("archs") or sorted(p.name for p in sweep.iterdir() if (p / "config.yaml").exists())
    lines = [f"Sweep `{sweep.name}`, profile `{record.get('profile')}`, overrides: `{' '.join(record.get('overrides', []))}`", "",
             "| arch | best test acc % | final test acc % | best epoch | epochs run / set | stopped early | params M | training s | img/s, last epoch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missing = []
    results = []
    for arch in archs:
        s = _load(sweep / arch / "summary.json")
        m = _rows(sweep / arch / "metrics.jsonl")
        cfg_epochs = None
        try:
            import re

            text = (sweep / arch / "config.yaml").read_text()
            found = re.search(r"^train:\n(?:  .*\n)*?  epochs: (\d+)", text, re.M)
            cfg_epochs = int(found.group(1)) if found else None
        except OSError:
            pass
        if s is None:
            best = f"{max(r['test_acc'] for r in m):.2f} (unfinished)" if m else "-"
            missing.append(f"{arch} ({len(m)} epochs logged, no summary.json)")
            results.append((-1, f"| {arch} | {best} | - | - | {len(m)} / {cfg_epochs} | - | - | - | "
                                f"{m[-1]['images_per_s']:,.0f} |" if m else f"| {arch} | - | - | - | 0 / {cfg_epochs} | - | - | - | - |"))
            continue
        ips = f"{m[-1]['images_per_s']:,.0f}" if m else "-"
        results.append((s["best_test_acc"], f"| {arch} | {s['best_test_acc']:.2f} | {s['test_acc']:.2f} | {s['best_epoch']} | {s['epochs_run']} / {cfg_epochs} | "
                                            f"{'yes' if s.get('stopped_early') else 'no'} | {s['params'] / 1e6:.1f} | {s['wall_time_s']:.0f} | {ips} |"))
    lines += [row for _, row in sorted(results, key=lambda t: -t[0])]
    if missing:
        lines += ["", "Not finished: " + "; ".join(missing)]
    lines += ["", "All jobs ran at the same time on one device, so images/s are shares of it, not each network's speed "
                  "(bench.json has those); accuracies are of the short schedule above, cut by the time budget where "
                  "'stopped early' says yes — not comparable with the seed's 150-epoch table."]
    return lines


def bench_lines(bench: dict | None) -> list[str]:
    if bench is None:
        return ["bench.json: missing (see run.log)"]
    lines = [f"bench.json ({bench.get('mode', '?')} mode) holds: " + ", ".join(f"`{k}`" for k in bench if k not in ("parts", "commands"))]
    for part, info in (bench.get("parts") or {}).items():
        lines.append(f"- part `{part}`: {info.get('result')} (exit {info.get('exit_code')}, {info.get('seconds')} s)")
    acc = bench.get("time_to_accuracy") or {}
    if acc.get("runs"):
        mean = acc.get("mean_time_to_target_s")
        lines.append(f"- time to {acc.get('target_acc')}% ({acc.get('config')}): "
                     + (f"{mean:.1f} s" if mean is not None else "not reached") + f", final accuracy {acc.get('mean_final_test_acc'):.2f}%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--provenance", type=Path)
    parser.add_argument("--bench", type=Path)
    parser.add_argument("--sweep", type=Path)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    p = _load(args.provenance)
    failed = [s["stage"] for s in (p or {}).get("stages", []) if s["exit_code"] != 0]
    code = (p or {}).get("exit_code")
    verdict = (f"run.sh exit code {code}; " if code is not None else "") + (
        "every stage exited 0" if p and not failed else f"stages that failed or timed out: {', '.join(failed) or 'none recorded'}")
    text = ["# GPU run kit", "", verdict, "", "## Provenance", "", *provenance_lines(p), "", "## Stages", "", *stage_table(p),
            "", "## Sweep", "", *sweep_table(args.sweep), "", "## Bench", "", *bench_lines(_load(args.bench)), "", "## Report", "",
            "report.md: the sweep's report (jobs/report.py)" if args.report and args.report.is_file() else "report.md: none was written", ""]
    args.out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
