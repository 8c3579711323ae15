"""The GPU check (jobs/gpu_check/): the data pack, the time plan, run.sh's record of a run, and — slow —
the full-size round trip and run.sh end to end on the CPU against the device tool's output contract,
with ffcv and without it, on a kit built here (a pack of the synthetic CIFAR-10, no wheels)."""

import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO

CHECK = REPO / "jobs/gpu_check"


# The folder holds scripts, not a package; its modules import each other as siblings, and their
# process pools pickle functions by module name: import them by their own names.
sys.path.insert(0, str(CHECK))
import pack_data  # noqa: E402
import plan  # noqa: E402
import unpack_data  # noqa: E402

ALLOWED_OUT = {"summary.md", "results.json", "provenance.json", "run.log", "results.tar.gz"}


@pytest.fixture(scope="module")
def small_pack(cifar_source, tmp_path_factory) -> tuple[Path, dict]:
    """The first 300 images of every batch of the synthetic CIFAR-10, packed."""
    out = tmp_path_factory.mktemp("pack") / "small.pack"
    record = pack_data.pack(cifar_source, out, limit=300, workers=2)
    return out, record


def test_pack_sidecar_records_source_sizes_and_fidelity(small_pack, cifar_source):
    path, record = small_pack
    on_disk = json.loads(path.with_name("small.pack.json").read_text())
    assert on_disk == record
    assert record["images"] == 6 * 300 and record["bytes"] == path.stat().st_size
    assert set(record["source"]["files"]) == {*pack_data.BATCH_FILES, "batches.meta"}
    assert record["source"]["files"]["test_batch"]["bytes"] == (cifar_source / "test_batch").stat().st_size
    assert record["encoder"]["quality"] == 75 and record["encoder"]["subsampling"] == "4:2:0"
    # Whatever the JPEG layer loses, the stored corrections give every pixel back.
    assert record["fidelity"] == {"images": 1800, "identical_images": 1800, "mean_abs_error": 0.0, "max_abs_error": 0,
                                  "psnr_db": None, "lossless": True}
    assert record["fidelity_jpeg_layer_only"]["images"] == 1800 and record["sizes_bytes"]["header"] > 500


def test_pack_of_the_shared_copy_reencodes_most_images_exactly(real_cifar_source, tmp_path):
    """The shared copy is decoded q75 4:2:0 JPEG: re-encoded so, most images come back exactly and
    the rest closely, in about 300 bytes each once the shared header is stored once (3,072 raw)."""
    record = pack_data.pack(real_cifar_source, tmp_path / "real.pack", limit=300, workers=2)
    jpeg = record["fidelity_jpeg_layer_only"]
    assert 0.4 * jpeg["images"] < jpeg["identical_images"] < jpeg["images"]
    assert 0 < jpeg["mean_abs_error"] < 1 and jpeg["psnr_db"]["overall"] > 40
    assert record["fidelity"]["lossless"]
    assert record["sizes_bytes"]["payload"] / record["images"] < 450


def test_unpack_gives_the_official_layout_back_within_the_recorded_fidelity(small_pack, cifar_source, tmp_path):
    from trainer.data.cifar10 import read_batch, read_meta

    path, record = small_pack
    out = tmp_path / "cifar-10-batches-py"
    result = unpack_data.unpack(path, out, workers=2)
    assert result["exact"] and result["images"] == 1800 and result["images_differing"] == 0
    assert json.loads((out / "unpack.json").read_text()) == result
    assert sorted(p.name for p in out.iterdir()) == sorted([*pack_data.BATCH_FILES, "batches.meta", "unpack.json"])
    assert read_meta(out) == read_meta(cifar_source)
    for name in pack_data.BATCH_FILES:
        images, labels = read_batch(out / name)
        src_images, src_labels = read_batch(cifar_source / name)
        diff = np.abs(images.astype(int) - src_images[:300])
        assert diff.mean() <= record["fidelity"]["mean_abs_error"] and diff.max() <= record["fidelity"]["max_abs_error"]
        assert np.array_equal(labels, src_labels[:300])
    # The batch dicts hold what the originals hold, readable torchvision-style (latin1) too.
    def text(value):  # the source's pickles may hold bytes (Python 2's str) where the unpacked ones hold str
        return value.decode("latin1") if isinstance(value, bytes) else value

    mine = pickle.load((out / "data_batch_2").open("rb"), encoding="latin1")
    theirs = {text(k): v for k, v in pickle.load((cifar_source / "data_batch_2").open("rb"), encoding="latin1").items()}
    assert sorted(mine) == sorted(theirs) == ["batch_label", "data", "filenames", "labels"]
    assert mine["batch_label"] == text(theirs["batch_label"]) and mine["filenames"] == [text(f) for f in theirs["filenames"][:300]]
    assert mine["data"].dtype == np.uint8 and mine["data"].shape == (300, 3072)


