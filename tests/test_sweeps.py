"""Seeds and grids in the sweep launcher, and the report's statistics over seeds: grid expansion and
the t quantiles (unit), a grid's dry run and the --yes rule through the real launcher (run in this
process), and one real 2-seed --local sweep of resnet9_tiny (shared by the slow tests; its jobs are
submitit's processes) reported with mean, std and a 95% confidence interval."""

import csv
import json
import math
import re
import shlex
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import Result, run_main
from wandb_records import read_records


def launch(*args: str) -> Result:
    """`python jobs/launch.py ARGS`, run in this process."""
    return run_main("jobs/launch.py", *args)


def sweep_record(runs: Path, sweep: str) -> dict:
    return json.loads((runs / sweep / "sweep.json").read_text())

# ---- grid expansion ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, values",
    [
        ("optim.lr=0.05,0.1", ["0.05", "0.1"]),
        ("optim.lr=0.05", ["0.05"]),
        ("train.ema=0, 0.999", ["0", "0.999"]),
        ("logging.tags=[a,b]", ["[a,b]"]),  # a list value: its commas are inside brackets
        ("logging.tags=[a,b],[c]", ["[a,b]", "[c]"]),  # a grid of two lists
        ("logging.tags=[a b, it's]", ["[a b, it's]"]),
        ('data.dir="/data/a,b"', ['"/data/a,b"']),  # a quoted scalar keeps its comma
        ("data.dir='/x,y',/z", ["'/x,y'", "/z"]),
    ],
)
def test_only_top_level_commas_of_scalars_split(override, values):
    from trainer.launch import grid_values

    assert grid_values(override) == values


def test_grid_is_every_combination_times_architectures_times_seeds():
    from trainer.launch import expand_grid, plan_jobs

    shared, points = expand_grid(["data.train_subset=256", "optim.lr=0.05,0.1", "train.ema=0,0.999",
                                  "logging.tags=[a,b]"])
    assert shared == ["data.train_subset=256", "logging.tags=[a,b]"]
    assert [name for name, _ in points] == ["lr0.05-ema0", "lr0.05-ema0.999", "lr0.1-ema0", "lr0.1-ema0.999"]
    assert points[1][1] == ("optim.lr=0.05", "train.ema=0.999")

    jobs = plan_jobs(["resnet", "vgg_bn"], points, 3)
    assert len(jobs) == 2 * 4 * 3 and len({j.name for j in jobs}) == 24
    assert (jobs[0].name, jobs[0].overrides) == ("resnet-lr0.05-ema0-s0", ("optim.lr=0.05", "train.ema=0", "train.seed=0"))
    last = jobs[-1]
    assert (last.name, last.arch, last.point, last.seed) == ("vgg_bn-lr0.1-ema0.999-s2", "vgg_bn", "lr0.1-ema0.999", 2)
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", j.name) for j in jobs)

    # Seeds alone, and neither: a plain sweep keeps one folder per architecture, named by it.
    assert [j.name for j in plan_jobs(["resnet"], [("", ())], 2)] == ["resnet-s0", "resnet-s1"]
    _, single = expand_grid(["optim.lr=0.1"])
    assert [(j.name, j.overrides) for j in plan_jobs(["resnet", "alexnet"], single, None)] == [("resnet", ()), ("alexnet", ())]


def test_point_names_are_safe_and_distinct():
    from trainer.launch import expand_grid

    _, points = expand_grid(["data.dir=/data/a,/data/b", "logging.tags=[x],[y, z]"])
    assert [name for name, _ in points] == ["dirdata_a-tagsx", "dirdata_a-tagsy__z", "dirdata_b-tagsx",
                                            "dirdata_b-tagsy__z"]
    # Two keys with the same last part are named in full; values that differ only in characters
    # a folder name cannot hold fall back to numbered points.
    assert [n for n, _ in expand_grid(["model.x=1,2", "data.x=3"])[1]] == ["x1", "x2"]
    assert [n for n, _ in expand_grid(["a.x=1,2", "b.x=3,4"])[1]][0] == "a.x1-b.x3"
    assert [n for n, _ in expand_grid(["data.dir=/a/b,/a_b"])[1]] == ["p0", "p1"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.lr=0.1,"], "'optim.lr=0.1,': an empty value in a comma list"),
        (["optim.lr=0.1,0.1"], "'optim.lr=0.1,0.1': the value 0.1 given twice"),
        (["optim.lr=0.1,0.10,1e-1"], "the value 0.1 given twice in a comma list (as the config reads it)"),  # #22
        (["logging.tags=[a],[ a ]"], "given twice"),
        (["optim.lr=0.1,0.2", "optim.lr=0.3"], "optim.lr: given twice (once as a comma list)"),
    ],
)
def test_bad_grids_are_one_error(overrides, fragment):
    from trainer import UserError
    from trainer.launch import expand_grid

    with pytest.raises(UserError) as info:
        expand_grid(overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ---- statistics --------------------------------------------------------------------------------


def _t_cdf_above_zero(x: float, df: int) -> float:
    """P(0 < T < x) for Student's t with df degrees of freedom, by Simpson's rule on its density."""
    xs = np.linspace(0.0, x, 200_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(xs**2 / df))
    h = xs[1] - xs[0]
    return float(h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum()))


