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

from trainer.data.checks import describe_record
from trainer.run_files import read_metrics


def _cell(row: dict, key: str, spec: str) -> str:
    """`key` of a metrics line, or a dash where the line has none: an epoch train.eval_every did not
    evaluate has no test figures, a run's end evaluated on its own no training figures."""
    return format(row[key], spec) if key in row else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if not (args.run_dir / "summary.json").is_file():
        sys.exit(f"error: {args.run_dir}/summary.json not found: the run has not finished")
    summary = json.loads((args.run_dir / "summary.json").read_text())
    rows = read_metrics(args.run_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "metrics.jsonl", "config.yaml"):
        shutil.copy(args.run_dir / name, args.out / name)
    curve = "\n".join(
        f"| {m['epoch']} | {_cell(m, 'train_acc', '.2f')} | {_cell(m, 'test_acc', '.2f')} | {m['epoch_s']:.1f} "
        f"| {m['elapsed_s']:.0f} |" for m in rows
    )
    (args.out / "README.md").write_text(f"""# {args.out.name}: {summary['arch']}, best test accuracy {summary['best_test_acc']:.2f}%

- command: `{summary.get('command')}`
- commit: `{summary['git_sha']}`
- device: {summary['device']}, world size {summary['world_size']}; torch {summary['torch_version']}
- data: {describe_record(summary['data'])}
- finished: {summary['finished_at']}

| best test acc % | best epoch | final test acc % | train acc % (best epoch) | gap | epochs | wall time s | params |
| --- | --- | --- | --- | --- | --- | --- | --- |
| {summary['best_test_acc']:.2f} | {summary['best_epoch']} | {summary['test_acc']:.2f} | {summary['train_acc']:.2f} | {summary['gap']:.2f} | {summary['epochs_run']} | {summary['wall_time_s']:.0f} | {summary['params']:,} |

Per epoch (wall time counts training and evaluation, not start-up; "-": not evaluated that epoch):

| epoch | train acc % | test acc % | epoch s | elapsed s |
| --- | --- | --- | --- | --- |
{curve}

The files beside this one are the run's own `summary.json`, `metrics.jsonl` and `config.yaml`.
""")
    print(f"recorded {args.run_dir} in {args.out}")


if __name__ == "__main__":
    main()
