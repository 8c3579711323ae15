"""Copies a finished run's record into results/: what it measured and how it was produced.

    python jobs/record_result.py RUN_DIR results/NAME

Writes results/NAME/{summary.json, metrics.jsonl, config.yaml} from the run folder and a README.md
with the command, commit, device, data and the per-epoch accuracy curve. Refuses an unfinished run.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if not (args.run_dir / "summary.json").is_file():
        sys.exit(f"error: {args.run_dir}/summary.json not found: the run has not finished")
    s = json.loads((args.run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "metrics.jsonl", "config.yaml"):
        shutil.copy(args.run_dir / name, args.out / name)
    curve = "\n".join(
        f"| {m['epoch']} | {m['train_acc']:.2f} | {m['test_acc']:.2f} | {m['epoch_s']:.1f} | {m['elapsed_s']:.0f} |" for m in rows
    )
    (args.out / "README.md").write_text(f"""# {args.out.name}: {s['arch']}, best test accuracy {s['best_test_acc']:.2f}%

- command: `{s.get('command')}`
- commit: `{s['git_sha']}`
- device: {s['device']}, world size {s['world_size']}; torch {s['torch_version']}
- data: `{s['data']['source_dir']}` converted to `{s['data']['dir']}` (train.beton sha256 `{s['data']['train_sha256']}`)
- finished: {s['finished_at']}

| best test acc % | best epoch | final test acc % | train acc % (best epoch) | gap | epochs | wall time s | params |
| --- | --- | --- | --- | --- | --- | --- | --- |
| {s['best_test_acc']:.2f} | {s['best_epoch']} | {s['test_acc']:.2f} | {s['train_acc']:.2f} | {s['gap']:.2f} | {s['epochs_run']} | {s['wall_time_s']:.0f} | {s['params']:,} |

Per epoch (wall time counts training and evaluation, not start-up):

| epoch | train acc % | test acc % | epoch s | elapsed s |
| --- | --- | --- | --- | --- |
{curve}

The files beside this one are the run's own `summary.json`, `metrics.jsonl` and `config.yaml`.
""")
    print(f"recorded {args.run_dir} in {args.out}")


if __name__ == "__main__":
    main()