@pytest.mark.parametrize("df", [*range(1, 31), 31, 40, 100, 1000])
def test_t_quantiles_against_the_density(df):
    from trainer.report.stats import t975

    t = t975(df)
    tolerance = 6e-5 if df <= 30 else 2e-4  # the table's 4 decimals; the expansion's stated error
    assert _t_cdf_above_zero(t - tolerance, df) < 0.475 < _t_cdf_above_zero(t + tolerance, df)


def test_mean_std_interval_and_overlaps(tmp_path):
    from trainer.report.runs import Run
    from trainer.report.stats import groups, overlap_text, stats

    s = stats([90.0, 91.0, 92.5])
    assert s.n == 3 and s.mean == pytest.approx(91.1666667) and s.std == statistics.stdev([90.0, 91.0, 92.5])
    assert s.half_width == pytest.approx(4.3027 * s.std / math.sqrt(3))
    assert s.interval == pytest.approx((s.mean - s.half_width, s.mean + s.half_width))
    one = stats([90.0])
    assert one.std is None and one.interval is None

    def run(arch: str, acc: float, i: int) -> Run:
        return Run(f"{arch}-s{i}", tmp_path, "finished", "finished", {"arch": arch, "best_test_acc": acc})

    accs = {"a": [90.0, 91.0, 92.0], "b": [90.5, 91.5, 92.5], "c": [80.0, 80.5, 81.0], "d": [70.0]}
    found = groups([run(arch, acc, i) for arch, values in accs.items() for i, acc in enumerate(values)])
    assert [(g.arch, g.test.n) for g in found] == [("a", 3), ("b", 3), ("c", 3), ("d", 1)]
    text = overlap_text(found)
    assert "The 95% intervals of b and a overlap" in text and "The other 2 pair(s) do not overlap." in text
    assert "With one finished run, no interval: d." in text


# ---- the launcher: grid dry run, --yes, --seeds ------------------------------------------------


def srun_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(ln.strip())[1:] for ln in stdout.splitlines() if ln.strip().startswith("srun ")]


def test_grid_dry_run_lists_every_point(beton_dir, tmp_path):
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--local", "--dry-run", "--sweep", "g", "--runs",
               str(tmp_path), f"data.dir={beton_dir}", "optim.lr=0.05,0.1", "logging.tags=[a,b]")
    assert r.returncode == 0, r.stderr
    commands = srun_commands(r.stdout)
    assert len(commands) == 2
    for command, lr in zip(commands, ["0.05", "0.1"]):
        assert command[command.index("--run-dir") + 1] == str(tmp_path / "g" / f"resnet9_tiny-lr{lr}")
        assert f"optim.lr={lr}" in command and "logging.tags=[a,b]" in command
        assert [c for c in command if c.startswith("optim.lr=")] == [f"optim.lr={lr}"]
    assert list(tmp_path.iterdir()) == []

    # Each point's config is checked before anything runs.
    bad = launch("--arch", "resnet9_tiny", "--local", "--runs", str(tmp_path), f"data.dir={beton_dir}",
                 "optim.lr=0.05,fast")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "optim.lr: expected a number" in bad.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # three launches
