"""python -m trainer.bench as a user runs it: one command, tables on stdout, JSON with provenance,
written after every part."""

import json
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, error_line, run_main
from trainer.device import cpu_flags, native_bf16_cpu

PROVENANCE = {"command", "git_sha", "device", "torch_version", "data", "date"}


@pytest.mark.slow
def test_bench_smoke_writes_tables_and_json(beton_dir, tmp_path, monkeypatch):
    # --smoke: --quick's code paths on 2,048 training images and one small network, for the tests.
    # Compiled with aot_eager (dynamo's graphs, AOT autograd): inductor's cold code generation took
    # half a minute here; test_gpu_paths' cold compile runs inductor.
    monkeypatch.setattr("trainer.bench.steps.COMPILE_BACKEND", "aot_eager")
    out = tmp_path / "bench.json"
    r = run_main("trainer.bench", "--smoke", "--data", str(beton_dir), "--json", str(out))
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
    assert step["modes_done"] == ["eager_fp32", "amp", "compiled_amp"] and step["complete"] and step["errors"] == {}
    # The bench says which precision the trainer's train.amp=auto picks on this CPU.
    auto = "bf16" if native_bf16_cpu(cpu_flags()) else "fp32"
    assert result["step_settings"]["compile_backend"] == "aot_eager"
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

    def step_fails(*args, **kwargs):
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
    r = run_main("trainer.bench", "--smoke", "--data", str(tmp_path), "--archs", "resnet99", "--parts", "step")
    assert r.returncode == 1
    assert error_line(r).startswith("error: --archs: unknown architecture(s) resnet99")


def test_mfu_peaks_by_device_name():
    from trainer.bench.steps import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None


@pytest.mark.slow
def test_step_rows_reach_the_json_as_measured_and_eager_modes_come_before_any_compile(tmp_path):
    """A step bench cut off in a compile (the GPU check's stage limit) keeps every architecture's
    eager fp32 and AMP numbers: they are all measured first and written as each is measured. The
    step part needs no data: --data names a folder that does not exist. A real process, since it is
    killed."""
    out = tmp_path / "step.json"
    proc = subprocess.Popen([sys.executable, "-m", "trainer.bench", "--smoke", "--parts", "step", "--archs",
                             "resnet9_tiny,alexnet", "--data", str(tmp_path / "none"), "--json", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                rows = json.loads(out.read_text()).get("step") or {}
            except (OSError, ValueError):
                rows = {}
            if any("compiled_amp" in r["modes_done"] for r in rows.values()):
                break  # too late to look: the compiled rows came first (or the first compile was quick)
            if len(rows) == 2 and all(r["modes_done"] == ["eager_fp32", "amp"] for r in rows.values()):
                seen = rows
                break
            time.sleep(0.05)
    finally:
        proc.kill()  # as a stage's time limit would, during the first compile
        output = proc.communicate()[0]
    assert seen is not None, output[-3000:]
    for row in seen.values():
        assert row["eager_fp32"] > 0 and row["amp"] > 0 and row["compiled_amp"] is None and row["compile_s"] is None
        assert row["step_ratio_amp"] == pytest.approx(row["amp"] / row["eager_fp32"]) and row["step_ratio_compiled_amp"] is None
        assert row["complete"] is False and row["errors"] == {}
    result = json.loads(out.read_text())
    assert result["parts_done"] == [] and result["complete"] is False and result["data"] is None


def test_a_failing_mode_is_recorded_and_the_others_go_on(bench_args, monkeypatch):
    from trainer.bench import __main__ as bench, steps

    calls = []

    def time_steps(arch, device, mode, settings):
        calls.append((mode, arch))
        if (arch, mode) == ("alexnet", "compiled_amp"):
            raise RuntimeError("inductor: out of resources\nsecond line")
        return {"images_per_s": {"eager_fp32": 100.0, "amp": 150.0, "compiled_amp": 300.0}[mode],
                "compile_s": 12.0 if mode == "compiled_amp" else None}

    monkeypatch.setattr(steps, "time_steps", time_steps)
    args, out = bench_args("--parts", "step", "--archs", "efficientnet,alexnet")
    assert bench.run(args) == 1  # a failed mode fails the command, after everything else was measured
    # eager and AMP of every architecture first; then the compiles, the fewest modules first
    assert calls == [("eager_fp32", "efficientnet"), ("eager_fp32", "alexnet"), ("amp", "efficientnet"), ("amp", "alexnet"),
                     ("compiled_amp", "alexnet"), ("compiled_amp", "efficientnet")]
    result = json.loads(out.read_text())
    assert result["parts_done"] == ["step"] and result["complete"] is True
    eff, alex = result["step"]["efficientnet"], result["step"]["alexnet"]
    assert eff["complete"] and eff["step_ratio_compiled_amp"] == 3.0 and eff["compile_s"] == 12.0
    assert alex["modes_done"] == ["eager_fp32", "amp"] and not alex["complete"] and alex["compiled_amp"] is None
    assert alex["errors"] == {"compiled_amp": "RuntimeError: inductor: out of resources"}


@pytest.mark.gpu
def test_step_bench_measures_under_the_trainers_cuda_math(bench_args, monkeypatch):
    """TF32 and cudnn.benchmark, as trainer.device.fast_cuda_math sets them for training runs."""
    from trainer.bench import __main__ as bench, steps

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # put back after the test
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    precision = torch.get_float32_matmul_precision()
    seen = []

    def time_steps(arch, device, mode, settings):
        seen.append((device.type, torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()))
        return {"images_per_s": 1.0, "compile_s": 0.0}

    monkeypatch.setattr(steps, "time_steps", time_steps)
    args, _ = bench_args("--parts", "step", "--device", "cuda")
    try:
        assert bench.run(args) == 0
    finally:
        torch.set_float32_matmul_precision(precision)
    assert seen and set(seen) == {("cuda", True, "high")}
