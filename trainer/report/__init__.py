"""The sweep report behind `python jobs/report.py runs/<sweep>`: the comparison with the seed's table.

    python jobs/report.py runs/<sweep> [--no-deploy] [--ensemble a,b | --no-ensemble] [--wandb-mode MODE]
    python jobs/report.py runs/<sweep> --sync      # upload every offline W&B run of the sweep

Reads each run's summary.json and metrics.jsonl (runs) and writes into the sweep folder:

- report.md and report.csv (table): one row per architecture with the seed's columns (best test
  accuracy, params, best epoch, training accuracy, gap), the seed's published ("paper") accuracies
  beside ours with the difference, GPU- or CPU-seconds to the best epoch and training images/s, and
  flags (flags) on runs that saw too few images, ended near chance or overran their time budget;
  the data and device named above;
- deployment figures measured from each checkpoints/best.pt on the device at hand by
  trainer.bench.deploy: batch-1 latency, batch-256 throughput, peak memory and the size of the
  weights file (--no-deploy skips them);
- the accuracy of an ensemble that averages the softmax outputs of the best checkpoints over the
  test set (default: every finished run), beside the best single model (ensemble);
- plots/ (plots): accuracy vs parameters (the seed's points too), test accuracy by epoch, accuracy
  vs GPU-seconds, training loss by step (steps.jsonl);
- a W&B run of job type `report` in the sweep's group holding the tables, interactive charts built
  from the table (accuracy vs parameters and vs compute, the curves) and the plots (wandb_run).

With seeds (launch.py --seeds N) or a grid, each run is one row as above, and the runs of an
architecture at a grid point are a group (stats): mean ± std (n) and a 95% confidence interval of
the mean (Student's t) per group, in report.md and on each of the group's rows of report.csv, a
sentence naming the architectures whose intervals overlap, error bars in the plots, and the grid's
points with each architecture's best one (by validation accuracy when the summaries have it, else
by best test accuracy, which the report then says).

It also works on a folder of run folders without sweep.json (the runs are then the subfolders that
hold a config.yaml). Runs that are unfinished, not started or whose summary is corrupt are listed
as such. `python jobs/launch.py --wait` ends with this report.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer import UserError, cli, sweep_file
from trainer.files import write_text_atomic

# The report's modules import torch (and matplotlib, wandb where used): seconds on a small CPU. They
# are imported where the report is made, so that `python jobs/report.py` refuses a mistaken command
# line or folder at once (issue #21; tests/test_entry_points.py checks it).
if TYPE_CHECKING:
    import torch

    from trainer.bench.deploy import DeployBudget
    from trainer.report.ensemble import EnsembleResult
    from trainer.report.runs import Run


@dataclass
class Report:
    name: str
    folder: Path
    runs: list[Run]
    rows: list[dict]
    ensemble: EnsembleResult | None
    plots: list[Path]
    markdown: str


def _choose_members(runs: list[Run], names: list[str] | None) -> list[Run]:
    usable = [r for r in runs if r.finished and r.config is not None]
    if names is None:
        return usable
    by_name = {r.name: r for r in usable}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UserError(f"--ensemble: {', '.join(unknown)}: not a finished run here (finished: "
                        f"{', '.join(by_name) or 'none'})")
    return [by_name[n] for n in dict.fromkeys(names)]


def measure_run(run: Run, device: torch.device, budget: DeployBudget | None = None) -> dict:
    """The run's best.pt measured as it would be served: its data.dtype in, its autocast on."""
    from trainer.bench.deploy import DeployBudget, measure
    from trainer.data.common import DTYPES
    from trainer.device import amp_dtype
    from trainer.report.runs import load_best

    net = load_best(run, device)
    return measure(net, device, DTYPES[run.config.data.dtype], amp_dtype(device, run.config.train.amp),
                   DeployBudget() if budget is None else budget)


