"""Run logging: console, the run folder's metrics.jsonl and steps.jsonl, and Weights & Biases — on rank 0 only.

`make_logger` gives rank 0 a RunLogger and every other rank a NullLogger with the same methods
doing nothing, so the training loop calls the logger unconditionally and never branches on rank.

W&B mode: `logging.mode: auto` follows WANDB_MODE if set, else goes online when an API key is
configured (WANDB_API_KEY or a `wandb login` entry in ~/.netrc) and offline otherwise; offline
runs print the `wandb sync` command at the end. If W&B cannot start, training goes on without it.
The API key is never read into anything this module writes.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any

from trainer.cli import described
from trainer.config import Config, to_dict
from trainer.files import write_text_atomic
from trainer.run_files import METRICS, STEPS, WANDB, read_metrics


def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return "online" if read_netrc_auth(host=host) else "offline"
    except Exception:  # an unreadable netrc or a changed wandb internals: be safe, stay local
        return "offline"


def folder_run_id(run_dir: Path, checkpoint_id: str | None) -> str:
    """The run folder's W&B run id: the one its wandb.json names, else the checkpoint's (a folder
    from before wandb.json held it), else a new one, written to wandb.json before wandb.init. Fixed
    at the first start, so that every later start (a resume, a requeue, a retry) logs to one W&B
    run, also when the attempt before was killed before its first checkpoint."""
    path = run_dir / WANDB
    try:
        found = json.loads(path.read_text()).get("id")
        if isinstance(found, str) and found:
            return found
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as e:  # cut short by a full disk: the checkpoint's, or a new one
        print(f"warning: {path}: unreadable ({type(e).__name__}: {e}); writing it again", file=sys.stderr)
    run_id = checkpoint_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_text_atomic(path, json.dumps({"id": run_id}, indent=2) + "\n")
    return run_id


class NullLogger:
    """What ranks other than 0 get: every call is accepted and does nothing."""

    run_id: str | None = None

    def info(self, message: str) -> None:
        pass

    def log_step(self, step: int, metrics: dict[str, float], epoch: float | None = None) -> None:
        pass

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_model(self, path: Path, arch: str, metadata: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class RunLogger(NullLogger):
    def __init__(self, run_dir: Path, cfg: Config, run_id: str | None, resume_epoch: int) -> None:
        self.metrics_path = run_dir / METRICS
        self.steps_path = run_dir / STEPS
        self._keep_epochs_up_to(resume_epoch)
        self._end_torn_step_line()
        self.wandb_run = self._start_wandb(run_dir, cfg, run_id)
        self.run_id = self.wandb_run.id if self.wandb_run is not None else run_id
        if self.wandb_run is not None:
            self._announce(run_dir)

    def _keep_epochs_up_to(self, epoch: int) -> None:
        """On resume, drop lines for epochs the checkpoint does not include (written after it), and
        lines that cannot be read: one cut short by a crash or a full disk would otherwise make every
        resume fail, and the next line appended would be glued to it."""
        if not self.metrics_path.exists():
            return
        skipped: list[str] = []
        rows = read_metrics(self.metrics_path, skipped)
        kept = [r for r in rows if isinstance(r.get("epoch"), int) and r["epoch"] <= epoch]
        for problem in skipped:
            print(f"warning: {problem}; dropped it (cut short when the run stopped?)", file=sys.stderr)
        text = self.metrics_path.read_bytes()
        unterminated = bool(text) and not text.endswith(b"\n")  # the next line would be glued to it
        if skipped or len(kept) != len(rows) or unterminated:
            write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def _end_torn_step_line(self) -> None:
        """A steps.jsonl line cut short by a crash is ended, so that the next point is not glued to
        it: the readers skip the torn line alone. Steps logged after the checkpoint stay: their
        re-trained points come again, and the readers keep a step's last line."""
        if self.steps_path.exists():
            text = self.steps_path.read_bytes()
            if text and not text.endswith(b"\n"):
                with self.steps_path.open("ab") as f:
                    f.write(b"\n")

    def _start_wandb(self, run_dir: Path, cfg: Config, run_id: str | None):
        self.mode = resolve_wandb_mode(cfg.logging.mode)
        if self.mode == "disabled":
            return None
        try:
            run_id = folder_run_id(run_dir, run_id)
            import wandb

            try:
                return self._init_wandb(wandb, run_dir, cfg, run_id)
            except Exception as e:
                if self.mode != "online":
                    raise
                # No network, or W&B's servers slow: the run's history is kept offline, not lost.
                self.info(f"warning: W&B did not start online within logging.init_timeout_s="
                          f"{cfg.logging.init_timeout_s:g} ({described(e)}); logging offline instead")
                self.mode = "offline"
                # The online attempt still holds the run id in this process ("run ID ... is in use"):
                # let it go, so that the offline run keeps the folder's id.
                wandb.teardown()
            return self._init_wandb(wandb, run_dir, cfg, run_id)
        except Exception as e:
            self.info(f"warning: W&B could not start ({type(e).__name__}: {e}); training goes on without it")
            return None

    def _init_wandb(self, wandb: Any, run_dir: Path, cfg: Config, run_id: str | None):
        """wandb.init in self.mode, with the charts' axes defined."""
        run = wandb.init(
            project=cfg.logging.project,
            group=cfg.logging.group,
            job_type="train",
            name=run_dir.name,
            tags=list(dict.fromkeys([cfg.model.arch, *cfg.logging.tags])),
            config={"arch": cfg.model.arch, **to_dict(cfg)},
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=self.mode,
            # console capture: the run page shows the log (output.log offline); quiet: the
            # link is printed by _announce, once, rather than wandb's banner on every start
            settings=wandb.Settings(console="auto", quiet=True, silent=True,
                                    init_timeout=cfg.logging.init_timeout_s),
        )
        # Epoch is the x-axis of the per-epoch charts; the dashboard keeps the best test and
        # validation accuracies.
        run.define_metric("epoch")
        for prefix in ("train/*", "val/*", "test/*", "perf/*", "lr"):
            run.define_metric(prefix, step_metric="epoch")
        run.define_metric("test/acc", step_metric="epoch", summary="max")
        run.define_metric("val/acc", step_metric="epoch", summary="max")
        run.define_metric("step")
        run.define_metric("step/*", step_metric="step")
        return run

    def _announce(self, run_dir: Path) -> None:
        """Says where the run can be followed, and records it in the run folder for `launch.py --status`
        and for syncing a sweep's offline runs in one command."""
        run = self.wandb_run
        offline_dir = Path(run.dir).parent  # .../wandb/offline-run-*/files -> the W&B run folder
        record = {"id": run.id, "mode": self.mode, "project": run.project, "group": run.group or None,
                  "url": run.url if self.mode == "online" else None,
                  "offline_dir": str(offline_dir) if self.mode == "offline" else None}
        write_text_atomic(run_dir / WANDB, json.dumps(record, indent=2) + "\n")
        if record["url"]:
            self.info(f"W&B run: {record['url']}")
        else:
            self.info(f"W&B run {run.id} is offline in {offline_dir} (upload: wandb sync {offline_dir})")

    def log_model(self, path: Path, arch: str, metadata: dict[str, Any]) -> None:
        """Logs the run's best weights as a model artifact, aliases `best` and the architecture, so the
        W&B model registry and the runs table lead to the file. W&B trouble costs only the upload."""
        if self.wandb_run is None or not path.is_file():
            return
        try:
            import wandb

            artifact = wandb.Artifact(f"{arch}-{self.wandb_run.id}", type="model", metadata={"arch": arch, **metadata})
            artifact.add_file(str(path), name=path.name)
            self.wandb_run.log_artifact(artifact, aliases=["best", arch])
        except Exception as e:
            self.info(f"warning: W&B could not log {path} as a model artifact ({type(e).__name__}: {e})")

    def info(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()

    def log_step(self, step: int, metrics: dict[str, float], epoch: float | None = None) -> None:
        """A training-loss point: a line of steps.jsonl (the report's loss-by-step plot) and W&B's step/* charts.
        `epoch`: the epochs trained at this step, fractional mid-epoch."""
        with self.steps_path.open("a") as f:
            f.write(json.dumps({"step": step, **({"epoch": epoch} if epoch is not None else {}), **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({"step": step, **{f"step/{k}": v for k, v in metrics.items()}})

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            groups = {"train_": "train/", "val_": "val/", "test_": "test/"}
            row = {}
            for key, value in metrics.items():
                prefix = next((p for p in groups if key.startswith(p)), None)
                row[groups[prefix] + key[len(prefix):] if prefix else key if key in ("epoch", "lr") else f"perf/{key}"] = value
            self.wandb_run.log(row)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def finish(self) -> None:
        if self.wandb_run is None:
            return
        run_dir = Path(self.wandb_run.dir).parent  # .../wandb/offline-run-*/files -> the run's folder
        self.wandb_run.finish()
        if self.mode == "offline":
            self.info(f"W&B run saved offline; upload it with: wandb sync {run_dir}")


def make_logger(is_main: bool, run_dir: Path, cfg: Config, run_id: str | None, resume_epoch: int) -> NullLogger:
    return RunLogger(run_dir, cfg, run_id, resume_epoch) if is_main else NullLogger()
