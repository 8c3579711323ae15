"""Export a trained network out of the project: ONNX, safetensors or TorchScript, from a run's best.pt;
and load a safetensors export back.

    python -m trainer.export RUN_DIR --format onnx|safetensors|torchscript --out FILE [--force]

- onnx, torchscript: the whole inference function, normalisation included, so the file is all a
  deployment needs. Input: float32 RGB images, NCHW, pixel values 0-255 (shape N x 3 x 32 x 32,
  any N); output: the 10 class logits (CIFAR-10 label order). The ONNX file is checked against
  the PyTorch network with onnxruntime before it is kept.
- safetensors: the network's weights alone, with the architecture, the run's model section (the
  `model` metadata: whitening, GELU, output stride... change the layout), epoch, accuracy and
  normalisation as metadata. `load(path)` rebuilds the network from that metadata and loads the
  weights with strict=True; inputs must then be normalised as the metadata says.

The file is written atomically and an existing FILE is kept unless --force is given.

torch, onnx and safetensors are imported inside the functions that use them: a mistaken command
line is one line at once, not after seconds of imports (issue #21).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from trainer import UserError, cli
from trainer.files import atomic_path
from trainer.run_files import CHECKPOINTS

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ("onnx", "safetensors", "torchscript")
# How close the ONNX file's logits must be to PyTorch's (float32 on the CPU: rounding only).
ONNX_TOLERANCE = 1e-3


@functools.cache
def _deployable_class() -> type:
    # Made on first use, so that importing this module does not import torch.
    import torch
    from torch import nn

    from trainer.data.cifar10 import MEAN, STD

    class Deployable(nn.Module):
        """The network with the loader's normalisation in front: pixels 0-255 in, logits out."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor([255 * m for m in MEAN]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([255 * s for s in STD]).view(1, 3, 1, 1))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.net((images - self.mean) / self.std)

    return Deployable


def deployable(net: nn.Module) -> nn.Module:
    """`net` with the loader's normalisation in front, in eval mode: float32 pixels 0-255 in, logits
    out. What the ONNX and TorchScript files hold."""
    return _deployable_class()(net).eval()


def load_run(run_dir: Path) -> tuple[nn.Module, dict]:
    """The best network of a run folder (eval mode, float32, CPU) and its best.pt record."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run folder (no such folder)")
    from trainer import run_files
    from trainer.models import options as model_options
    from trainer.training import checkpoint

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


def load(path: str | os.PathLike) -> tuple[nn.Module, dict[str, str]]:
    """The network a safetensors export holds, as it was trained, and the file's metadata.

    The network is built from the `model` metadata (the run's model section; files without it, from
    before it was written: the architecture as defined) and its weights are loaded with strict=True:
    float32, on the CPU, in eval mode. The metadata are strings: `mean` and `std` are JSON lists in
    pixel units (0-255), what the inputs are normalised with; `arch`, `epoch`, `test_acc`, `git_sha`
    say what it is. ONNX and TorchScript exports are not read here: they are whole inference
    functions, for onnxruntime and torch.jit.load. A file that is not a safetensors export of this
    project is a UserError naming it."""
    from trainer.config import ModelConfig
    from trainer.models import options as model_options

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    meta, weights = _read_safetensors(path)
    if "arch" not in meta:
        raise UserError(f"{path}: a safetensors file without this project's metadata (no 'arch'); "
                        f"load() reads what `python -m trainer.export --format safetensors` writes")
    arch = meta["arch"]
    try:
        saved = json.loads(meta["model"]) if "model" in meta else {"arch": arch}
        net = model_options.build(ModelConfig(**saved))
        net.load_state_dict(weights, strict=True)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # metadata of another version, or weights of another layout
        raise UserError(f"{path}: does not load into {arch} as its metadata describes it ({cli.first_line(e)})") from None
    return net.float().eval(), meta


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        from safetensors import safe_open
    except ModuleNotFoundError:
        raise UserError("loading a safetensors export needs the package safetensors: "
                        "pip install 'cifar-infinity[export]'") from None
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors' own error type for a foreign or cut file
        raise UserError(f"{path}: not a safetensors file ({str(e).strip() or type(e).__name__}); ONNX exports run "
                        f"with onnxruntime, TorchScript ones load with torch.jit.load") from None


def metadata(state: dict) -> dict[str, str]:
    """What a file needs to be used and trusted later: the network, its score, the input contract."""
    from trainer import provenance
    from trainer.data.cifar10 import MEAN, STD

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
    import torch

    from trainer.data.cifar10 import SIDE

    return torch.randint(0, 256, (n, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(seed)).float()


def write_safetensors(net: nn.Module, state: dict, out: Path) -> None:
    from safetensors.torch import save_file

    # contiguous clones: safetensors refuses tensors that share storage or are strided views
    tensors = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(out), metadata=metadata(state))


def write_torchscript(net: nn.Module, state: dict, out: Path) -> None:
    import torch

    # torch deprecates TorchScript in favour of torch.export, but LibTorch (C++) and older serving
    # stacks load only TorchScript; the warning says nothing a user of this command can act on.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        scripted = torch.jit.trace(deployable(net), sample_images(2), check_trace=True)
    scripted.save(str(out), _extra_files={"metadata.json": json.dumps(metadata(state))})


def write_onnx(net: nn.Module, state: dict, out: Path) -> None:
    import onnx
    import torch

    full = deployable(net)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(full, (sample_images(2),), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: batch}}, dynamo=True, verbose=False)
    program.save(str(out))
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    for key, value in metadata(state).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    check_onnx(full, out)


def check_onnx(full: nn.Module, path: Path, images: torch.Tensor | None = None) -> float:
    """Runs the ONNX file with onnxruntime on `images` (default: random pixels, batch 8, so the
    dynamic batch is exercised too) and returns the largest difference from the logits of `full`
    (a `deployable`); raises if it exceeds ONNX_TOLERANCE."""
    import onnxruntime
    import torch

    images = sample_images() if images is None else images
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        expected = full(images)
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
    checkpoints = (run_dir / CHECKPOINTS).resolve()
    if out.resolve().parent == checkpoints:  # --force onto best.pt would replace the run's own weights
        raise UserError(f"{out}: inside the run's {CHECKPOINTS}/ folder, which the trainer owns; write the export "
                        "elsewhere")
    net, state = load_run(run_dir)
    # Written atomically, with the umask's permissions (a deployment file other users can read).
    with atomic_path(out) as tmp:
        try:
            WRITERS[fmt](net, state, tmp)
        except UserError:
            raise
        except ModuleNotFoundError as e:
            raise UserError(f"--format {fmt} needs the package {e.name}: pip install 'cifar-infinity[export]'") from None
        except Exception as e:  # an exporter that cannot take an operator of this network
            raise UserError(f"cannot export {state['arch']} to {fmt}: {cli.first_line(e)}") from None
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
        from trainer import run_files
        from trainer.training import checkpoint

        print(f"wrote {out} ({args.format}, {out.stat().st_size / 2**20:.1f} MiB) from "
              f"{args.run_dir / run_files.CHECKPOINTS / checkpoint.BEST}")
        return 0

    cli.run(run)


if __name__ == "__main__":
    main(sys.argv[1:])