def make_report(folder: Path, deploy: bool = True, ensemble: list[str] | None = None, use_ensemble: bool = True,
                wandb_mode: str | None = None, out: Callable[[str], None] = print,
                budget: DeployBudget | None = None) -> Report:
    """Reads the runs, measures, writes report.md, report.csv, plots/ and the W&B run; prints the report."""
    import torch

    from trainer.bench.deploy import DeployBudget, default_device, device_text, method_text
    from trainer.data.common import default_threads
    from trainer.report.ensemble import ensemble_text, run_ensemble
    from trainer.report.plots import PLOTS, make_plots
    from trainer.report.runs import find_runs
    from trainer.report.stats import grid_section, groups, has_grid, has_seeds, seeds_section
    from trainer.report.table import (
        comparison_rows, csv_text, deployment_table, markdown_table, not_finished_lines, sweep_header, table_notes,
    )
    from trainer.report.wandb_run import log_to_wandb

    budget = DeployBudget() if budget is None else budget
    folder = Path(folder)
    name, runs = find_runs(folder)
    members = _choose_members(runs, ensemble) if use_ensemble else []
    for r in runs:
        if r.problem:
            print(f"warning: {r.problem}", file=sys.stderr)

    order, rows = comparison_rows(runs)
    sections = [sweep_header(name, runs), "", markdown_table(runs), "", table_notes(runs)]
    found = groups(runs)
    if has_seeds(found):  # several seeds of one architecture (and grid point): mean, std, interval
        sections += ["", seeds_section(found)]
    if has_grid(found):
        sections += ["", grid_section(found)]
    missing = not_finished_lines(runs)
    if missing:
        sections += ["", "Not in the table, or with files that could not be read:", *missing]
    retried = sweep_file.retried_lines(folder)  # launch.py --retries: each attempt's end and cause
    if retried:
        sections += ["", "Jobs retried (sweep.json):", *retried]

    device = default_device()
    torch.set_num_threads(default_threads())  # the cores this process may use (SLURM's affinity), as the trainer
    if deploy:
        notes = []
        if device.type == "cpu":  # other processes on the cores slow every CPU figure, batch 1 most
            notes.append(f"- The 1-minute load average was {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when the "
                         "measurements began; above the core count, the CPU figures are slower than the machine can do.")
        for row, run in zip(rows, order):
            if not run.finished:
                continue
            if run.config is None:
                notes.append(f"- {run.name}: not measured: no readable config.yaml")
                continue
            try:
                row.update(measure_run(run, device, budget))
            except UserError as e:
                notes.append(f"- {run.name}: not measured: {e}")
        sections += ["", f"## Deployment, measured on {device_text(device)}", "", deployment_table(rows), "",
                     method_text(device, budget), *([""] + notes if notes else [])]

    result = None
    if use_ensemble:
        sections += ["", "## Ensemble", ""]
        if len(members) < 2:
            sections.append(f"Not computed: it needs two finished runs with a readable config; "
                            f"{len(members)} {'is' if len(members) == 1 else 'are'} here.")
        else:
            try:
                result = run_ensemble(members, device)
                sections.append(ensemble_text(result))
            except UserError as e:
                sections.append(f"Not computed: {e}")

    plots = make_plots(runs, folder)
    text = "\n".join(sections)
    images = "\n".join(f"![{PLOTS[p.name]}](plots/{p.name})" for p in plots)
    markdown = f"{text}\n\n## Plots\n\n{images}\n"
    write_text_atomic(folder / "report.md", markdown)
    write_text_atomic(folder / "report.csv", csv_text(rows))
    out(text)
    out("")
    out(f"report: {folder / 'report.md'}, {folder / 'report.csv'}, plots in {folder / 'plots'}")
    out(log_to_wandb(name, folder, runs, rows, plots, result, wandb_mode))
    return Report(name, folder, runs, rows, result, plots, markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python jobs/report.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a sweep folder (runs/<sweep>) or a folder of run folders")
    parser.add_argument("--no-deploy", action="store_true", help="skip the latency/throughput/memory measurements")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--ensemble", metavar="a,b,...", help="the runs to ensemble (default: every finished run)")
    choice.add_argument("--no-ensemble", action="store_true", help="skip the ensemble")
    parser.add_argument("--wandb-mode", choices=["auto", "online", "offline", "disabled"],
                        help="W&B mode for the report run (default: the runs' logging.mode)")
    parser.add_argument("--sync", action="store_true",
                        help="only upload every offline W&B run of the sweep (training runs and reports), then exit")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.ensemble.split(",") if n.strip()] if args.ensemble is not None else None
    if names is not None and not names:
        parser.error("--ensemble: give run names, e.g. --ensemble resnet,mobilenet")

    def run() -> int:
        if not args.folder.is_dir():  # before the report's imports (see the top): at once
            raise UserError(f"{args.folder}: not a folder")
        if args.sync:
            from trainer.report.wandb_run import sync

            return sync(args.folder)
        make_report(args.folder, deploy=not args.no_deploy, ensemble=names, use_ensemble=not args.no_ensemble,
                    wandb_mode=args.wandb_mode)
        return 0

    cli.run(run)