def test_unpack_counts_images_that_do_not_decode_to_the_source(small_pack, tmp_path):
    """As a different JPEG decoder would cause: the per-image CRC-32s catch it and say how many."""
    path, _ = small_pack
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["crc32"][[3, 301, 1799]] ^= 1  # three images (batches 1, 2 and the test batch) no longer match
    bad = tmp_path / "bad.pack"
    with bad.open("wb") as f:
        np.savez(f, **arrays)
    result = unpack_data.unpack(bad, tmp_path / "out", workers=1)
    assert result["images_differing"] == 3
    assert [b["images_differing"] for b in result["batches"]] == [1, 1, 0, 0, 0, 1]
    assert result["exact"]  # the pixels themselves are still the source's (their SHA-256 says so)


def test_unpack_cli_rejects_what_is_not_a_pack(tmp_path):
    junk = tmp_path / "junk.pack"
    junk.write_bytes(b"not a pack")
    r = subprocess.run([sys.executable, str(CHECK / "unpack_data.py"), str(junk), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "not a readable CIFAR-10 pack" in r.stderr


def test_pack_cli_reads_the_batches_with_the_projects_reader(cifar_source, tmp_path):
    """A damaged batch file is one error line naming it (trainer.data.cifar10's restricted reader),
    and no pack is written."""
    source = tmp_path / "cifar-10-batches-py"
    source.mkdir()
    for f in cifar_source.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    (source / "data_batch_3").write_bytes((cifar_source / "data_batch_3").read_bytes()[:5000])
    out = tmp_path / "x.pack"
    r = subprocess.run([sys.executable, str(CHECK / "pack_data.py"), "--source", str(source), "--out", str(out), "--limit", "10"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and "data_batch_3: truncated or malformed" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_budget_profile_resolves_as_run_sh_runs_it(beton_dir):
    # run.sh's sweep: the budget profile, then its own overrides (W&B off: not installed there; the
    # per-job budget it computes from the time left), for every seed architecture.
    from trainer import models
    from trainer.config import load_config
    from trainer.launch import config_path, load_profiles

    overrides = load_profiles()["budget"]
    for arch in models.seed_names():
        cfg = load_config(config_path(arch), [f"model.arch={arch}", *overrides, f"data.dir={beton_dir}",
                                              "logging.mode=disabled", "train.budget_s=23"])
        assert cfg.train.budget_s == 23 and cfg.train.patience == 0
        assert cfg.train.compile is False and cfg.data.loader == "resident" and cfg.logging.mode == "disabled"


# ---- the time plan ------------------------------------------------------------------------------


def test_the_plan_fits_the_device_command_even_when_every_stage_runs_to_its_limit():
    assert plan.TOTAL_S <= 480
    assert plan.worst_case_s() <= plan.TOTAL_S
    assert list(plan.FIXED_S) == ["install", "preflight", "unpack", "prepare", "gpu-tests", "speed"]
    assert plan.FIXED_S["preflight"] <= 30 and plan.FIXED_S["gpu-tests"] <= 45
    # the sweep's limit when everything before it used its whole limit, and the step bench's after it
    left = plan.TOTAL_S - sum(plan.FIXED_S.values()) - plan.BOOKKEEPING_S
    s = plan.sweep(left, jobs=7, cpu=False)
    assert s["limit_s"] >= plan.SWEEP_MIN_S and s["budget_s"] == plan.MIN_JOB_BUDGET_S and s["budget_cut"]
    assert plan.report(left - s["limit_s"], cpu=False) == 0  # a sweep cut off then: its report would eat the bench's time
    assert plan.step(left - s["limit_s"], cpu=False) >= plan.STEP_MIN_S
    assert plan.sweep(plan.STEP_MIN_S + plan.WRAP_UP_S + 20, jobs=7, cpu=False)["limit_s"] == 0  # too little: skipped
    assert sum(plan.FIXED_S.values()) + plan.BOOKKEEPING_S + s["limit_s"] + plan.STEP_MIN_S + plan.WRAP_UP_S <= plan.TOTAL_S


def test_the_sweep_budget_is_the_time_left_at_most_the_profiles():
    assert plan.profile_budget() == 60  # jobs/profiles.yaml's budget profile
    s = plan.sweep(337, jobs=7, cpu=False)
    assert s["limit_s"] == 337 - plan.STEP_MIN_S - plan.WRAP_UP_S
    assert s["budget_s"] == (s["limit_s"] - plan.REPORT_S) // 7 - plan.JOB_START_S and s["budget_cut"]
    roomy = plan.sweep(2000, jobs=2, cpu=False)
    assert roomy["budget_s"] == 60 and not roomy["budget_cut"]
    cpu = plan.sweep(0, jobs=1, cpu=True, budget=8)  # --cpu: no deadline, the budget given
    assert (cpu["limit_s"], cpu["budget_s"], cpu["budget_cut"]) == (plan.CPU_LIMIT_S, 8, True)
    r = subprocess.run([sys.executable, str(CHECK / "plan.py"), "--shell"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "PLAN_TOTAL_S=480" in r.stdout and "LIMIT_GPU_TESTS=45" in r.stdout


# ---- summarize.py -----------------------------------------------------------------------------------


def _run_folder(folder: Path, arch: str, accs: list[float], summary: dict | None, epochs: int = 150) -> None:
    """A run folder as the trainer leaves it: config.yaml, one metrics line per evaluation, summary.json at the end."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model: {{arch: {arch}}}\ntrain: {{epochs: {epochs}}}\n")
    rows = [{"epoch": i + 1, "test_acc": a, "elapsed_s": 5.0 * (i + 1), "images_per_s": 1000.0 + i} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))


def _summarize(out: Path, keep: Path, kit: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK / "summarize.py"), str(out), "--keep", str(keep), "--command", "run.sh OUT",
                           "--started", "now", "--kit", str(kit), *extra], capture_output=True, text=True, timeout=300)


def test_summarize_reports_each_part_what_was_cut_off_and_a_cut_budget(tmp_path):
    """A run cut off in the step bench (after eager and AMP of both architectures, one compile): a speed run,
    a sweep whose budget was cut below the profile's with one finished job, one unfinished, one not started."""
    from trainer import provenance

    out, keep, kit = tmp_path / "out", tmp_path / "keep", tmp_path / "kit"
    out.mkdir()
    (kit / "wheels").mkdir(parents=True)
    (kit / "wheels" / "x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    keep.mkdir()
    (keep / "stages.tsv").write_text("install\t0\t3\t\npreflight\t0\t9\t\nprepare\t0\t0\tskipped: ffcv does not import here\n"
                                     "gpu-tests\t0\t20\t\nspeed\t0\t70\t\nsweep\t124\t190\ttimed out after 190 s\n"
                                     "step\t124\t60\ttimed out after 60 s\n")
    (keep / "plan.json").write_text(json.dumps(plan.plan(cpu=False)))
    (keep / "preflight.json").write_text(json.dumps({"python": "3.12.3", "torch_version": "2.11.0", "cuda": "12.8", "device": "NVIDIA H100 80GB HBM3",
                                                     "memory_gib": 79.1, "capability": "9.0", "bf16": True, "ffcv": {"ok": False, "error": "ImportError: x"},
                                                     "submitit": {"ok": True}, "pytest": {"ok": True}}))
    (keep / "data.json").write_text(json.dumps({"path": "batch files, no ffcv", "dir": "/w/cifar-10-batches-py", "why": "ffcv does not import here"}))
    (keep / "gpu-tests.txt").write_text("..s\nFAILED tests/test_x.py::test_y - boom\n==== 1 failed, 2 passed, 1 skipped, 30 deselected in 4.10s ====\n")
    row = {"eager_fp32": 5000.0, "amp": 9000.0, "compiled_amp": 12000.0, "step_ratio_amp": 1.8, "step_ratio_compiled_amp": 2.4,
           "compile_s": 21.5, "mfu": 0.31, "modes_done": ["eager_fp32", "amp", "compiled_amp"], "complete": True, "errors": {}}
    cut = {**row, "compiled_amp": None, "step_ratio_compiled_amp": None, "compile_s": None, "mfu": None,
           "modes_done": ["eager_fp32", "amp"], "complete": False}
    (keep / "step.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "torch_version": "2.11.0", "parts_done": [],
                                                "complete": False, "step_settings": {"batch": 256, "steps": 10, "amp_dtype": "bfloat16"},
                                                "step": {"alexnet": row, "efficientnet": cut}}))
    done = {"test_acc": 93.5, "best_test_acc": 93.6, "best_epoch": 9, "epochs_run": 10, "params": 2.0e6, "wall_time_s": 20.0, "budget": None}
    _run_folder(keep / "speed" / "s0", "airbench94", [94.2], {**done, "test_acc": 94.2}, epochs=10)
    sweep = keep / "runs" / "gpu-check-x"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"sweep": "gpu-check-x", "profile": "budget", "overrides": ["train.budget_s=19"],
                                                  "archs": ["alexnet", "mobilenet", "vgg_bn"],
                                                  "runs": [{"name": a, "arch": a, "point": None, "seed": None, "overrides": []}
                                                           for a in ("alexnet", "mobilenet", "vgg_bn")]}))
    (keep / "sweep-plan.json").write_text(json.dumps(plan.sweep(200, jobs=3, cpu=False)))
    budget = {"budget_s": 19.0, "used_s": 18.1, "within_budget": True, "fitted_epochs": 4.5}
    _run_folder(sweep / "alexnet", "alexnet", [61.25], {**done, "test_acc": 61.25, "best_test_acc": 61.25, "best_epoch": 4,
                                                        "epochs_run": 4, "params": 3.2e6, "budget": budget})
    (sweep / "alexnet" / "last.pt").write_bytes(b"\0" * 4096)  # a checkpoint: never in the tarball
    _run_folder(sweep / "mobilenet", "mobilenet", [], None)

    r = _summarize(out, keep, kit)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "results.json", "summary.md"]  # no tarball before the end
    res = json.loads((out / "results.json").read_text())
    assert res["running"] and res["exit_code"] is None
    assert res["data"]["path"] == "batch files, no ffcv"
    assert res["step"]["part_finished"] is False and res["step"]["rows"]["efficientnet"]["modes_done"] == ["eager_fp32", "amp"]
    assert res["speed"][0]["seed"] == 0 and res["speed"][0]["test_acc"] == 94.2 and res["speed"][0]["time_to_target_s"] == 5.0
    sw = res["sweep"]
    assert sw["budget_s"] == 19 and sw["profile_budget_s"] == 60 and sw["budget_cut"]
    assert [(x["name"], x["finished"]) for x in sw["rows"]] == [("alexnet", True), ("mobilenet", False), ("vgg_bn", False)]
    assert res["gpu_tests"]["counts"] == {"failed": 1, "passed": 2, "skipped": 1, "deselected": 30}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check\n\nrun.sh still running")
    assert "budget cut to 19 s per network (profile: 60 s): these are not the budget profile's numbers" in summary.lower()
    assert "data path: **batch files, no ffcv (data.format=python, resident loader)** (ffcv does not import here)" in summary
    assert "| alexnet | 61.25 | 61.25 (4) | 4 / 150 | 19 / 18 | 4.5 | 3.2 | 1,000 |" in summary
    assert "Not finished: mobilenet (0 evaluations logged, no summary.json); vgg_bn (not started)" in summary
    assert "| 0 | airbench94 | 94.20 | 10 | 20.0 | 5.0 (epoch 1) |" in summary
    assert "**cut off: the rows below are what it measured**" in summary
    assert "| efficientnet | 5,000 | 9,000 | - | - | - | - | eager_fp32, amp |" in summary
    assert "| alexnet | 5,000 | 9,000 | 12,000 | 2.40 | 21.5 | 31% | all |" in summary
    assert "gpu-marked tests: exit 0, 1 failed, 2 passed, 1 skipped, 30 deselected in 4.10s; FAILED tests/test_x.py::test_y - boom" in summary
    assert "| sweep | 124 | 190 |  | timed out after 190 s |" in summary and "| total | | 352 | 480 | |" in summary
    assert len(summary) < 8000
    p = json.loads((out / "provenance.json").read_text())
    assert p["code"]["git_sha"] == provenance.git_sha() and p["command"] == "run.sh OUT" and p["finished"] is None
    assert list(p["wheels_sha256"]) == ["x-1.0-py3-none-any.whl"] and p["software"]["preflight"]["device"].startswith("NVIDIA")

    # The end: the tarball (no checkpoint), the exit code.
    r = _summarize(out, keep, kit, "--exit-code", "1", "--final")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "results.json", "results.tar.gz", "summary.md"]
    res = json.loads((out / "results.json").read_text())
    assert res["exit_code"] == 1 and not res["running"]
    assert res["tarball"]["left_out"] == ["runs/gpu-check-x/alexnet/last.pt (4,096 bytes: a checkpoint)"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "results/step.json" in names and "results/runs/gpu-check-x/alexnet/summary.json" in names and len(names) == res["tarball"]["files"]
    assert not any(n.endswith(".pt") for n in names)
    assert "run.sh exit code 1; stages that failed or timed out: sweep, step" in (out / "summary.md").read_text()


def test_summarize_says_so_when_the_budget_is_the_profiles(tmp_path):
    keep, kit = tmp_path / "keep", tmp_path / "kit"
    keep.mkdir()
    (kit / "wheels").mkdir(parents=True)
    (keep / "sweep-plan.json").write_text(json.dumps(plan.sweep(2000, jobs=7, cpu=False)))
    r = _summarize(tmp_path, keep, kit)
    assert r.returncode == 0, r.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "Budget per network: 60 s, the profile's own." in summary and "cut" not in summary.lower().split("## budget sweep")[1].split("##")[0]


def test_run_sh_without_a_kit_fails_early_and_still_writes_its_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "KIT_DIR": str(tmp_path / "nokit"), "KIT_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    r = subprocess.run([str(CHECK / "run.sh"), "--cpu", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1
    assert "run jobs/gpu_check/build.sh here first" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(ALLOWED_OUT)
    summary = (out / "summary.md").read_text()
    assert r.stdout.endswith(summary)
    assert "(no stages recorded)" in summary and "(no sweep)" in summary and "(no speed run)" in summary
    assert subprocess.run([str(CHECK / "run.sh")], capture_output=True, text=True).returncode == 2  # no OUT


# ---- run.sh end to end on the CPU ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini_kit(tmp_path_factory) -> Path:
    """A kit as build.sh makes it, small: the pack of a synthetic CIFAR-10 of 300 images a batch, and a
    wheels folder without wheels (this Python has the packages)."""
    from conftest import write_synthetic_cifar10

    kit = tmp_path_factory.mktemp("kit")
    source = write_synthetic_cifar10(tmp_path_factory.mktemp("source") / "cifar-10-batches-py", per_batch=300)
    pack_data.pack(source, kit / "cifar10.pack", workers=2)
    (kit / "wheels").mkdir()
    return kit


def run_check(kit: Path, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "KIT_DIR": str(kit), "KIT_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           # the smallest networks and bench: the path, not the numbers
           "KIT_ARCHS": "alexnet", "KIT_STEP_ARCHS": "resnet9_tiny", "KIT_BENCH_ARGS": "--smoke", "KIT_TIME_BUDGET": "6", **env}
    r = subprocess.run([str(CHECK / "run.sh"), "--cpu", str(out)], capture_output=True, text=True, timeout=900, env=env)
    return r, out


def assert_contract(stdout: str, out: Path) -> tuple[dict, str]:
    """What the device tool brings back: at most 6 files, flat, named as agreed, each within 16 MiB, and the
    output's tail (`stdout`, run.sh's) is summary.md itself."""
    files = list(out.iterdir())
    assert len(files) <= 6 and all(p.is_file() for p in files), files
    assert {p.name for p in files} == ALLOWED_OUT
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    summary = (out / "summary.md").read_text()
    assert stdout.endswith(summary) and len(summary) < 8000
    assert stdout[: -len(summary)].rstrip().splitlines()[-1].startswith("[check")  # nothing between the log and it
    return json.loads((out / "results.json").read_text()), summary


@pytest.mark.slow
def test_run_sh_cpu_meets_the_output_contract(mini_kit, tmp_path):
    """install (no wheels: skipped), preflight, unpack + prepare, the gpu tests (skipped here), the speed run,
    a one-network budget sweep with its report, the step bench last; OUT as the device tool returns it.
    The step bench compiles with aot_eager: the stage's path without inductor's cold minute of code
    generation on this CPU (test_gpu_paths' cold compile runs inductor)."""
    r, out = run_check(mini_kit, tmp_path, TRAINER_COMPILE_BACKEND="aot_eager")
    assert r.returncode == 0, r.stdout[-4000:]
    res, summary = assert_contract(r.stdout, out)
    stages = [(s["stage"], s["exit_code"]) for s in res["stages"]]
    assert stages == [("install", 0), ("preflight", 0), ("unpack", 0), ("prepare", 0), ("gpu-tests", 0), ("speed", 0),
                      ("sweep", 0), ("step", 0)]
    assert res["stages"][0]["note"].startswith("skipped: the kit has no wheels")
    assert res["preflight"]["ffcv"]["ok"] and res["data"]["path"] == "ffcv .beton"
    assert res["gpu_tests"]["exit_code"] == 0 and res["gpu_tests"]["summary_line"]  # without CUDA they skip
    assert res["speed"][0]["finished"] and res["speed"][0]["epochs_run"] == 1
    sweep = res["sweep"]
    assert sweep["profile"] == "budget" and sweep["budget_s"] == 6 and sweep["profile_budget_s"] == 60 and sweep["budget_cut"]
    assert sweep["rows"][0]["name"] == "alexnet" and sweep["rows"][0]["finished"] and sweep["rows"][0]["budget_s"] == 6
    assert sweep["report_md"]
    assert res["step"]["part_finished"] and res["step"]["rows"]["resnet9_tiny"]["complete"]
    assert res["step"]["settings"]["compile_backend"] == "aot_eager"
    assert res["plan"]["total_s"] is None and res["exit_code"] == 0 and not res["running"]
    assert "run.sh exit code 0; every stage exited 0" in summary and "data path: **ffcv .beton**" in summary
    assert "budget cut to 6 s per network (profile: 60 s)" in summary.lower()
    assert "| alexnet |" in summary and "| resnet9_tiny |" in summary and "Not finished" not in summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "results/step.json" in names and "results/speed/s0/summary.json" in names and "results/gpu-tests.txt" in names
    assert any(n.endswith("alexnet/metrics.jsonl") for n in names) and any(n.endswith("/report.md") for n in names)
    assert not any(n.endswith(".pt") for n in names)
    p = json.loads((out / "provenance.json").read_text())
    assert p["data"]["unpacked"]["exact"] and p["data"]["pack"]["fidelity"]["lossless"] and p["code"]["git_sha"]


@pytest.mark.slow
def test_run_sh_cpu_without_ffcv_trains_on_the_batch_files_and_a_stop_keeps_the_step_rows(mini_kit, tmp_path):
    """ffcv that does not import (here: hidden by a package that raises ImportError, which every process of
    the run inherits through PYTHONPATH): no prepare, and the speed run and the sweep read the unpacked
    batch files with the resident loader. Then run.sh is stopped (TERM, as a device tool's limit would)
    while the step bench compiles: the eager and AMP rows measured so far are in results.json and
    summary.md, the stage is recorded as cut off, and the output still ends with summary.md. (One run for
    both: the stop comes in the last stage, after the parts that read the data.)"""
    hidden = tmp_path / "hide-ffcv" / "ffcv"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("ffcv hidden by the test")\n')
    out, step_json = tmp_path / "out", tmp_path / "work/keep/step.json"
    env = {**os.environ, "KIT_DIR": str(mini_kit), "KIT_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(hidden.parent), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "KIT_SKIP": "gpu-tests", "KIT_ARCHS": "alexnet", "KIT_TIME_BUDGET": "6",  # the gpu tests read no data
           "KIT_STEP_ARCHS": "resnet9_tiny,alexnet", "KIT_BENCH_ARGS": "--smoke"}
    proc = subprocess.Popen([str(CHECK / "run.sh"), "--cpu", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                rows = json.loads(step_json.read_text()).get("step") or {}
            except (OSError, ValueError):
                rows = {}
            if len(rows) == 2 and all("amp" in r["modes_done"] for r in rows.values()):
                break
            time.sleep(0.1)
        proc.terminate()
        stdout = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143, stdout[-3000:]
    res, summary = assert_contract(stdout, out)
    stages = [(s["stage"], s["exit_code"]) for s in res["stages"]]
    assert stages == [("install", 0), ("preflight", 0), ("unpack", 0), ("prepare", 0), ("gpu-tests", 0), ("speed", 0),
                      ("sweep", 0), ("step", 143)]

    # without ffcv
    assert res["preflight"]["ffcv"] == {"ok": False, "error": "ImportError: ffcv hidden by the test",
                                        "seconds": res["preflight"]["ffcv"]["seconds"]}
    prepare = next(s for s in res["stages"] if s["stage"] == "prepare")
    assert prepare["note"].startswith("skipped: ffcv does not import here")
    assert res["data"]["path"] == "batch files, no ffcv" and res["data"]["dir"].endswith("cifar-10-batches-py")
    assert "data path: **batch files, no ffcv (data.format=python, resident loader)**" in summary
    assert res["speed"][0]["finished"] and res["sweep"]["rows"][0]["finished"]
    for run in (tmp_path / "work/keep/speed/s0", next((tmp_path / "work/keep/runs").glob("*/alexnet"))):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["data"]["format"] == "python" and cfg["data"]["loader"] == "resident"
    assert not (tmp_path / "work/data").exists()  # no .beton was written

    # stopped in the step bench
    assert res["exit_code"] == 143 and res["stages"][-1]["stage"] == "step"
    assert res["stages"][-1]["note"] == "cut off: run.sh was stopped"
    assert not res["step"]["part_finished"]
    for row in res["step"]["rows"].values():
        assert row["eager_fp32"] > 0 and row["amp"] > 0
    assert "**cut off: the rows below are what it measured**" in summary
    assert "stages that failed or timed out: step" in summary
