"""The report's W&B run: job type `report` in the sweep's group, holding the table, the ensemble and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.logger import resolve_wandb_mode
from trainer.report.ensemble import EnsembleResult
from trainer.report.runs import Run
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
