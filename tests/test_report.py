"""jobs/report.py on a sweep the real trainer wrote: two finished runs, an unfinished one, a corrupt
summary and an architecture that never started; the ensemble checked against an independent
evaluation of the checkpoints through the project's own test loader. What the report only reads
(the flags, the columns, the plots' legends, steps.jsonl) is also checked on run folders written
here by hand, in a blink."""

import csv
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, SMALL as SMALL_CONFIG, Result, run_main
from trainer.device import amp_dtype, cpu_flags, native_bf16_cpu
from wandb_records import history, read_records

CONFIGS = REPO / "jobs/configs"
SWEEP = "rep"
ARCHS = ["resnet9_tiny", "mobilenet", "alexnet", "inception_bn", "efficientnet"]
TESTED = 200  # test images each run is evaluated on (and the report's ensemble)


def small(beton_dir: Path, config: str, *extra: str) -> list[str]:
    """Seconds per run: 500 training images (5 steps), TESTED test images, one CPU thread (two spin
    against each other where other work shares the cores)."""
    return [
        "--config", str(CONFIGS / config), f"data.dir={beton_dir}", "data.train_subset=500",
        f"data.test_subset={TESTED}",
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
    from trainer.report.table import seconds_text

    rows = {r["arch"]: r for r in csv_rows(sweep)}
    assert list(rows) == sorted(["resnet9_tiny", "mobilenet"], key=lambda a: -summary(sweep, a)["best_test_acc"]) + [
        "alexnet", "inception_bn", "efficientnet"]  # finished by accuracy, then the rest in the sweep's order
    for arch in ("resnet9_tiny", "mobilenet"):
        s, row = summary(sweep, arch), rows[arch]
        assert row["status"] == "finished"
        assert number(row["test_acc"]) == s["best_test_acc"] and number(row["train_acc"]) == s["train_acc"]
        assert int(row["params"]) == s["params"] and int(row["best_epoch"]) == s["best_epoch"]
        assert number(row["gap"]) == s["gap"] and row["device"] == s["device"]
        # On the CPU there are no GPU-seconds; the CPU-seconds to the best epoch have their own column.
        assert row["gpu_s_to_best"] == "" and s["gpu_seconds"] is None
        assert number(row["cpu_s_to_best"]) == s["best_epoch_wall_time_s"] * s["world_size"]
        # 500 training images for 1 or 2 epochs, of a training set of 5,000: too few to mean anything
        seen = sum(m["steps"] for m in metrics(sweep, arch)) * 100
        assert int(row["images_seen"]) == seen and row["flag"].startswith(f"too few images: {seen:,} seen (one pass: 5,000)")
    tiny, mobile = metrics(sweep, "resnet9_tiny"), metrics(sweep, "mobilenet")
    assert number(rows["resnet9_tiny"]["train_images_per_s"]) == statistics.median(m["images_per_s"] for m in tiny[1:])
    assert number(rows["mobilenet"]["train_images_per_s"]) == mobile[0]["images_per_s"]  # one epoch only

    s = summary(sweep, "mobilenet")
    assert number(rows["mobilenet"]["paper_test_acc"]) == 90.75
    assert number(rows["mobilenet"]["test_acc_delta"]) == pytest.approx(s["best_test_acc"] - 90.75, abs=1e-12)
    assert number(rows["mobilenet"]["train_acc_delta"]) == pytest.approx(s["train_acc"] - 99.94, abs=1e-12)
    assert rows["resnet9_tiny"]["paper_test_acc"] == "" and rows["resnet9_tiny"]["test_acc_delta"] == ""  # beyond the seed
    assert number(rows["alexnet"]["paper_test_acc"]) == 77.53
    assert not any(name.startswith("seed_") for name in rows["alexnet"])  # the seed's figures are the paper's

    # The markdown table and stdout carry the same numbers, rounded; the flags beside the accuracy
    # (their footnote marks added); the CPU-seconds in their own column, and no GPU-seconds column.
    flagged = "; ".join(f"{f} ⁴" for f in rows["mobilenet"]["flag"].split("; "))
    line = (f"| mobilenet | {s['best_test_acc']:.2f} | {flagged} | 90.75 | {s['best_test_acc'] - 90.75:+.2f} "
            f"| {s['params'] / 1e6:.2f} | {s['best_epoch']} | {s['train_acc']:.2f} | 99.94 | {s['train_acc'] - 99.94:+.2f} "
            f"| {s['gap']:.2f} | {seconds_text(s['best_epoch_wall_time_s'])} |")
    report = (sweep / "report.md").read_text()
    assert line in report and line in reported.stdout
    assert "| flags | paper | Δ |" in report and "CPU-s to best ¹" in report and "GPU-s to best" not in report
    assert "⁴ Not an accuracy on a par with the rest." in report and "CPU-s)" not in report
    assert f"- device: 1 x {s['device']}" in report
    assert f"- data: {s['data']['dir']} (CIFAR-10 from {s['data']['source_dir']}" in report
    assert f"tested on the first {TESTED} test images" in report


@pytest.mark.slow
def test_missing_and_broken_runs_are_listed(sweep, reported):
    rows = {r["arch"]: r for r in csv_rows(sweep)}
    assert rows["alexnet"]["status"] == "unfinished: epoch 1 of 2"
    assert rows["efficientnet"]["status"] == "not started"
    assert rows["inception_bn"]["status"] == "corrupt summary.json"
    report = (sweep / "report.md").read_text()
    assert "| alexnet | unfinished: epoch 1 of 2 |  | 77.53 |" in report  # no flag: not finished
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
    assert names == ["acc_vs_params.png", "acc_vs_seconds.png", "test_acc_curves.png", "train_loss_steps.png"]
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
    assert torch.equal(y, y2) and len(y) == TESTED
    for arch, p in (("resnet9_tiny", p_tiny), ("mobilenet", p_mobile)):
        correct = int((p.argmax(1) == y).sum())
        assert 100.0 * correct / TESTED == summary(sweep, arch)["best_test_acc"]  # the evaluation is the trainer's
        assert f"| {arch} | {100 * correct / TESTED:.2f} | {correct} / {TESTED} |" in reported.stdout
    correct = int(((p_tiny + p_mobile) / 2).argmax(1).eq(y).sum())
    assert f"| ensemble of 2 | {100 * correct / TESTED:.2f} | {correct} / {TESTED} | |" in reported.stdout
    best = max(summary(sweep, a)["best_test_acc"] for a in ("resnet9_tiny", "mobilenet"))
    assert (f"Ensemble {100 * correct / TESTED:.2f}% vs the best single model" in reported.stdout
            and f"{best:.2f}%:" in reported.stdout)


@pytest.mark.slow
def test_wandb_report_run_holds_the_table(sweep, reported):
    (wandb_file,) = (sweep / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_records(wandb_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.job_type == "report" and run.run_group == SWEEP
    (row,) = [h for h in history(records) if "comparison/_type" in h]
    assert row["comparison/_type"] == "table-file" and row["comparison/nrows"] == len(ARCHS)
    assert {f"plots/{name}/_type" for name in ("acc_vs_params", "test_acc_curves", "acc_vs_seconds",
                                                "train_loss_steps")} <= row.keys()
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
    assert (tmp_path / "report.csv").exists() and len(list((tmp_path / "plots").glob("*.png"))) == 4
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
    (line,) = [ln for ln in out.splitlines() if ln.startswith("| mobilenet |")]
    assert line.startswith(f"| mobilenet | {summary(sweep, 'mobilenet')['best_test_acc']:.2f} | too few images: ")
    assert " | 90.75 | " in line
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


@pytest.mark.slow
def test_training_writes_its_loss_by_step_to_the_run_folder(sweep, reported):
    from trainer.run_files import read_steps

    # 5 steps an epoch, logging.log_every=5: one point at the end of each epoch trained
    tiny, alexnet = read_steps(sweep / "resnet9_tiny"), read_steps(sweep / "alexnet")
    assert [(p["step"], p["epoch"]) for p in tiny] == [(5, 1.0), (10, 2.0)] and [p["step"] for p in alexnet] == [5]
    assert all(p["loss"] > 0 and p["lr"] >= 0 for p in tiny + alexnet)
    assert "(plots/train_loss_steps.png)" in (sweep / "report.md").read_text()


# ---- run folders written here: what the report only reads ------------------------------------------


def fake_run(folder: Path, name: str, *, arch: str = "mobilenet", acc: float = 60.0, epochs: int = 2,
             steps: int = 500, batch: int = 100, gpu: bool = False, budget: dict | None = None,
             train_images: int | None = 50_000, finished: bool = True) -> Path:
    """A run folder as the trainer leaves it (config.yaml, metrics.jsonl, steps.jsonl, summary.json),
    with made-up figures: `epochs` of `steps` steps of `batch` images, 10 s an epoch."""
    from trainer.config import load_config, save_config

    run = folder / name
    run.mkdir(parents=True)
    cfg = load_config(CONFIGS / f"{arch}.yaml", [f"data.dir={folder}", f"data.batch_size={batch}", "data.num_workers=1",
                                                 f"train.epochs={epochs}"])
    save_config(cfg, run / "config.yaml")
    lines = [{"epoch": e, "steps": steps, "train_loss": 1.0, "train_acc": acc + 5, "test_loss": 1.0,
              "test_acc": acc - 2 + e, "lr": 0.1, "images_per_s": 1000.0, "epoch_s": 10.0, "compile_s": 0.0,
              "peak_mem_mb": 100.0, "elapsed_s": 10.0 * e} for e in range(1, epochs + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    points = [{"step": s, "epoch": s / steps, "loss": 2.3 / (1 + s / steps), "lr": 0.1} for s in range(1, epochs * steps + 1, 50)]
    (run / "steps.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    if finished:
        summary = {"arch": arch, "test_acc": acc, "best_test_acc": acc, "best_epoch": epochs, "train_acc": acc + 5,
                   "gap": 5.0, "params": 1_000_000, "epochs_run": epochs, "wall_time_s": 10.0 * epochs,
                   "best_epoch_wall_time_s": 10.0 * epochs, "world_size": 1,
                   "gpu_seconds": 10.0 * epochs if gpu else None, "device": "NVIDIA H100" if gpu else "cpu",
                   "selected_by": "test", "budget": budget,
                   "data": {"format": "beton", "dir": str(folder), "train_images": train_images}}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_flags_mark_runs_that_saw_too_few_images_ended_near_chance_or_overran(tmp_path):
    """Flags in the table (a column with footnote marks, the footnotes below it) and in report.csv's
    `flag`; the seed's figures as `paper`; GPU- and CPU-seconds in columns of their own."""
    from trainer.report import make_report

    fake_run(tmp_path, "enough", acc=60.0)  # 2 x 500 x 100 = 100,000 images: two passes
    fake_run(tmp_path, "few", acc=40.0, epochs=1, steps=100)  # 10,000 images of a 50,000 pass
    fake_run(tmp_path, "chance", acc=12.5)  # enough images, but within 5 points of chance
    fake_run(tmp_path, "small_set", acc=50.0, epochs=1, steps=50, train_images=5_000)  # one pass over its 5,000
    fake_run(tmp_path, "overran", arch="alexnet", acc=55.0, gpu=True,
             budget={"budget_s": 75, "used_s": 152.4, "within_budget": False})
    fake_run(tmp_path, "within", acc=58.0, budget={"budget_s": 75, "used_s": 70.0, "within_budget": True})
    fake_run(tmp_path, "unfinished", finished=False)
    lines: list[str] = []
    make_report(tmp_path, deploy=False, use_ensemble=False, wandb_mode="disabled", out=lines.append)

    rows = {r["arch"]: r for r in csv_rows(tmp_path)}
    assert {name: row["flag"] for name, row in rows.items()} == {
        "enough": "", "few": "too few images: 10k seen (one pass: 50k)", "chance": "near chance (10%)", "small_set": "",
        "overran": "overran: 152 s of 75", "within": "", "unfinished": ""}
    assert [rows[n]["images_seen"] for n in ("enough", "few", "small_set", "unfinished")] == ["100000", "10000", "5000", ""]
    assert number(rows["overran"]["paper_test_acc"]) == 77.53 and rows["overran"]["gpu_s_to_best"] == "20.0"
    assert rows["overran"]["cpu_s_to_best"] == "" and rows["enough"]["cpu_s_to_best"] == "20.0"

    report = (tmp_path / "report.md").read_text()
    assert ("| arch | test acc % | flags | paper | Δ | params M | best epoch | train acc % | paper | Δ | gap "
            "| GPU-s to best ¹ | CPU-s to best ¹ | train img/s ² | best test % ³ |") in report
    assert "| few | 40.00 | too few images: 10k seen (one pass: 50k) ⁴ | 90.75 | -50.75 |" in report
    assert "| chance | 12.50 | near chance (10%) ⁴ | 90.75 |" in report
    assert "| overran | 55.00 | overran: 152 s of 75 ⁵ | 77.53 | -22.53 |" in report
    assert "| 5.00 | 20.0 | - | 1,000 | 55.00 |" in report  # the GPU run: GPU-s, no CPU-s
    assert "| enough | 60.00 |  | 90.75 |" in report and "| 5.00 | - | 20.0 | 1,000 | 60.00 |" in report
    assert "| unfinished | unfinished: epoch 2 of 2 |  | 90.75 |" in report
    assert "\n⁴ Not an accuracy on a par with the rest. Too few images:" in report
    assert "\n⁵ The run went past its time budget" in report and "| seed |" not in report
    assert "\n".join(lines).startswith(report.split("\n\n## Plots")[0])  # stdout is the report

    # No flag, no GPU run: neither the flags column, nor the GPU-seconds one, nor the footnotes.
    for name in ("few", "chance", "overran", "unfinished"):
        shutil.rmtree(tmp_path / name)
    make_report(tmp_path, deploy=False, use_ensemble=False, wandb_mode="disabled", out=lines.append)
    report = (tmp_path / "report.md").read_text()
    assert "| arch | test acc % | paper | Δ |" in report and "| CPU-s to best ¹ | train img/s ² |" in report
    assert "GPU-s to best" not in report and "⁴ Not" not in report and "⁵ The run" not in report


def test_legends_cover_no_point_and_the_loss_by_step_has_every_run(tmp_path):
    """Every plot's legend lies outside its axes (the data area) and inside the figure, also with
    many runs and long labels; the loss-by-step plot draws each run's steps.jsonl in its colour."""
    from trainer.report.plots import PLOTS, draw_plots
    from trainer.report.runs import find_runs

    for i, arch in enumerate(["mobilenet", "alexnet", "resnet", "vgg_bn", "inception_bn", "efficientnet",
                              "mobilenet_big"]):
        fake_run(tmp_path, f"{arch}-lr0.05-ema0.99-s{i}", arch=arch, acc=50.0 + 5 * i)
    fake_run(tmp_path, "resnet9_tiny", arch="tiny", finished=False)
    _, runs = find_runs(tmp_path)
    figures = draw_plots(runs)
    assert len(figures) == len(PLOTS)
    for (fig, ax), name in zip(figures, PLOTS):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        box, data = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not box.overlaps(data), (name, box, data)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1), (name, box, fig.bbox)

    (curves, _), (loss, _) = (figures[list(PLOTS).index(n)] for n in ("test_acc_curves.png", "train_loss_steps.png"))
    lines = {ln.get_label(): ln for ln in loss.axes[0].get_lines()}
    assert set(lines) == {r.name if r.finished else f"{r.name} ({r.detail})" for r in runs}
    for ln in curves.axes[0].get_lines():  # the same colour for a run in every plot
        assert lines[ln.get_label()].get_color() == ln.get_color()
    run = next(r for r in runs if r.name.startswith("alexnet"))
    assert list(lines[run.name].get_xdata()) == [p["step"] for p in run.steps] == list(range(1, 1001, 50))


def test_steps_file_keeps_a_steps_last_line_and_skips_a_torn_one(tmp_path):
    """A resumed run logs again the steps after its checkpoint: the reader keeps the last line of a
    step; a line cut short by a crash is skipped, and the logger ends it before appending."""
    from trainer.config import load_config, save_config
    from trainer.logger import RunLogger
    from trainer.report.runs import read_run
    from trainer.run_files import read_steps

    cfg = load_config(SMALL_CONFIG, [f"data.dir={tmp_path}", "logging.mode=disabled", "data.num_workers=1"])
    save_config(cfg, tmp_path / "config.yaml")
    logger = RunLogger(tmp_path, cfg, None, 0)
    for step in (2, 4, 6):
        logger.log_step(step, {"loss": 2.0 / step, "lr": 0.1}, epoch=step / 4)
    path = tmp_path / "steps.jsonl"
    path.write_text(path.read_text() + '{"step": 8, "lo')  # the crash
    logger = RunLogger(tmp_path, cfg, None, 1)  # resumed from the checkpoint at step 4
    for step in (6, 8):
        logger.log_step(step, {"loss": 1.0 / step, "lr": 0.05}, epoch=step / 4)

    with pytest.raises(ValueError, match="line 4 is not JSON"):
        read_steps(path)
    skipped: list[str] = []
    points = read_steps(tmp_path, skipped)
    assert [(p["step"], p["epoch"], p["loss"], p["lr"]) for p in points] == [
        (2, 0.5, 1.0, 0.1), (4, 1.0, 0.5, 0.1), (6, 1.5, 1 / 6, 0.05), (8, 2.0, 1 / 8, 0.05)]
    assert len(skipped) == 1 and "line 4 is not JSON" in skipped[0]
    assert read_run("run", tmp_path).steps == points  # the report reads the same, and says what it left out
    assert "line 4 is not JSON" in read_run("run", tmp_path).problem


def test_only_runs_that_differ_in_the_seed_alone_are_averaged_as_seeds(tmp_path):
    # #22: two mobilenet runs with the same seed but other configs were reported as "14.45 ± 2.76 (2)".
    from trainer.report import make_report

    fake_run(tmp_path, "a", acc=60.0)
    fake_run(tmp_path, "b", acc=50.0, batch=50)  # another recipe: its own point, named by what differs
    fake_run(tmp_path, "c", acc=58.0)
    (tmp_path / "c/config.yaml").write_text((tmp_path / "c/config.yaml").read_text().replace("\n  seed: 0", "\n  seed: 1"))
    make_report(tmp_path, deploy=False, use_ensemble=False, wandb_mode="disabled", out=lambda line: None)
    text = (tmp_path / "report.md").read_text()
    assert "59.00 ± 1.41 (2)" in text  # a and c: seeds 0 and 1 of one recipe
    assert "± 7.07" not in text and "(3)" not in text
    assert "data.batch_size=50" in text and "data.batch_size=100" in text


def test_a_non_finite_accuracy_is_named_and_left_out_of_the_statistics(tmp_path, capsys):
    # #22: one seed's NaN summary crashed the report (statistics.stdev); alone it showed `nan` unexplained.
    from trainer.report import make_report

    for name, acc, seed in (("s0", 60.0, 0), ("s1", float("nan"), 1), ("s2", 58.0, 2)):
        fake_run(tmp_path, name, acc=acc)
        config = tmp_path / name / "config.yaml"
        config.write_text(config.read_text().replace("\n  seed: 0", f"\n  seed: {seed}"))
    make_report(tmp_path, deploy=False, use_ensemble=False, wandb_mode="disabled", out=lambda line: None)
    assert "s1/summary.json: best_test_acc=nan, train_acc=nan: not a finite number" in capsys.readouterr().err
    text = (tmp_path / "report.md").read_text()
    assert "59.00 ± 1.41 (2)" in text
    assert {r["arch"]: r["flag"] for r in csv_rows(tmp_path)}["s1"] == "not a number: left out of the statistics"
