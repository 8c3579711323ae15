"""python -m trainer.export: a real trained run's best.pt out as ONNX (checked with onnxruntime),
safetensors (strict load into the registry's network; trainer.export.load, through docs/export.md's
snippet) and TorchScript (loaded without this package)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, Result, run_main
from trainer import UserError, models
from trainer.export import check_onnx, deployable, load, load_run


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
    diff = check_onnx(deployable(net), out, real_test_images(real_cifar_source))
    assert diff < 1e-3
    # the same answers as the trainer's own network on normalised inputs
    images = real_test_images(real_cifar_source, 16)
    import onnxruntime

    (logits,) = onnxruntime.InferenceSession(str(out)).run(["logits"], {"images": images.numpy()})
    assert (logits.argmax(1) == deployable(net)(images).argmax(1).numpy()).all()


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
        expected = deployable(net)(images)
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
    # #22: --force onto the run's own best.pt replaced the weights it exports
    best = trained_run / "checkpoints/best.pt"
    before = best.read_bytes()
    onto_best = export_cli(trained_run, "--format", "safetensors", "--out", best, "--force")
    assert onto_best.returncode == 1 and "inside the run's checkpoints/ folder" in onto_best.stderr
    assert best.read_bytes() == before


def test_an_export_has_the_umasks_permissions_as_checkpoints_do(trained_run, tmp_path):
    # #22: exports were written 0600 (mkstemp's mode), unreadable by the other users of a deployment
    out = tmp_path / "net.safetensors"
    old = os.umask(0o022)
    try:
        done = export_cli(trained_run, "--format", "safetensors", "--out", out)
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE((trained_run / "checkpoints/best.pt").stat().st_mode) == 0o644


def docs_snippet() -> str:
    """The python block of docs/export.md: how a user loads a safetensors export."""
    (snippet,) = re.findall(r"^```python\n(.*?)^```", (REPO / "docs/export.md").read_text(), flags=re.S | re.M)
    return snippet


def test_the_docs_snippet_loads_an_export_into_the_network_it_was_trained_as(resident_reference, tmp_path,
                                                                             monkeypatch):
    # resident_reference trains jobs/configs/tiny.yaml's recipe: whitening, GELU, BatchNorm options,
    # a layout that the architecture's name alone does not rebuild (issue #21 item 6).
    snippet = docs_snippet()
    (name,) = re.findall(r'load\("([^"]+)"\)', snippet)
    monkeypatch.chdir(tmp_path)
    done = export_cli(resident_reference, "--format", "safetensors", "--out", tmp_path / name)
    assert done.returncode == 0, done.stderr
    namespace: dict = {}
    exec(compile(snippet, "docs/export.md", "exec"), namespace)
    net, _ = load_run(resident_reference)
    with torch.no_grad():
        expected = deployable(net)(namespace["images"])
    assert namespace["logits"].shape == (len(namespace["images"]), 10)
    assert torch.equal(namespace["logits"], expected)
    assert not namespace["net"].training
    from safetensors.torch import load_file

    with pytest.raises(RuntimeError, match="Missing key"):  # what the README's old advice gave
        models.build(namespace["meta"]["arch"]).load_state_dict(load_file(tmp_path / name), strict=True)


def test_load_refuses_what_is_not_an_export_in_one_line(trained_run, tmp_path):
    from safetensors.torch import save_file

    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    exported = tmp_path / "net.safetensors"
    assert export_cli(trained_run, "--format", "safetensors", "--out", exported).returncode == 0
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"arch": "resnet9_tiny", "model": '{"arch": "resnet9_tiny"}'})
    for path, fragment in ((tmp_path / "nope.safetensors", "no such file"),
                           (text, "not a safetensors file"),
                           (foreign, "without this project's metadata"),
                           (other, "does not load into resnet9_tiny as its metadata describes it")):
        with pytest.raises(UserError) as refused:
            load(path)
        message = str(refused.value)
        assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message
    net, meta = load(exported)
    assert meta["arch"] == "resnet9_tiny" and not net.training


def test_a_bad_command_line_is_reported_before_torch_is_imported(tmp_path):
    # Issue #21 item 5: the one line comes before seconds of imports. A fresh interpreter, since this
    # one has torch loaded.
    probe = ("import sys\nfrom trainer import export\n"
             "for argv in (['run', '--format', 'tflite', '--out', 'x'],\n"
             "             [sys.argv[1], '--format', 'onnx', '--out', 'x']):\n"
             "    try:\n        export.main(argv)\n    except SystemExit as e:\n        print(e.code)\n"
             "print(sorted(m for m in ('torch', 'onnx', 'safetensors') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "nope")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split() == ["2", "1", "[]"], (done.stdout, done.stderr)
    assert f"error: {tmp_path / 'nope'}: not a run folder" in done.stderr