def test_more_than_fifty_jobs_need_yes(beton_dir, tmp_path):
    lrs = ",".join(f"0.0{i}" for i in range(1, 8))
    # 7 architectures x 8 points (the last one invalid) = 56 jobs.
    args = ["--all", "--profile", "smoke", "--local", "--runs", str(tmp_path), f"data.dir={beton_dir}",
            f"optim.lr={lrs},fast"]
    r = launch(*args)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: 56 jobs (7 architecture(s) x 8 grid point(s) x 1 seed(s)): more than 50; add --yes")
    # With --yes the launch goes on to the next check (it would submit all 56): here, the bad point.
    r = launch(*args, "--yes")
    assert r.returncode == 1 and "optim.lr: expected a number" in r.stderr and "--yes" not in r.stderr
    assert list(tmp_path.iterdir()) == []

    r = launch("--all", "--profile", "smoke", "--local", "--runs", str(tmp_path), f"data.dir={beton_dir}",
               f"optim.lr={lrs},0.08", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "56 jobs: more than 50; submitting them needs --yes" in r.stdout and len(srun_commands(r.stdout)) == 56


def test_a_sweep_of_more_than_a_thousand_jobs_is_refused_even_with_yes(beton_dir, tmp_path):
    # #22: --seeds 200000 had no cap (1.4 million jobs listed before any check).
    r = launch("--all", "--local", "--seeds", "200000", "--yes", "--runs", str(tmp_path), f"data.dir={beton_dir}")
    assert r.returncode == 1 and r.stderr == (
        "error: 1400000 jobs (7 architecture(s) x 1 grid point(s) x 200000 seed(s)): one sweep holds at most 1000 "
        "(a SLURM job array's default MaxArraySize); split it into several sweeps\n")
    assert list(tmp_path.iterdir()) == []


def test_seeds_and_a_seed_override_exclude_each_other(beton_dir, tmp_path):
    r = launch("--arch", "resnet9_tiny", "--local", "--seeds", "2", "--runs", str(tmp_path), f"data.dir={beton_dir}",
               "train.seed=3")
    assert r.returncode == 1 and r.stderr == "error: --seeds sets train.seed (0..N-1) itself: drop the train.seed override\n"


# ---- a real 2-seed sweep -----------------------------------------------------------------------

SWEEP = "two"
NAMES = ["resnet9_tiny-s0", "resnet9_tiny-s1"]


@pytest.fixture(scope="module")
def two_seeds(beton_dir, tmp_path_factory):
    """`--seeds 2 --local --wait` of resnet9_tiny with the smoke profile (about a minute on 2 cores),
    its W&B runs offline so that their names can be read back."""
    runs = tmp_path_factory.mktemp("sweeps")
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--seeds", "2", "--local", "--wait", "--sweep", SWEEP,
               "--runs", str(runs), f"data.dir={beton_dir}", "logging.mode=offline")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return runs, r


def summaries(sweep: Path) -> dict[str, dict]:
    return {n: json.loads((sweep / n / "summary.json").read_text()) for n in NAMES}


@pytest.mark.slow
def test_each_seed_is_its_own_run(two_seeds):
    from trainer.config import load_config

    runs, _ = two_seeds
    sweep = runs / SWEEP
    record = sweep_record(runs, SWEEP)
    assert [(j["name"], j["arch"], j["seed"], j["point"]) for j in record["runs"]] == [
        ("resnet9_tiny-s0", "resnet9_tiny", 0, None), ("resnet9_tiny-s1", "resnet9_tiny", 1, None)]
    assert sorted(record["jobs"]) == NAMES and record["archs"] == ["resnet9_tiny"]
    assert {n: s["arch"] for n, s in summaries(sweep).items()} == dict.fromkeys(NAMES, "resnet9_tiny")
    assert [load_config(sweep / n / "config.yaml").train.seed for n in NAMES] == [0, 1]
    # Different seeds, different networks: the initial weights differ, so the trained ones do.
    a, b = (torch.load(sweep / n / "checkpoints/best.pt", weights_only=True)["model"] for n in NAMES)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    for name in NAMES:  # the W&B run is named after the run folder: which seed it is
        (wandb_file,) = (sweep / name / "wandb").glob("offline-run-*/run-*.wandb")
        (run,) = [rec.run for rec in read_records(wandb_file) if rec.WhichOneof("record_type") == "run"]
        assert run.display_name == name and run.run_group == SWEEP


