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


def test_gpu_check_profile_resolves_for_every_seed_architecture(beton_dir):
    from trainer import models
    from trainer.config import load_config
    from trainer.launch import config_path, load_profiles

    overrides = load_profiles()["gpu_check"]
    for arch in models.seed_names():
        cfg = load_config(config_path(arch), [f"model.arch={arch}", *overrides, f"data.dir={beton_dir}"])
        assert cfg.logging.mode == "disabled" and cfg.train.patience == 0
        assert 0 < cfg.train.time_budget_s and cfg.train.epochs <= 20 and cfg.train.compile is False


def test_summarize_records_the_code_stages_and_a_partial_bench(tmp_path):
    from trainer import provenance

    out = tmp_path / "out"
    out.mkdir()
    stages = tmp_path / "stages.tsv"
    stages.write_text("install\t0\t3\t\nbench\t124\t190\ttimed out after 190 s\n")
    # What trainer.bench leaves when it is stopped after its first part.
    (out / "bench.json").write_text(json.dumps({"mode": "full", "parts_done": ["loader"], "complete": False,
                                                "loader_ratio_ffcv": 8.0, "loader_ratio_resident": 30.5}))
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    (kit / "wheels" / "x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    r = subprocess.run([sys.executable, str(CHECK / "summarize.py"), str(out), "--command", "run.sh OUT", "--started", "now",
                        "--exit-code", "1", "--stages", str(stages), "--kit", str(kit), "--sweep", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p = json.loads((out / "provenance.json").read_text())
    assert p["code"]["git_sha"] == provenance.git_sha() and p["command"] == "run.sh OUT" and p["exit_code"] == 1
    assert p["stages"][1] == {"stage": "bench", "exit_code": 124, "seconds": 190, "note": "timed out after 190 s"}
    assert p["software"]["torch_probe"]["torch"] and list(p["wheels_sha256"]) == ["x-1.0-py3-none-any.whl"]
    summary = (out / "summary.md").read_text()
    assert "stages that failed or timed out: bench" in summary and "(no sweep folder)" in summary
    assert "incomplete: the bench stage ended with exit 124 timed out after 190 s" in summary
    assert "parts loader" in summary and "loader_ratio_ffcv: 8.00x" in summary


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
    """install, unpack + prepare, a smoke-sized bench, a two-network sweep, report, OUT's files."""
    out = tmp_path / "out"
    env = {**os.environ, "KIT_WORK": str(tmp_path / "work"), "PYTHON": os.environ.get("KIT_TEST_PYTHON", sys.executable),
           "KIT_BENCH_ARGS": "--smoke", "KIT_ARCHS": "alexnet,mobilenet"}
    r = subprocess.run([str(CHECK / "run.sh"), "--cpu", str(out)], capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stdout[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "provenance.json", "report.md", "run.log", "summary.md",
                                                    "sweep.tar.gz"]
    p = json.loads((out / "provenance.json").read_text())
    assert [s["stage"] for s in p["stages"]] == ["install", "preflight", "unpack", "prepare", "bench", "sweep"]
    assert all(s["exit_code"] == 0 for s in p["stages"])
    assert p["data"]["unpacked"]["exact"] and p["data"]["pack"]["fidelity"]["lossless"]
    assert p["software"]["packages"]["ffcv"] == "1.0.2" and p["code"]["git_sha"]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] and bench["parts_done"] == ["loader", "step"]
    summary = (out / "summary.md").read_text()
    assert "| alexnet |" in summary and "| mobilenet |" in summary and "every stage exited 0" in summary and "run.sh exit code 0" in summary
    assert "complete): parts loader, step" in summary
    listing = subprocess.run(["tar", "tzf", str(out / "sweep.tar.gz")], capture_output=True, text=True).stdout
    assert "alexnet/summary.json" in listing and "mobilenet/metrics.jsonl" in listing and ".pt" not in listing
