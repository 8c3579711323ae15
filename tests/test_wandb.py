"""W&B as the place to compare: what a training run and the sweep report leave in W&B, read back
from the offline records (no network here)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from helpers import run_main
from wandb_records import history, read_records


def records_of(run_dir: Path) -> list:
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return read_records(wandb_file)


def test_training_run_records_its_link_console_and_model_artifact(trained_tiny_run):
    record = json.loads((trained_tiny_run / "wandb.json").read_text())
    assert record["mode"] == "offline" and record["url"] is None
    assert Path(record["offline_dir"]).is_dir() and record["id"] in record["offline_dir"]
    stdout = (trained_tiny_run / "stdout.txt").read_text()
    assert f"W&B run {record['id']}" in stdout and f"wandb sync {record['offline_dir']}" in stdout

    records = records_of(trained_tiny_run)
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and artifact.name == f"resnet9_tiny-{record['id']}"
    assert {"best", "resnet9_tiny"} <= set(artifact.aliases)
    assert [c.path for c in artifact.manifest.contents] == ["best.pt"]
    summary = json.loads((trained_tiny_run / "summary.json").read_text())
    assert json.loads(artifact.metadata)["best_test_acc"] == summary["best_test_acc"]
    # console capture: the run page shows the trainer's log
    console = "".join(r.output_raw.line for r in records if r.WhichOneof("record_type") == "output_raw")
    assert "training resnet9_tiny" in console and "done: best test accuracy" in console


def test_report_run_has_interactive_charts_and_one_command_syncs_the_sweep(trained_tiny_run, tmp_path):
    from trainer.report.wandb_run import offline_runs

    sweep = tmp_path / "sweep"
    shutil.copytree(trained_tiny_run, sweep / "resnet9_tiny")
    done = run_main("jobs/report.py", str(sweep), "--no-deploy", "--no-ensemble", "--wandb-mode", "offline")
    assert done.returncode == 0 and "W&B: report run" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    # wandb's service process writes the run file; on a loaded machine its last records can land a
    # moment after finish() has returned
    deadline = time.monotonic() + 60
    while not (rows := [h for h in history(records_of(sweep)) if "comparison/_type" in h]):
        assert time.monotonic() < deadline, "the report run's table never reached its .wandb file"
        time.sleep(1)
    (row,) = rows
    charts = {k.split("_table/")[0] for k in row if k.startswith("charts/")}
    assert {"charts/acc_vs_params", "charts/acc_vs_seconds", "charts/test_acc_curves"} <= charts, sorted(row)
    # the sweep's offline runs: the training run's and the report's, found for one `wandb sync`
    found = offline_runs(sweep)
    assert len(found) == 2 and {p.parent.parent.name for p in found} == {"resnet9_tiny", "sweep"}


def test_launcher_status_shows_where_each_run_is_on_wandb(trained_tiny_run, tmp_path):
    from trainer.launch.status import _wandb_link

    record = json.loads((trained_tiny_run / "wandb.json").read_text())
    assert _wandb_link(trained_tiny_run) == f"offline: {record['offline_dir']}"
    online = tmp_path / "online"
    online.mkdir()
    (online / "wandb.json").write_text(json.dumps({**record, "mode": "online", "url": "https://wandb.ai/u/p/runs/x"}))
    assert _wandb_link(online) == "https://wandb.ai/u/p/runs/x"
    (online / "wandb.json").write_text('{"id": "x", "mo')  # cut short
    assert _wandb_link(online) is None and _wandb_link(tmp_path / "none") is None


def test_online_wandb_without_an_answer_logs_offline_after_the_init_timeout(tmp_path, monkeypatch, capsys):
    # #22: with a key and no network, wandb.init waited its own 90 s before the run started. Here a
    # server that accepts connections and never answers stands in for the unreachable W&B.
    import socket
    import threading

    from conftest import FAKE_WANDB_KEY
    from helpers import SMALL
    from trainer.config import load_config
    from trainer.logger import RunLogger

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def hold_connections() -> None:
        try:
            while True:
                held.append(server.accept())
        except OSError:  # closed at the test's end
            pass

    threading.Thread(target=hold_connections, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    cfg = load_config(SMALL, ["logging.mode=online", "logging.init_timeout_s=2"])
    started = time.monotonic()
    logger = RunLogger(tmp_path, cfg, None, 0)
    waited = time.monotonic() - started
    logger.log_epoch({"epoch": 1, "test_acc": 50.0})
    logger.finish()
    server.close()
    out = capsys.readouterr().out
    assert "warning: W&B did not start online within logging.init_timeout_s=2 (CommError: " in out
    assert "logging offline instead" in out and "wandb sync" in out
    record = json.loads((tmp_path / "wandb.json").read_text())
    assert record["mode"] == "offline" and Path(record["offline_dir"]).is_dir()
    assert waited < 60, waited  # bounded by the setting, not wandb's 90 s (a loose bound: a shared machine)


def test_a_start_killed_before_its_first_checkpoint_and_started_again_logs_to_one_wandb_run(tmp_path):
    # #22: the W&B run id lived in the checkpoint only, so an attempt killed before its first
    # checkpoint (a requeue, a retry after a lost node) started a second W&B run for the same job.
    from helpers import SMALL
    from trainer.config import load_config
    from trainer.logger import RunLogger

    cfg = load_config(SMALL, ["logging.mode=offline"])
    first = RunLogger(tmp_path, cfg, None, 0)  # the first start: no checkpoint, so no id from one
    first.log_step(1, {"loss": 2.3})
    first.finish()  # (a kill would not finish; what counts is the id the next start takes)
    again = RunLogger(tmp_path, cfg, None, 0)  # started again, still with no checkpoint
    again.finish()
    # every offline-run-<date>_<time>-<id> folder names the one id (W&B adds "-1" to a folder name
    # taken already: two starts within one second)
    folders = [p.name for p in tmp_path.glob("wandb/offline-run-*")]
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([^-]+)", name)[1] for name in folders}
    assert len(folders) == 2 and ids == {first.run_id}, folders
    assert again.run_id == first.run_id == json.loads((tmp_path / "wandb.json").read_text())["id"]
