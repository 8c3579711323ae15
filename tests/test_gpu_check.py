"""The GPU check (jobs/gpu_check/): the data pack, run.sh's record of a run, and — slow or needing the
built .kit — the full-size round trip and run.sh end to end on the CPU."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

CHECK = REPO / "jobs/gpu_check"


# The folder holds scripts, not a package; its modules import each other as siblings, and their
# process pools pickle functions by module name: import them by their own names.
sys.path.insert(0, str(CHECK))
import pack_data  # noqa: E402
import unpack_data  # noqa: E402


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
        assert cfg.train.budget_s == 23 and cfg.train.patience == 0 and cfg.train.time_budget_s == 0
        assert cfg.train.compile is False and cfg.data.loader == "resident" and cfg.logging.mode == "disabled"


def _run_folder(folder: Path, arch: str, accs: list[float], summary: dict | None) -> None:
    """A run folder as the trainer leaves it: config.yaml, one metrics line per epoch, summary.json at the end."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model: {{arch: {arch}}}\ntrain: {{epochs: 150}}\n")
    rows = [{"epoch": i + 1, "test_acc": a, "elapsed_s": 5.0 * (i + 1), "images_per_s": 1000.0 + i} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))


def test_summarize_reports_each_part_and_what_did_not_finish(tmp_path):
    """A run cut off in the sweep: two step-bench files (one finished, one started), two speed seeds,
    a sweep with one finished job, one unfinished and one not started."""
    from trainer import provenance

    out = tmp_path / "out"
    (out / "step").mkdir(parents=True)
    stages = tmp_path / "stages.tsv"
    stages.write_text("install\t0\t3\t\nstep-alexnet\t0\t20\t\nstep-resnet\t124\t45\ttimed out after 45 s\nsweep\t124\t190\t"
                      "timed out after 190 s\n")
    row = {"eager_fp32": 5000.0, "amp": 9000.0, "compiled_amp": 12000.0, "step_ratio_amp": 1.8,
           "step_ratio_compiled_amp": 2.4, "compile_s": 21.5, "mfu": 0.31}
    header = {"device": "NVIDIA H100", "torch_version": "2.11", "step_settings": {"batch": 256, "steps": 10, "amp_dtype": "bfloat16"}}
    (out / "step" / "alexnet.json").write_text(json.dumps({**header, "parts_done": ["step"], "complete": True,
                                                           "step": {"alexnet": row}}))
    (out / "step" / "resnet.json").write_text(json.dumps({**header, "parts_done": [], "complete": False}))  # cut off
    done = {"test_acc": 93.5, "best_test_acc": 93.6, "best_epoch": 9, "epochs_run": 10, "params": 6.5e6, "wall_time_s": 20.0,
            "budget": None}
    _run_folder(out / "speed" / "s0", "resnet9", [80.0, 94.2, 93.5], {**done, "test_acc": 93.5})
    _run_folder(out / "speed" / "s1", "resnet9", [81.0], None)
    sweep = out / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"sweep": "gpu-check-x", "profile": "budget", "overrides": ["train.budget_s=23"],
                                                  "archs": ["alexnet", "mobilenet", "vgg_bn"],
                                                  "runs": [{"name": a, "arch": a} for a in ("alexnet", "mobilenet", "vgg_bn")]}))
    budget = {"budget_s": 23.0, "used_s": 22.1, "within_budget": True, "fitted_epochs": 4.5}
    _run_folder(sweep / "alexnet", "alexnet", [50.0, 61.25], {**done, "test_acc": 61.25, "best_test_acc": 61.25,
                                                              "best_epoch": 2, "epochs_run": 2, "budget": budget})
    _run_folder(sweep / "mobilenet", "mobilenet", [40.0], None)
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    (kit / "wheels" / "x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    r = subprocess.run([sys.executable, str(CHECK / "summarize.py"), str(out), "--command", "run.sh OUT", "--started", "now",
                        "--exit-code", "1", "--stages", str(stages), "--kit", str(kit), "--sweep", str(sweep)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p = json.loads((out / "provenance.json").read_text())
    assert p["code"]["git_sha"] == provenance.git_sha() and p["command"] == "run.sh OUT" and p["exit_code"] == 1
    assert p["stages"][2] == {"stage": "step-resnet", "exit_code": 124, "seconds": 45, "note": "timed out after 45 s"}
    assert p["software"]["torch_probe"]["torch"] and list(p["wheels_sha256"]) == ["x-1.0-py3-none-any.whl"]
    summary = (out / "summary.md").read_text()
    assert "stages that failed or timed out: step-resnet, sweep" in summary
    assert "| alexnet | 5,000 | 9,000 | 12,000 | 2.40x | 21.5 | 31% |" in summary
    assert "Started but not finished (time limit or failure; see run.log): resnet" in summary
    assert "| s0 | 93.50 | 10 | 20.0 | 10.0 (epoch 2) |" in summary and "| s1 | unfinished (1 epochs logged) |" in summary
    assert "Mean final test accuracy over 1 finished run(s): 93.50%" in summary
    assert "| alexnet | 61.25 | 61.25 | 2 | 2 / 150 | 23 / 22 | 4.5 |" in summary
    assert "| mobilenet | 40.00 (unfinished) |" in summary
    assert "Not finished: mobilenet (1 epochs logged, no summary.json); vgg_bn (not started)" in summary
    # A snapshot between parts (no exit code yet) says the run is still going.
    r = subprocess.run([sys.executable, str(CHECK / "summarize.py"), str(out), "--command", "run.sh OUT", "--started", "now",
                        "--stages", str(stages), "--kit", str(kit), "--sweep", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = (out / "summary.md").read_text()
    assert "run.sh still running" in summary and "(no sweep folder)" in summary


def test_run_sh_without_a_kit_fails_early_and_still_writes_its_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "KIT_DIR": str(tmp_path / "nokit"), "KIT_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    r = subprocess.run([str(CHECK / "run.sh"), "--cpu", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1
    assert "run jobs/gpu_check/build.sh here first" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "run.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "## Provenance" in summary and "(no stages recorded)" in summary and "(no sweep folder)" in summary
    assert subprocess.run([str(CHECK / "run.sh")], capture_output=True, text=True).returncode == 2  # no OUT


@pytest.mark.slow
def test_full_pack_is_bit_identical_to_the_shared_copy(real_cifar_source, tmp_path):
    """All 60,000 images (minutes on 2 cores): unpack(pack(x)) == x, read by read_split."""
    from trainer.data.cifar10 import read_split

    record = pack_data.pack(real_cifar_source, tmp_path / "cifar10.pack")
    assert record["fidelity"]["lossless"] and record["images"] == 60_000
    assert record["bytes"] < 30 * 2**20  # the device tool carries 64 MiB in all
    result = unpack_data.unpack(tmp_path / "cifar10.pack", tmp_path / "out")
    assert result["exact"] and result["images_differing"] == 0
    for split in ("train", "test"):
        mine, theirs = read_split(tmp_path / "out", split), read_split(real_cifar_source, split)
        assert np.array_equal(mine.images, theirs.images) and np.array_equal(mine.labels, theirs.labels)


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".kit/cifar10.pack").is_file() or not list((REPO / ".kit/wheels").glob("ffcv-*.whl")),
                    reason="needs the built .kit: run jobs/gpu_check/build.sh first")
def test_run_sh_cpu_end_to_end(tmp_path):
    """install, unpack + prepare, the step bench, a speed run, a two-network budget sweep, report, OUT's files."""
    out = tmp_path / "out"
    env = {**os.environ, "KIT_WORK": str(tmp_path / "work"), "PYTHON": os.environ.get("KIT_TEST_PYTHON", sys.executable),
           # the step bench on the smallest network: compiling each of the seven on 2 cores takes minutes
           "KIT_BENCH_ARGS": "--smoke", "KIT_STEP_ARCHS": "resnet9_tiny", "KIT_ARCHS": "alexnet,mobilenet"}
    r = subprocess.run([str(CHECK / "run.sh"), "--cpu", str(out)], capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stdout[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "report.md", "run.log", "speed", "step", "summary.md",
                                                    "sweep", "sweep.tar.gz"]
    p = json.loads((out / "provenance.json").read_text())
    assert [s["stage"] for s in p["stages"]] == ["install", "preflight", "unpack", "prepare", "step-resnet9_tiny", "speed-s0",
                                                 "sweep"]
    assert all(s["exit_code"] == 0 for s in p["stages"])
    assert p["data"]["unpacked"]["exact"] and p["data"]["pack"]["fidelity"]["lossless"]
    assert p["software"]["packages"]["ffcv"] == "1.0.2" and p["code"]["git_sha"]
    bench = json.loads((out / "step" / "resnet9_tiny.json").read_text())
    assert bench["complete"] and bench["parts_done"] == ["step"] and list(bench["step"]) == ["resnet9_tiny"]
    for arch in ("alexnet", "mobilenet"):
        # the sweep's jobs were fitted to the budget run.sh gave them, and their files were copied as they ended
        s = json.loads((out / "sweep" / arch / "summary.json").read_text())
        assert s["budget"]["budget_s"] == 8 and s["budget"]["fitted_steps"] > 0
    assert json.loads((out / "speed" / "s0" / "summary.json").read_text())["epochs_run"] == 1
    assert json.loads((out / "sweep" / "sweep.json").read_text())["profile"] == "budget"
    summary = (out / "summary.md").read_text()
    assert "| alexnet |" in summary and "| mobilenet |" in summary and "every stage exited 0" in summary and "run.sh exit code 0" in summary
    assert "| resnet9_tiny |" in summary and "| s0 |" in summary and "Not finished" not in summary and "Started but not finished" not in summary
    listing = subprocess.run(["tar", "tzf", str(out / "sweep.tar.gz")], capture_output=True, text=True).stdout
    assert "alexnet/summary.json" in listing and "mobilenet/metrics.jsonl" in listing and ".pt" not in listing
