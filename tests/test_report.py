"""jobs/report.py on a sweep the real trainer wrote: two finished runs, an unfinished one, a corrupt
summary and an architecture that never started; the ensemble checked against an independent
evaluation of the checkpoints through the project's own test loader."""

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, Result, run_main
from trainer.device import amp_dtype, cpu_flags, native_bf16_cpu
from wandb_records import history, read_records

CONFIGS = REPO / "jobs/configs"
SWEEP = "rep"
ARCHS = ["resnet9_tiny", "mobilenet", "alexnet", "inception_bn", "efficientnet"]


def small(beton_dir: Path, config: str, *extra: str) -> list[str]:
    """Seconds per run: 500 training images (5 steps), 500 test images, one CPU thread (two spin
    against each other where other work shares the cores)."""
    return [
        "--config", str(CONFIGS / config), f"data.dir={beton_dir}", "data.train_subset=500", "data.test_subset=500",
        "data.batch_size=100", "data.num_workers=1", "data.flip=false", "data.translate=0", "train.patience=0",
        "train.compile=false", "train.threads=1", "logging.mode=disabled", "logging.log_every=5",
        f"logging.group={SWEEP}", *extra,
    ]


@pytest.fixture(scope="module")
def sweep(beton_dir, tmp_path_factory) -> Path:
    """runs/<sweep>/ as the launcher lays it out, trained by the real trainer (in this process, one
    run after the other). Training it and writing the report take most of a minute: the tests
    that read it are marked slow."""
    sweep_dir = tmp_path_factory.mktemp("runs") / SWEEP
    jobs = {
        # tiny.yaml: train.amp=auto (bf16 on this CPU only if it has native bf16), flip TTA; two epochs so
        # that images/s has an epoch after the first
        "resnet9_tiny": small(beton_dir, "tiny.yaml", "train.epochs=2"),
        # fp32: depthwise convolutions are slower in bf16 on this CPU; the report must handle both
        "mobilenet": small(beton_dir, "mobilenet.yaml", "train.epochs=1", "train.amp=false"),
        # a two-epoch run stopped after its first epoch: unfinished
        "alexnet": [*small(beton_dir, "alexnet.yaml", "train.epochs=2"), "--stop-after-epoch", "1"],
    }
    for arch, args in jobs.items():
        done = run_main("trainer", *args, "--run-dir", str(sweep_dir / arch))
        assert done.returncode == 0, f"{arch}: {done.stderr[-3000:]}"
    assert not (sweep_dir / "alexnet/summary.json").exists()

    # A run whose summary.json was cut short.
    from trainer.config import load_config, save_config

    save_config(load_config(CONFIGS / "inception_bn.yaml", [f"data.dir={beton_dir}"]), sweep_dir / "inception_bn/config.yaml")
    (sweep_dir / "inception_bn/summary.json").write_text('{"arch": "inception_bn", "best_test_acc": 4')
    # efficientnet: in the sweep, never started.
    record = {"sweep": SWEEP, "executor": "local", "profile": "test", "archs": ARCHS, "overrides": [], "cluster": {},
              "jobs": {}, "git_sha": None}
    (sweep_dir / "sweep.json").write_text(json.dumps(record, indent=2))
    return sweep_dir


@pytest.fixture(scope="module")
def reported(sweep) -> Result:
    r = run_main("jobs/report.py", str(sweep), "--wandb-mode", "offline")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def summary(sweep: Path, arch: str) -> dict:
    return json.loads((sweep / arch / "summary.json").read_text())


def metrics(sweep: Path, arch: str) -> list[dict]:
    from trainer.run_files import read_metrics

    return read_metrics(sweep / arch / "metrics.jsonl")


