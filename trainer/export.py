"""Export a trained network out of the project: ONNX, safetensors or TorchScript, from a run's best.pt.

    python -m trainer.export RUN_DIR --format onnx|safetensors|torchscript --out FILE [--force]

- onnx, torchscript: the whole inference function, normalisation included, so the file is all a
  deployment needs. Input: float32 RGB images, NCHW, pixel values 0-255 (shape N x 3 x 32 x 32,
  any N); output: the 10 class logits (CIFAR-10 label order). The ONNX file is checked against
  the PyTorch network with onnxruntime before it is kept.
- safetensors: the network's weights alone (the state_dict of `trainer.models.options.build` of the
  `model` metadata, the run's model section: `trainer.models.build(arch)` when it sets no option;
  load them with strict=True), with the architecture, epoch, accuracy and normalisation as metadata.
  Inputs must then be normalised as the metadata says.

The file is written atomically and an existing FILE is kept unless --force is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from trainer import UserError, cli, provenance, run_files
from trainer.data.cifar10 import MEAN, SIDE, STD
from trainer.models import options as model_options
from trainer.training import checkpoint

FORMATS = ("onnx", "safetensors", "torchscript")
# How close the ONNX file's logits must be to PyTorch's (float32 on the CPU: rounding only).
ONNX_TOLERANCE = 1e-3


class Deployable(nn.Module):
    """The network with the loader's normalisation in front: pixels 0-255 in, logits out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([255 * m for m in MEAN]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([255 * s for s in STD]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)


def load_run(run_dir: Path) -> tuple[nn.Module, dict]:
    """The best network of a run folder (eval mode, float32, CPU) and its best.pt record."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run folder (no such folder)")
    path = run_dir / run_files.CHECKPOINTS / checkpoint.BEST
    if not path.exists():
        raise UserError(f"{path}: no such file; export needs a run that finished at least one epoch")
    try:
        state = checkpoint.load(path)
        net = model_options.build_saved(state)  # with the run's model options
        net.load_state_dict(state["model"])
    except Exception as e:  # not a checkpoint, another layout, or not weights only
        raise UserError(f"{path}: unusable ({checkpoint.describe_load_error(e)})") from None
    return net.float().eval(), state


def metadata(state: dict) -> dict[str, str]:
    """What a file needs to be used and trusted later: the network, its score, the input contract."""
    return {
        "arch": state["arch"],
        # The model options (whitening, GELU, output stride...) change the layout: rebuild with them.
        "model": json.dumps((state.get("config") or {}).get("model") or {"arch": state["arch"]}),
        "epoch": str(state["epoch"]),
        "test_acc": f"{state['test_acc']:.4f}",
        "mean": json.dumps([255 * m for m in MEAN]),
        "std": json.dumps([255 * s for s in STD]),
        "input": "float32 RGB NCHW 3x32x32, pixels 0-255 (onnx/torchscript normalise inside)",
        "classes": "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck",
        "git_sha": provenance.git_sha() or "unknown",
    }


def sample_images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(seed)).float()


def write_safetensors(net: nn.Module, state: dict, out: Path) -> None:
    from safetensors.torch import save_file

    # contiguous clones: safetensors refuses tensors that share storage or are strided views
    tensors = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(out), metadata=metadata(state))


def write_torchscript(net: nn.Module, state: dict, out: Path) -> None:
    deployable = Deployable(net).eval()
    # torch deprecates TorchScript in favour of torch.export, but LibTorch (C++) and older serving
    # stacks load only TorchScript; the warning says nothing a user of this command can act on.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        scripted = torch.jit.trace(deployable, sample_images(2), check_trace=True)
    scripted.save(str(out), _extra_files={"metadata.json": json.dumps(metadata(state))})


def write_onnx(net: nn.Module, state: dict, out: Path) -> None:
    import onnx

    deployable = Deployable(net).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(deployable, (sample_images(2),), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: batch}}, dynamo=True, verbose=False)
    program.save(str(out))
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    for key, value in metadata(state).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    check_onnx(deployable, out)


def check_onnx(deployable: nn.Module, path: Path, images: torch.Tensor | None = None) -> float:
    """Runs the ONNX file with onnxruntime on `images` (default: random pixels, batch 8, so the
    dynamic batch is exercised too) and returns the largest difference from PyTorch's logits;
    raises if it exceeds ONNX_TOLERANCE."""
    import onnxruntime

    images = sample_images() if images is None else images
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        expected = deployable(images)
    diff = float((torch.from_numpy(got) - expected).abs().max())
    if not diff <= ONNX_TOLERANCE:
        raise UserError(f"{path}: onnxruntime's logits differ from PyTorch's by {diff:.2e} "
                        f"(more than {ONNX_TOLERANCE:g}); the file was not kept")
    return diff


WRITERS: dict[str, Callable[[nn.Module, dict, Path], None]] = {
    "onnx": write_onnx, "safetensors": write_safetensors, "torchscript": write_torchscript,
}


def export(run_dir: Path, fmt: str, out: Path, force: bool = False) -> Path:
    if fmt not in WRITERS:
        raise UserError(f"--format: unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to replace it")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out names the file to write")
    net, state = load_run(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            WRITERS[fmt](net, state, tmp)
        except UserError:
            raise
        except ModuleNotFoundError as e:
            raise UserError(f"--format {fmt} needs the package {e.name}: pip install 'cifar-infinity[export]'") from None
        except Exception as e:  # an exporter that cannot take an operator of this network
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot export {state['arch']} to {fmt}: {first}") from None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (its checkpoints/best.pt is exported)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", type=Path, required=True, metavar="FILE")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")
    args = parser.parse_args(argv)

    def run() -> int:
        out = export(args.run_dir, args.format, args.out, args.force)
        print(f"wrote {out} ({args.format}, {out.stat().st_size / 2**20:.1f} MiB) from "
              f"{args.run_dir / run_files.CHECKPOINTS / checkpoint.BEST}")
        return 0

    cli.run(run)


if __name__ == "__main__":
    main(sys.argv[1:])
