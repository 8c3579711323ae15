"""The GPU run kit (jobs/gpu_kit/): the data pack, the scripts' bookkeeping, and — slow or opt-in —
the full-size round trip, the wheelhouse build and run.sh end to end on the CPU."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

KIT = REPO / "jobs/gpu_kit"


# The kit's folder holds scripts, not a package; its modules import each other as siblings, and
# their process pools pickle functions by module name: import them by their own names.
sys.path.insert(0, str(KIT))
import pack_data  # noqa: E402
import unpack_data  # noqa: E402


@pytest.fixture(scope="module")
def small_pack(cifar_source, tmp_path_factory) -> tuple[Path, dict]:
    """The first 300 images of every batch of the shared copy, packed."""
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
    # The shared copy is decoded q75 4:2:0 JPEG: re-encoded so, most images come back exactly and
    # the rest closely; the stored corrections make the whole pack exact.
    jpeg = record["fidelity_jpeg_layer_only"]
    assert 0.4 * jpeg["images"] < jpeg["identical_images"] < jpeg["images"]
    assert 0 < jpeg["mean_abs_error"] < 1 and jpeg["psnr_db"]["overall"] > 40
    assert record["fidelity"] == {"images": 1800, "identical_images": 1800, "mean_abs_error": 0.0, "max_abs_error": 0,
                                  "psnr_db": None, "lossless": True}
    # about 300 bytes of JPEG per image once the shared header is stored once, against 3,072 raw
    assert record["sizes_bytes"]["payload"] / record["images"] < 450 and record["sizes_bytes"]["header"] > 500


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
    mine = pickle.load((out / "data_batch_2").open("rb"), encoding="latin1")
    theirs = pickle.load((cifar_source / "data_batch_2").open("rb"), encoding="latin1")
    assert sorted(mine) == sorted(theirs) == ["batch_label", "data", "filenames", "labels"]
    assert mine["batch_label"] == theirs["batch_label"] and mine["filenames"] == theirs["filenames"][:300]
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
    r = subprocess.run([sys.executable, str(KIT / "unpack_data.py"), str(junk), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "not a readable CIFAR-10 pack" in r.stderr


def test_gpu_kit_profile_resolves_for_every_seed_architecture(beton_dir):
    from trainer import models
    from trainer.config import load_config
    from trainer.launch import config_path, load_profiles

    overrides = load_profiles()["gpu_kit"]
    for arch in models.seed_names():
        cfg = load_config(config_path(arch), [f"model.arch={arch}", *overrides, f"data.dir={beton_dir}"])
        assert cfg.logging.mode == "disabled" and cfg.train.patience == 0
        assert 0 < cfg.train.time_budget_s and cfg.train.epochs <= 20 and cfg.train.compile is False


def test_provenance_stamp_then_record_compares_the_code(tmp_path):
    stamp = tmp_path / "stamp.json"
    r = subprocess.run([sys.executable, str(KIT / "provenance.py"), "stamp", "--out", str(stamp)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(stamp.read_text())
    assert "jobs/gpu_kit/run.sh" in s["files"] and "trainer/train.py" in s["files"]
    assert not any(f.startswith(".kit/") for f in s["files"]) and len(s["code_sha256"]) == 64

    stages = tmp_path / "stages.tsv"
    stages.write_text("install\t0\t3\t\nbench\t124\t190\ttimed out after 190 s\n")
    out = tmp_path / "provenance.json"
    args = [sys.executable, str(KIT / "provenance.py"), "record", "--out", str(out), "--stamp", str(stamp),
            "--stages", str(stages), "--command", "run.sh OUT", "--wheels", str(tmp_path), "--pack-record", str(tmp_path / "none.json")]
    assert subprocess.run(args, capture_output=True, text=True, timeout=300).returncode == 0
    p = json.loads(out.read_text())
    assert p["code"]["code_matches_stamp"] is True and p["code"]["commit"] == s["commit"]
    assert p["stages"][1] == {"stage": "bench", "exit_code": 124, "seconds": 190, "note": "timed out after 190 s"}
    assert p["software"]["torch_probe"]["torch"] and p["command"] == "run.sh OUT"

    s["code_sha256"] = "0" * 64  # as if the tree had changed after stamping
    stamp.write_text(json.dumps(s))
    assert subprocess.run(args, capture_output=True, text=True, timeout=300).returncode == 0
    assert json.loads(out.read_text())["code"]["code_matches_stamp"] is False


def test_run_sh_without_a_kit_fails_early_and_still_writes_its_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "KIT_DIR": str(tmp_path / "nokit"), "KIT_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    r = subprocess.run([str(KIT / "run.sh"), "--cpu", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1
    assert "run jobs/gpu_kit/build.sh here first" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "run.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "## Provenance" in summary and "(no stages recorded)" in summary and "(no sweep folder)" in summary
    assert subprocess.run([str(KIT / "run.sh")], capture_output=True, text=True).returncode == 2  # no OUT


def test_merge_bench_keeps_each_part_and_says_which_ran_out_of_time(tmp_path):
    import merge_bench

    common = {"command": "python -m trainer.bench --parts X", "git_sha": None, "device": "NVIDIA H100", "torch_version": "2.11",
              "data": {"dir": "d"}, "date": "now", "mode": "full", "threads": 16, "load_average_at_start": [0, 0, 0]}
    (tmp_path / "bench-loader.json").write_text(json.dumps({**common, "loader": {"ffcv": {}}, "loader_ratio_ffcv": 8.0, "wall_s": 40.0}))
    (tmp_path / "bench-step.json").write_text(json.dumps({**common, "step": {"resnet": {}}, "step_settings": {}, "wall_s": 60.0}))
    stages = tmp_path / "stages.tsv"
    stages.write_text("bench-loader\t0\t45\t\nbench-accuracy\t124\t120\ttimed out after 120 s\nbench-step\t0\t65\t\n")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(KIT / "merge_bench.py"), "--out", str(out), "--stages", str(stages),
                        str(tmp_path / "bench-loader.json"), str(tmp_path / "bench-step.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = json.loads(out.read_text())
    assert merged["loader_ratio_ffcv"] == 8.0 and "resnet" in merged["step"] and merged["device"] == "NVIDIA H100"
    assert merged["wall_s"] == 100.0 and len(merged["commands"]) == 2
    assert merged["parts"]["loader"]["result"] == "ok" and merged["parts"]["step"]["seconds"] == 65
    assert merged["parts"]["accuracy"] == {"exit_code": 124, "seconds": 120, "note": "timed out after 120 s",
                                           "result": "no results: timed out after 120 s"}
    assert merge_bench.merge([], {})["parts"] == {}


@pytest.mark.slow
def test_full_pack_is_bit_identical_to_the_shared_copy(cifar_source, tmp_path):
    """All 60,000 images (about 3 minutes on 2 cores): unpack(pack(x)) == x, read by read_split."""
    from trainer.data.cifar10 import read_split

    record = pack_data.pack(cifar_source, tmp_path / "cifar10.pack")
    assert record["fidelity"]["lossless"] and record["images"] == 60_000
    assert record["bytes"] < 30 * 2**20  # the device tool carries 64 MiB in all
    result = unpack_data.unpack(tmp_path / "cifar10.pack", tmp_path / "out")
    assert result["exact"] and result["images_differing"] == 0
    for split in ("train", "test"):
        mine, theirs = read_split(tmp_path / "out", split), read_split(cifar_source, split)
        assert np.array_equal(mine.images, theirs.images) and np.array_equal(mine.labels, theirs.labels)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KIT_BUILD_TEST") != "1",
                    reason="builds the wheelhouse (~45 s cold, seconds warm; needs PyPI, a CPython 3.12, root): set KIT_BUILD_TEST=1")
def test_build_sh_makes_a_self_contained_ffcv_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([str(KIT / "build.sh"), str(wheels), "--no-data"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = sorted(p.name for p in wheels.glob("*.whl"))
    assert [n.split("-")[0] for n in names] == ["assertpy", "fastargs", "ffcv", "pytorch_pfn_extras", "submitit", "terminaltables"]
    assert "ffcv-1.0.2-cp311-abi3-manylinux_2_35_x86_64.whl" in names
    native = json.loads((wheels / ".verify-native.json").read_text())  # checked under 3.12, system libraries hidden
    assert native["python"].startswith("3.12") and native["resize_max_diff"] <= 1
    assert {"libopencv_core", "libopencv_imgproc", "libturbojpeg", "libX11", "libxcb"} <= {d.split("-")[0] for d in native["dependencies_in_wheel"]}
    assert set(native["dependencies_from_system"]) <= {"ld-linux-x86-64.so.2", "libc.so.6", "libgcc_s.so.1", "libm.so.6",
                                                       "libstdc++.so.6", "libz.so.1", "linux-vdso.so.1"}
    again = subprocess.run([str(KIT / "build.sh"), str(wheels), "--no-data"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ffcv: compile" not in again.stdout  # nothing rebuilt


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".kit/cifar10.pack").is_file() or not list((REPO / ".kit/wheels").glob("ffcv-*.whl")),
                    reason="needs the built kit: run jobs/gpu_kit/build.sh first")
def test_run_sh_cpu_end_to_end(tmp_path):
    """install, unpack + prepare, a two-network sweep (bench left out: minutes on a CPU), report, OUT's files."""
    out = tmp_path / "out"
    env = {**os.environ, "KIT_WORK": str(tmp_path / "work"), "PYTHON": os.environ.get("KIT_TEST_PYTHON", sys.executable),
           "KIT_SKIP": "bench", "KIT_ARCHS": "alexnet,mobilenet"}
    r = subprocess.run([str(KIT / "run.sh"), "--cpu", str(out)], capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stdout[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "report.md", "run.log", "summary.md", "sweep.tar.gz"]
    p = json.loads((out / "provenance.json").read_text())
    assert [s["stage"] for s in p["stages"]] == ["install", "preflight", "unpack", "prepare", "sweep"]
    assert all(s["exit_code"] == 0 for s in p["stages"])
    assert p["data"]["unpacked"]["exact"] and p["data"]["pack"]["fidelity"]["lossless"]
    assert p["software"]["packages"]["ffcv"] == "1.0.2" and p["code"]["code_matches_stamp"] in (True, False)
    summary = (out / "summary.md").read_text()
    assert "| alexnet |" in summary and "| mobilenet |" in summary and "every stage exited 0" in summary and "run.sh exit code 0" in summary
    listing = subprocess.run(["tar", "tzf", str(out / "sweep.tar.gz")], capture_output=True, text=True).stdout
    assert "alexnet/summary.json" in listing and "mobilenet/metrics.jsonl" in listing and ".pt" not in listing
