"""python -m trainer.bench as a user runs it: one command, tables on stdout, JSON with provenance,
written after every part."""

import json
import sys

import pytest

from conftest import run_cli
from trainer.device import cpu_flags, native_bf16_cpu

PROVENANCE = {"command", "git_sha", "device", "torch_version", "data", "date"}


@pytest.mark.slow
def test_bench_smoke_writes_tables_and_json(beton_dir, tmp_path):
    # --smoke: --quick's code paths on 2,048 training images and one small network, for the tests.
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
    assert result["parts_done"] == ["loader", "step", "accuracy"] and result["complete"] is True

    assert result["loader_ratio_ffcv"] > 0 and result["loader_ratio_resident"] > 0
    for name in ("dataloader", "ffcv", "resident"):
        assert result["loader"][name]["images_per_s"] > 0 and result["loader"][name]["images_per_epoch"] == 2048
    assert result["loader"]["dataloader"]["ratio"] == 1.0

    step = result["step"]["resnet9_tiny"]
    for key in ("eager_fp32", "amp", "compiled_amp", "step_ratio_amp", "step_ratio_compiled_amp"):
        assert step[key] > 0, key
    assert step["step_ratio_amp"] == pytest.approx(step["amp"] / step["eager_fp32"])
    assert step["mfu"] is None  # no GPU: no peak to divide by
    # The bench says which precision the trainer's train.amp=auto picks on this CPU.
    auto = "bf16" if native_bf16_cpu(cpu_flags()) else "fp32"
    assert result["step_settings"]["amp_auto"] == auto
    assert f"the trainer's precision here: {auto} (train.amp=auto: " in r.stdout
    assert result["time_to_accuracy"] == {"skipped": "--quick: not on a CPU"}


def fake_loader_results(data_dir, device, settings, threads) -> dict:
    speeds = {"dataloader": 100.0, "ffcv": 500.0, "resident": 2000.0}
    return {name: {"images_per_s": v, "warmup_s": 0.0, "epochs": 1, "images_per_epoch": 512, "ratio": v / 100}
            for name, v in speeds.items()}


@pytest.fixture
def bench_args(tmp_path, monkeypatch):
    """Arguments for an in-process run on a folder that passes the data check (the parts are faked)."""
    from trainer.bench.__main__ import build_parser

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.beton", "test.beton"):
        (data / name).touch()
    out = tmp_path / "bench.json"

    def parse(*argv: str):
        argv = ("--smoke", "--device", "cpu", "--data", str(data), "--json", str(out), *argv)
        monkeypatch.setattr(sys, "argv", ["trainer/bench/__main__.py", *argv])
        return build_parser().parse_args(argv), out

    return parse


def test_bench_keeps_finished_parts_when_a_later_one_fails(bench_args, monkeypatch):
    from trainer.bench import __main__ as bench, loaders, steps

    def step_fails(*args):
        raise RuntimeError("out of time")

    monkeypatch.setattr(loaders, "bench_loaders", fake_loader_results)
    monkeypatch.setattr(steps, "bench_steps", step_fails)
    args, out = bench_args("--parts", "loader,step")
    with pytest.raises(RuntimeError, match="out of time"):
        bench.run(args)

    result = json.loads(out.read_text())
    assert PROVENANCE <= result.keys()
    assert result["parts_done"] == ["loader"] and result["complete"] is False
    assert result["loader_ratio_resident"] == 20.0 and "step" not in result


def test_bench_marks_the_file_complete(bench_args, monkeypatch):
    from trainer.bench import __main__ as bench, loaders

    monkeypatch.setattr(loaders, "bench_loaders", fake_loader_results)
    args, out = bench_args("--parts", "loader,accuracy")
    assert bench.run(args) == 0

    result = json.loads(out.read_text())
    assert result["command"] == f"python -m trainer.bench --smoke --device cpu --data {args.data} --json {out} " \
                                "--parts loader,accuracy"
    assert result["parts_done"] == ["loader", "accuracy"] and result["complete"] is True
    assert result["time_to_accuracy"] == {"skipped": "--quick"}  # named in --parts, but --smoke never trains
    assert result["wall_s"] >= 0 and len(result["load_average_at_end"]) == 3


def test_bench_rejects_unknown_arch(tmp_path):  # the names are checked before the data
    r = run_cli("-m", "trainer.bench", "--smoke", "--data", str(tmp_path), "--archs", "resnet99", "--parts", "step")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: --archs: unknown architecture(s) resnet99")


def test_mfu_peaks_by_device_name():
    from trainer.bench.steps import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None
