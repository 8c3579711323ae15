"""The report's W&B run (job type `report` in the sweep's group: the table, interactive charts built
from it, the ensemble and the PNG plots), and syncing a sweep's offline runs in one command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer import UserError

from trainer.logger import resolve_wandb_mode
from trainer.report.ensemble import EnsembleResult
from trainer.report.runs import Run, evaluated
from trainer.report.table import COLUMNS


def log_to_wandb(name: str, folder: Path, runs: list[Run], rows: list[dict], plots: list[Path],
                 ensemble: EnsembleResult | None, mode: str | None) -> str:
    """A small run of job type `report` in the sweep's W&B group; returns one line saying what happened."""
    configs = [r.config for r in runs if r.config is not None]
    logging = configs[0].logging if configs else None
    mode = resolve_wandb_mode(mode or (logging.mode if logging else "auto"))
    if mode == "disabled":
        return "W&B: disabled"
    group = (logging.group if logging else None) or name
    try:
        import wandb

        run = wandb.init(
            project=logging.project if logging else "cifar-infinity", group=group, job_type="report",
            name=f"report-{name}", dir=str(folder), mode=mode, config={"sweep": name, "runs": [r.name for r in runs]},
            settings=wandb.Settings(console="off", quiet=True, silent=True),
        )
        values: dict[str, Any] = {"comparison": wandb.Table(columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in rows])}
        values.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
        values.update(charts(wandb, values["comparison"], rows, runs))
        if ensemble is not None:
            values["ensemble"] = wandb.Table(
                columns=["model", "test_acc", "correct", "total"],
                data=[[n, ensemble.member_acc(i), ensemble.member_correct[i], ensemble.total]
                      for i, n in enumerate(ensemble.members)]
                + [["ensemble", ensemble.acc, ensemble.correct, ensemble.total]])
        run.log(values)
        if ensemble is not None:
            run.summary.update({"ensemble/acc": ensemble.acc, "ensemble/members": ensemble.members})
        run_dir = Path(run.dir).parent
        run.finish()
    except Exception as e:  # the report's files are written already: W&B trouble costs only the upload
        return f"warning: W&B could not log the report ({type(e).__name__}: {e}); the files above have it all"
    where = f"; upload it with: wandb sync {run_dir}" if mode == "offline" else ""
    return f"W&B: report run in group {group} ({mode}){where}"


def charts(wandb: Any, table: Any, rows: list[dict], runs: list[Run]) -> dict[str, Any]:
    """W&B's own interactive charts, from the comparison table itself (hover shows the values; the
    PNGs stay for the report file): accuracy against parameters and against compute, and the curves."""
    seconds = next((c for c in ("gpu_s_to_best", "cpu_s_to_best") if any(r[c] is not None for r in rows)), None)
    out = {"charts/acc_vs_params": wandb.plot.scatter(table, "params", "test_acc",
                                                      title="best test accuracy (%) vs parameters")}
    if seconds is not None:
        out["charts/acc_vs_seconds"] = wandb.plot.scatter(table, seconds, "test_acc",
                                                          title=f"best test accuracy (%) vs {seconds}")
    curves = [(r, evaluated(r.metrics)) for r in runs if evaluated(r.metrics)]
    if curves:
        out["charts/test_acc_curves"] = wandb.plot.line_series(
            xs=[[m["epoch"] for m in rows] for _, rows in curves],
            ys=[[m["test_acc"] for m in rows] for _, rows in curves],
            keys=[r.name for r, _ in curves], title="test accuracy (%) per epoch", xname="epoch")
    return out


def offline_runs(folder: Path) -> list[Path]:
    """Every offline W&B run under a sweep folder: each training run's and the report's."""
    return sorted(p for p in folder.glob("**/wandb/offline-run-*") if p.is_dir())


def sync(folder: Path, out: Any = print) -> int:
    """Uploads every offline run of the sweep with one `wandb sync` (it skips runs synced before)."""
    found = offline_runs(folder)
    if not found:
        raise UserError(f"{folder}: no offline W&B runs in it (runs online or with logging.mode=disabled leave none)")
    out(f"syncing {len(found)} offline W&B run(s) of {folder}")
    done = subprocess.run([sys.executable, "-m", "wandb", "sync", *map(str, found)])
    if done.returncode != 0:
        raise UserError(f"wandb sync failed (exit {done.returncode}); check `wandb login` and the network, then run "
                        f"this command again: runs already uploaded are skipped")
    return 0