def csv_rows(sweep: Path) -> list[dict]:
    with open(sweep / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def number(cell: str) -> float | None:
    return float(cell) if cell else None


@pytest.mark.slow
def test_table_numbers_are_the_summaries_and_the_seed(sweep, reported):
    rows = {r["arch"]: r for r in csv_rows(sweep)}
    assert list(rows) == sorted(["resnet9_tiny", "mobilenet"], key=lambda a: -summary(sweep, a)["best_test_acc"]) + [
        "alexnet", "inception_bn", "efficientnet"]  # finished by accuracy, then the rest in the sweep's order
    for arch in ("resnet9_tiny", "mobilenet"):
        s, row = summary(sweep, arch), rows[arch]
        assert row["status"] == "finished"
        assert number(row["test_acc"]) == s["best_test_acc"] and number(row["train_acc"]) == s["train_acc"]
        assert int(row["params"]) == s["params"] and int(row["best_epoch"]) == s["best_epoch"]
        assert number(row["gap"]) == s["gap"] and row["device"] == s["device"]
        # On the CPU there are no GPU-seconds; the CPU-seconds to the best epoch stand in.
        assert row["gpu_s_to_best"] == "" and s["gpu_seconds"] is None
        assert number(row["cpu_s_to_best"]) == s["best_epoch_wall_time_s"] * s["world_size"]
    tiny, mobile = metrics(sweep, "resnet9_tiny"), metrics(sweep, "mobilenet")
    assert number(rows["resnet9_tiny"]["train_images_per_s"]) == statistics.median(m["images_per_s"] for m in tiny[1:])
    assert number(rows["mobilenet"]["train_images_per_s"]) == mobile[0]["images_per_s"]  # one epoch only

    s = summary(sweep, "mobilenet")
    assert number(rows["mobilenet"]["seed_test_acc"]) == 90.75
    assert number(rows["mobilenet"]["test_acc_delta"]) == pytest.approx(s["best_test_acc"] - 90.75, abs=1e-12)
    assert number(rows["mobilenet"]["train_acc_delta"]) == pytest.approx(s["train_acc"] - 99.94, abs=1e-12)
    assert rows["resnet9_tiny"]["seed_test_acc"] == "" and rows["resnet9_tiny"]["test_acc_delta"] == ""  # beyond the seed
    assert number(rows["alexnet"]["seed_test_acc"]) == 77.53

    # The markdown table and stdout carry the same numbers, rounded.
    line = (f"| mobilenet | {s['best_test_acc']:.2f} | 90.75 | {s['best_test_acc'] - 90.75:+.2f} | {s['params'] / 1e6:.2f} "
            f"| {s['best_epoch']} | {s['train_acc']:.2f} | 99.94 | {s['train_acc'] - 99.94:+.2f} | {s['gap']:.2f} |")
    report = (sweep / "report.md").read_text()
    assert line in report and line in reported.stdout
    assert f"- device: 1 x {s['device']}" in report
    assert f"- data: {s['data']['dir']} (CIFAR-10 from {s['data']['source_dir']}" in report
    assert "tested on the first 500 test images" in report


@pytest.mark.slow
def test_missing_and_broken_runs_are_listed(sweep, reported):
    rows = {r["arch"]: r for r in csv_rows(sweep)}
    assert rows["alexnet"]["status"] == "unfinished: epoch 1 of 2"
    assert rows["efficientnet"]["status"] == "not started"
    assert rows["inception_bn"]["status"] == "corrupt summary.json"
    report = (sweep / "report.md").read_text()
    assert "| alexnet | unfinished: epoch 1 of 2 | 77.53 |" in report
    assert "| efficientnet | not started |" in report
    corrupt = str(sweep / "inception_bn/summary.json")
    warnings = [ln for ln in reported.stderr.splitlines() if corrupt in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "corrupt summary" in warnings[0]
    assert f"- inception_bn: {corrupt}: corrupt summary" in report
    assert "# Sweep rep: 2 of 5 runs finished" in reported.stdout


@pytest.mark.slow
def test_plots_are_real_images(sweep, reported):
    import matplotlib.image

    names = sorted(p.name for p in (sweep / "plots").iterdir())
    assert names == ["acc_vs_params.png", "acc_vs_seconds.png", "test_acc_curves.png"]
    for name in names:
        image = matplotlib.image.imread(sweep / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
        colours = np.unique(image[::3, ::3].reshape(-1, image.shape[2]), axis=0)
        assert len(colours) > 50, f"{name}: {len(colours)} colours"  # lines, markers, text: not a blank canvas
        assert f"(plots/{name})" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_deployment_figures(sweep, reported):
    rows = {r["arch"]: r for r in csv_rows(sweep)}
    for arch in ("resnet9_tiny", "mobilenet"):
        row = rows[arch]
        for key in ("latency_b1_ms", "throughput_b256_img_s", "peak_mem_mb"):
            assert number(row[key]) > 0, (arch, key)
        # The state_dict file holds the float32 weights (and BatchNorm buffers) plus a little framing.
        weights = int(row["model_file_bytes"])
        assert 4 * summary(sweep, arch)["params"] < weights < 4 * summary(sweep, arch)["params"] * 1.2 + 200_000
        # Measured in the precision the run trained in (auto resolves the same way on the same machine).
        trained = summary(sweep, arch)["amp"]
        assert trained == {"mobilenet": "fp32", "resnet9_tiny": "bf16" if native_bf16_cpu(cpu_flags()) else "fp32"}[arch]
        assert row["deploy_precision"] == {"bf16": "bf16 autocast", "fp32": "fp32"}[trained]
        assert row["deploy_device"].startswith("cpu (")
        # Activations of a batch of 256 come on top of the weights.
        assert number(row["peak_mem_mb"]) * 2**20 > weights
    assert rows["alexnet"]["latency_b1_ms"] == ""  # unfinished: not measured
    assert "## Deployment, measured on cpu (" in reported.stdout


def _probabilities(run_dir: Path, beton_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's best.pt over its own test loader, evaluated as the trainer evaluates: softmax, labels."""
    import torch.nn.functional as F

    from trainer.config import load_config
    from trainer.data import build_loaders
    from trainer.distributed import Dist
    from trainer.models import options

    cfg = load_config(run_dir / "config.yaml", [f"data.dir={beton_dir}"])
    amp = amp_dtype(torch.device("cpu"), cfg.train.amp)
    _, test = build_loaders(cfg.data, Dist.single("cpu"), 0, 2)
    state = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    net = options.build(cfg.model).to(memory_format=torch.channels_last)  # tiny.yaml whitens, mobilenet has stride 8
    net.load_state_dict(state["model"])
    net.eval()

    def pair(v: torch.Tensor) -> torch.Tensor:
        return (net(v).float() + net(v.flip(-1)).float()) / 2 if cfg.train.tta else net(v).float()

    k = cfg.train.tta_translate
    probs, labels = [], []
    with torch.no_grad():
        for x, y in test:
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                logits = pair(x)
                if k:  # airbench's 6 views: half the plain pair, a quarter each for the pair shifted by +-k (reflect)
                    padded = F.pad(x, (k, k, k, k), mode="reflect")
                    up_left, down_right = (padded[:, :, o : o + 32, o : o + 32].contiguous(memory_format=torch.channels_last)
                                           for o in (2 * k, 0))
                    logits = logits / 2 + pair(up_left) / 4 + pair(down_right) / 4
            probs.append(logits.softmax(1).clone())  # ffcv reuses its batch buffers
            labels.append(y.clone())
    return torch.cat(probs), torch.cat(labels)


@pytest.mark.slow
def test_ensemble_matches_an_independent_evaluation(sweep, reported, beton_dir):
    (p_tiny, y), (p_mobile, y2) = (_probabilities(sweep / a, beton_dir) for a in ("resnet9_tiny", "mobilenet"))
    assert torch.equal(y, y2) and len(y) == 500
    for arch, p in (("resnet9_tiny", p_tiny), ("mobilenet", p_mobile)):
        correct = int((p.argmax(1) == y).sum())
        assert 100.0 * correct / 500 == summary(sweep, arch)["best_test_acc"]  # the evaluation is the trainer's
        assert f"| {arch} | {correct / 5:.2f} | {correct} / 500 |" in reported.stdout
    correct = int(((p_tiny + p_mobile) / 2).argmax(1).eq(y).sum())
    assert f"| ensemble of 2 | {correct / 5:.2f} | {correct} / 500 | |" in reported.stdout
    best = max(summary(sweep, a)["best_test_acc"] for a in ("resnet9_tiny", "mobilenet"))
    assert f"Ensemble {correct / 5:.2f}% vs the best single model" in reported.stdout and f"{best:.2f}%:" in reported.stdout


@pytest.mark.slow
def test_wandb_report_run_holds_the_table(sweep, reported):
    (wandb_file,) = (sweep / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_records(wandb_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.job_type == "report" and run.run_group == SWEEP
    (row,) = [h for h in history(records) if "comparison/_type" in h]
    assert row["comparison/_type"] == "table-file" and row["comparison/nrows"] == len(ARCHS)
    assert {f"plots/{name}/_type" for name in ("acc_vs_params", "test_acc_curves", "acc_vs_seconds")} <= row.keys()
    table = json.loads((wandb_file.parent / "files" / row["comparison/path"]).read_text())
    rows = csv_rows(sweep)
    assert [r[0] for r in table["data"]] == [r["arch"] for r in rows]
    accs = {r[0]: r[table["columns"].index("test_acc")] for r in table["data"]}
    assert accs["mobilenet"] == summary(sweep, "mobilenet")["best_test_acc"] and accs["alexnet"] is None
    assert "wandb sync" in reported.stdout


@pytest.mark.slow
def test_folder_of_runs_without_sweep_json(sweep, tmp_path):
    from trainer.report import make_report

    for arch in ("mobilenet", "alexnet"):
        (tmp_path / arch).symlink_to(sweep / arch)
    (tmp_path / "notes").mkdir()  # no config.yaml: not a run
    lines: list[str] = []
    report = make_report(tmp_path, deploy=False, use_ensemble=False, wandb_mode="disabled", out=lines.append)
    assert [r.name for r in report.runs] == ["alexnet", "mobilenet"]
    assert [row["status"] for row in report.rows] == ["finished", "unfinished: epoch 1 of 2"]
    assert (tmp_path / "report.csv").exists() and len(list((tmp_path / "plots").glob("*.png"))) == 3
    assert "W&B: disabled" in lines and "## Deployment" not in "\n".join(lines)


@pytest.mark.parametrize("layout, fragment", [
    ("missing", "not a folder"),
    ("empty", "not a sweep folder (no sweep.json) and no run folders in it"),
    ("no runs", "no runs at all"),
    ("bad record", "sweep.json: unreadable sweep record"),
])
def test_bad_input_is_one_error_line(layout, fragment, tmp_path, capsys):
    from trainer.report import main

    folder = tmp_path / "sweep"
    if layout != "missing":
        folder.mkdir()
    if layout == "no runs":
        (folder / "sweep.json").write_text(json.dumps({"sweep": "s", "archs": ["resnet", "alexnet"]}))
    if layout == "bad record":
        (folder / "sweep.json").write_text("{")
    with pytest.raises(SystemExit) as exit:
        main([str(folder)])
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {folder}") and fragment in err


@pytest.mark.slow
def test_ensemble_of_an_unfinished_run_is_refused(sweep, capsys):
    from trainer.report import main

    with pytest.raises(SystemExit) as exit:
        main([str(sweep), "--ensemble", "mobilenet,alexnet", "--no-deploy", "--wandb-mode", "disabled"])
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --ensemble: alexnet: not a finished run here (finished: ") and err.count("\n") == 1


@pytest.mark.slow
def test_launcher_wait_ends_with_the_report(sweep, tmp_path, capsys, monkeypatch):
    from trainer import launch

    done = tmp_path / "done"
    done.mkdir()
    (done / "mobilenet").symlink_to(sweep / "mobilenet")
    record = {"sweep": "done", "executor": "local", "profile": "test", "archs": ["mobilenet"], "overrides": [],
              "cluster": {}, "jobs": {}, "git_sha": None}
    (done / "sweep.json").write_text(json.dumps(record))
    assert launch.wait(done, poll_s=0.1) == 0
    out = capsys.readouterr().out
    assert f"| mobilenet | {summary(sweep, 'mobilenet')['best_test_acc']:.2f} | 90.75 |" in out
    assert (done / "report.md").exists() and (done / "report.csv").exists()
    assert "## Deployment" not in out  # measured by jobs/report.py where it runs, not on a login node

    # A report that fails is one warning line; the exit code stays the jobs'.
    def broken(*args, **kwargs):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr("trainer.report.make_report", broken)
    assert launch.wait(done, poll_s=0.1) == 0
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("warning")] == [
        f"warning: the sweep report failed (RuntimeError: disk full); retry: python jobs/report.py {done}"]
    assert "| mobilenet |" not in out