@pytest.mark.slow
def test_report_gives_mean_std_and_interval_over_seeds(two_seeds):
    from trainer.report.stats import t975

    runs, r = two_seeds
    sweep = runs / SWEEP
    accs = [summaries(sweep)[n]["best_test_acc"] for n in NAMES]
    mean, std = statistics.fmean(accs), statistics.stdev(accs)
    half = 12.7062 * std / math.sqrt(2)
    assert t975(1) == 12.7062
    with open(sweep / "report.csv", newline="") as f:
        rows = {row["arch"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == NAMES
    for name, seed in zip(NAMES, (0, 1)):
        row = rows[name]
        assert row["architecture"] == "resnet9_tiny" and row["train_seed"] == str(seed) and row["point"] == ""
        assert int(row["n_seeds"]) == 2 and float(row["test_acc_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(row["test_acc_std"]) == pytest.approx(std, abs=1e-12)
        assert float(row["test_acc_ci95_low"]) == pytest.approx(mean - half, abs=1e-9)
        assert float(row["test_acc_ci95_high"]) == pytest.approx(mean + half, abs=1e-9)
    report = (sweep / "report.md").read_text()
    line = f"| resnet9_tiny | {mean:.2f} ± {std:.2f} (2) | [{mean - half:.2f}, {mean + half:.2f}] |"
    assert "## Over seeds" in report and line in report and line in r.stdout
    assert "Fewer than two architectures have an interval" in report  # one architecture: nothing to compare
    assert sorted(p.name for p in (sweep / "plots").iterdir()) == ["acc_vs_params.png", "acc_vs_seconds.png",
                                                                   "test_acc_curves.png", "train_loss_steps.png"]


@pytest.mark.slow
def test_status_skip_and_more_seeds_work_per_seed(two_seeds, beton_dir):
    runs, _ = two_seeds
    status = launch("--status", SWEEP, "--runs", str(runs))
    assert status.returncode == 0
    assert all(re.search(rf"^  {n}\s+FINISHED", status.stdout, re.MULTILINE) for n in NAMES), status.stdout

    common = ["--arch", "resnet9_tiny", "--profile", "smoke", "--local", "--sweep", SWEEP, "--runs", str(runs),
              f"data.dir={beton_dir}", "logging.mode=offline"]
    again = launch(*common, "--seeds", "2")
    assert again.returncode == 0 and again.stdout.count("finished already") == 2 and "nothing to submit" in again.stdout
    # One more seed: only seed 2 would train; the two finished ones are skipped, each by name.
    more = launch(*common, "--seeds", "3", "--dry-run")
    assert more.returncode == 0, more.stderr
    assert [c[c.index("--run-dir") + 1] for c in srun_commands(more.stdout)] == [str(runs / SWEEP / "resnet9_tiny-s2")]
    assert "train.seed=2" in srun_commands(more.stdout)[0]
    assert "resnet9_tiny-s0 finished already" in more.stdout and "resnet9_tiny-s1 finished already" in more.stdout


@pytest.mark.slow
def test_grid_report_picks_each_architectures_best_point(two_seeds, tmp_path):
    """The two trained runs as two grid points of one seed each: first without validation accuracy
    (chosen by best test accuracy, and said so), then with a val_acc that reverses the order."""
    from trainer.report import make_report

    runs, _ = two_seeds
    trained = summaries(runs / SWEEP)
    points = {"resnet9_tiny-lr0.1": ("lr0.1", NAMES[0]), "resnet9_tiny-lr0.2": ("lr0.2", NAMES[1])}
    grid = tmp_path / "grid"
    grid.mkdir()
    for name, (_, source) in points.items():
        shutil.copytree(runs / SWEEP / source, grid / name, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
        # as runs without a validation split (the smoke profile has one): selected on test
        path = grid / name / "summary.json"
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in summary.items() if k not in ("val_acc", "test_acc_at_best_val")}
                                   | {"selected_by": "test"}))
    record = {"sweep": "grid", "executor": "local", "profile": "smoke", "archs": ["resnet9_tiny"],
              "runs": [{"name": n, "arch": "resnet9_tiny", "point": p, "seed": None, "overrides": []}
                       for n, (p, _) in points.items()], "jobs": {}, "overrides": [], "cluster": {}}
    (grid / "sweep.json").write_text(json.dumps(record))

    def report() -> str:
        lines: list[str] = []
        make_report(grid, deploy=False, use_ensemble=False, wandb_mode="disabled", out=lines.append)
        return "\n".join(lines)

    acc = {p: trained[source]["best_test_acc"] for p, source in points.values()}
    by_test = max(acc, key=acc.get) if acc["lr0.1"] != acc["lr0.2"] else "lr0.1"  # a tie keeps the first
    text = report()
    assert "## Grid" in text and "## Over seeds" not in text  # one seed per point: no spread to show
    assert "since the summaries record no validation accuracy (val_acc)" in text
    assert f"Best points: resnet9_tiny: {by_test} ({acc[by_test]:.2f} (1))." in text
    with open(grid / "report.csv", newline="") as f:
        best = {row["point"]: row["best_point"] for row in csv.DictReader(f)}
    assert best == {p: str(p == by_test) for p in acc}

    # Validation accuracy, where recorded, chooses: here it prefers the other point.
    other = "lr0.2" if by_test == "lr0.1" else "lr0.1"
    for name, (point, _) in points.items():
        path = grid / name / "summary.json"
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "val_acc": 60.0 if point == other else 50.0}))
    text = report()
    assert "Best point: the highest mean validation accuracy (val_acc)" in text
    assert f"Best points: resnet9_tiny: {other} ({acc[other]:.2f} (1))." in text
    assert f"| resnet9_tiny | {other} | {acc[other]:.2f} (1) | 60.00 | ★ |" in text
