"""python -m trainer.bench as a user runs it: one command, tables on stdout, JSON with provenance."""

import json

import pytest

from conftest import run_cli

PROVENANCE = {"command", "git_sha", "device", "torch_version", "data", "date"}


@pytest.mark.slow
def test_bench_smoke_writes_tables_and_json(beton_dir, tmp_path):
    # --smoke: --quick's code paths on a 4,096-image subset and one small network, for the tests.
    out = tmp_path / "bench.json"
    r = run_cli("-m", "trainer.bench", "--smoke", "--data", str(beton_dir), "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for heading in ("loader:", "step:", "time to accuracy: skipped"):
        assert heading in r.stdout, r.stdout
    result = json.loads(out.read_text())

    assert PROVENANCE <= result.keys()
    assert result["command"].startswith("python -m trainer.bench --smoke")
    assert result["data"]["train_sha256"] and result["data"]["dir"] == str(beton_dir.resolve())
    assert result["device"].startswith("cpu") and result["torch_version"]

    assert result["loader_ratio_ffcv"] > 0 and result["loader_ratio_resident"] > 0
    for name in ("dataloader", "ffcv", "resident"):
        assert result["loader"][name]["images_per_s"] > 0 and result["loader"][name]["images_per_epoch"] == 4096
    assert result["loader"]["dataloader"]["ratio"] == 1.0

    step = result["step"]["resnet9_tiny"]
    for key in ("eager_fp32", "amp", "compiled_amp", "step_ratio_amp", "step_ratio_compiled_amp"):
        assert step[key] > 0, key
    assert step["step_ratio_amp"] == pytest.approx(step["amp"] / step["eager_fp32"])
    assert step["mfu"] is None  # no GPU: no peak to divide by
    assert result["time_to_accuracy"] == {"skipped": "--quick: not on a CPU"}


def test_bench_rejects_unknown_arch(beton_dir):
    r = run_cli("-m", "trainer.bench", "--smoke", "--data", str(beton_dir), "--archs", "resnet99", "--parts", "step")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: --archs: unknown architecture(s) resnet99")


def test_mfu_peaks_by_device_name():
    from trainer.bench import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None
