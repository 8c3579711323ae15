"""python -m trainer.export: a real trained run's best.pt out as ONNX (checked with onnxruntime),
safetensors (strict load into the registry's network) and TorchScript (loaded without this package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import Result, run_main
from trainer import models
from trainer.export import Deployable, check_onnx, load_run


def export_cli(*args: str | Path) -> Result:
    """`python -m trainer.export ARGS`, run in this process."""
    return run_main("trainer.export", *map(str, args))


@pytest.fixture(scope="module")
def trained_run(trained_tiny_run) -> Path:
    return trained_tiny_run


def real_test_images(source: Path, n: int = 256) -> torch.Tensor:
    from trainer.data.cifar10 import read_split

    images = read_split(source, "test").images[:n]  # (N, 32, 32, 3) uint8
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()


@pytest.mark.slow
def test_onnx_matches_pytorch_on_real_test_images(trained_run, real_cifar_source, tmp_path):
    out = tmp_path / "net.onnx"
    done = export_cli(trained_run, "--format", "onnx", "--out", out)
    assert done.returncode == 0, done.stderr
    import onnx

    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["arch"] == "resnet9_tiny" and "git_sha" in meta
    net, _ = load_run(trained_run)
    diff = check_onnx(Deployable(net).eval(), out, real_test_images(real_cifar_source))
    assert diff < 1e-3
    # the same answers as the trainer's own network on normalised inputs
    images = real_test_images(real_cifar_source, 16)
    import onnxruntime

    (logits,) = onnxruntime.InferenceSession(str(out)).run(["logits"], {"images": images.numpy()})
    assert (logits.argmax(1) == Deployable(net)(images).argmax(1).numpy()).all()


def test_safetensors_loads_strictly_into_the_registry_network(trained_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "net.safetensors"
    done = export_cli(trained_run, "--format", "safetensors", "--out", out)
    assert done.returncode == 0, done.stderr
    net = models.build("resnet9_tiny")
    net.load_state_dict(load_file(str(out)), strict=True)
    reference, state = load_run(trained_run)
    for key, value in reference.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet9_tiny" and int(meta["epoch"]) == state["epoch"] == 1
    assert len(json.loads(meta["mean"])) == 3
    # The run's model section, to rebuild a network with options (whitening, GELU...) before loading.
    assert json.loads(meta["model"]) == {**state["config"]["model"], "arch": "resnet9_tiny", "whiten": False}


@pytest.mark.slow
def test_torchscript_loads_without_this_package(trained_run, tmp_path):
    out = tmp_path / "net.pt"
    done = export_cli(trained_run, "--format", "torchscript", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr
    images = torch.randint(0, 256, (4, 3, 32, 32)).float()
    torch.save(images, tmp_path / "images.pt")
    # A fresh interpreter in another folder, with the project made unimportable: its own process,
    # since this one has the project loaded.
    probe = (
        "import sys, torch; sys.modules['trainer'] = None\n"
        f"m = torch.jit.load({str(out)!r}); x = torch.load({str(tmp_path / 'images.pt')!r})\n"
        f"torch.save(m(x), {str(tmp_path / 'logits.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    net, _ = load_run(trained_run)
    with torch.no_grad():
        expected = Deployable(net)(images)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-4)


def test_bad_input_is_one_error_line_and_nothing_is_overwritten(trained_run, tmp_path):
    missing = export_cli(tmp_path / "nope", "--format", "onnx", "--out", tmp_path / "a.onnx")
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path / 'nope'}: not a run folder (no such folder)"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_best = export_cli(empty, "--format", "safetensors", "--out", tmp_path / "a.safetensors")
    assert no_best.returncode == 1 and "best.pt: no such file" in no_best.stderr
    assert len(no_best.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    bad = export_cli(broken, "--format", "safetensors", "--out", tmp_path / "b.safetensors")
    assert bad.returncode == 1 and "unusable" in bad.stderr and "Traceback" not in bad.stderr
    kept = tmp_path / "kept.safetensors"
    kept.write_text("precious")
    refused = export_cli(trained_run, "--format", "safetensors", "--out", kept)
    assert refused.returncode == 1 and "exists; pass --force" in refused.stderr
    assert kept.read_text() == "precious"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    unknown = export_cli(trained_run, "--format", "tflite", "--out", tmp_path / "x")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
