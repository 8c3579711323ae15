"""Speed benchmarks, every ratio measured in the same run: loaders, training steps, time to accuracy.

    python -m trainer.bench [--quick] [--json PATH] [--archs a,b] [--seeds N] [--parts loader,step,accuracy]

loader    training images/s of a torch DataLoader with torchvision transforms, the FFCV loader and the
          device-resident loader, same augmentations everywhere; ratios to the DataLoader.
step      training images/s per architecture: eager fp32, AMP, and AMP + torch.compile +
          channels_last; compile time apart; model FLOPs utilisation on a GPU.
accuracy  wall time of jobs/configs/speed.yaml to reach its target test accuracy, mean over seeds,
          by running the real trainer. Runs on a GPU; on a CPU only when named in --parts (hours).

--quick is a CPU-sized version: one measured loader epoch, three small networks at a small batch
for a few steps, no accuracy part. The results, with the command, commit, device, software and data
they came from, go to --json PATH, rewritten atomically after each part (and, in the step part,
after each architecture's mode): `parts_done` names the finished parts in it and `complete` is true
once all have run. The step part needs no data (its batches are synthetic): --data is checked only
for the loader and accuracy parts. On CUDA the trainer's math settings (TF32, cudnn.benchmark) hold.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

# torch and the parts that use it are imported by run(), once the command line has checked out, so
# that a mistaken flag is one line at once (issue #21).
from trainer import UserError, cli, models, provenance
from trainer.bench import accuracy
from trainer.bench.common import ResultsFile, Settings, cores, full_settings, quick_settings, smoke_settings

if TYPE_CHECKING:
    import torch

PARTS = ("loader", "step", "accuracy")


def settings_from(args: argparse.Namespace) -> Settings:
    settings = smoke_settings() if args.smoke else quick_settings() if args.quick else full_settings()
    if args.archs:
        settings.archs = tuple(models.parse_names(args.archs, "--archs"))
    for name, field in (("batch", "step_batch"), ("steps", "step_steps"), ("loader_epochs", "loader_epochs"),
                        ("seeds", "seeds")):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be positive, got {value}")
            setattr(settings, field, value)
    return settings


def accuracy_skipped(args: argparse.Namespace, device: torch.device) -> str | None:
    """Why the accuracy part is not run, or None: hours on a CPU unless --parts names it."""
    if device.type != "cuda" and not args.parts:
        if args.quick or args.smoke:
            return "--quick: not on a CPU"
        return "no GPU: hours on a CPU; --parts accuracy forces it"
    if args.quick or args.smoke:
        return "--quick"
    return None


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings = settings_from(args)
    parts = [p.strip() for p in args.parts.split(",")] if args.parts else list(PARTS)
    if set(parts) - set(PARTS):
        raise UserError(f"--parts: expected a comma-separated subset of {','.join(PARTS)}, got '{args.parts}'")
    threads = args.threads or cores()
    if threads < 0:
        raise UserError(f"--threads: must be positive, got {threads}")

    import torch

    from trainer.bench import loaders, steps
    from trainer.data.checks import data_record
    from trainer.data.common import check_data_dir
    from trainer.device import device_name, fast_cuda_math

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the step part's batches are synthetic: it runs where no .beton is (the GPU check without ffcv)
    data_dir = check_data_dir(args.data).resolve() if set(parts) - {"step"} else None
    torch.set_num_threads(threads)
    if device.type == "cuda":  # as the trainer sets them, so that the step numbers compare with its runs
        fast_cuda_math()
    load = os.getloadavg()

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    results = ResultsFile(args.json, {
        # as typed: sys.argv[0] is the path of this file, which says less than the module name
        "command": " ".join(["python", "-m", "trainer.bench", *sys.argv[1:]]),
        "git_sha": provenance.git_sha(),
        "device": device_name(device),
        "torch_version": torch.__version__,
        "data": data_record(data_dir) if data_dir else None,
        "date": datetime.now().isoformat(timespec="seconds"),
        "mode": mode,
        "threads": threads,
        "load_average_at_start": list(load),
    }, started)
    print(f"trainer.bench ({mode}) on {device_name(device)}, torch {torch.__version__}, {threads} threads; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)

    failed: list[str] = []
    for part in dict.fromkeys(parts):  # in the order given: a run cut short keeps the parts it put first
        if part == "loader":
            measured = loaders.bench_loaders(data_dir, device, settings, threads)
            loaders.print_table(measured, device)
            results.add_part("loader", {"loader": measured, "loader_ratio_ffcv": measured["ffcv"]["ratio"],
                                        "loader_ratio_resident": measured["resident"]["ratio"]})
        elif part == "step":
            step_settings = steps.step_settings(device, settings)
            measured = steps.bench_steps(device, settings, threads,
                                         on_row=lambda rows: results.update({"step_settings": step_settings, "step": rows}))
            steps.print_table(measured, device, settings)
            results.add_part("step", {"step_settings": step_settings, "step": measured})
            failed = [f"{arch} {mode}" for arch, row in measured.items() for mode in row["errors"]]
        else:
            why = accuracy_skipped(args, device)
            measured = {"skipped": why} if why else accuracy.bench_accuracy(data_dir, settings.seeds, args.target)
            accuracy.print_table(measured)
            results.add_part("accuracy", {"time_to_accuracy": measured})

    results.finish()
    end = results.data
    if failed:
        print(f"error: step modes that failed: {', '.join(failed)}", file=sys.stderr)
    print(f"\n{end['wall_s']:.0f} s in all; load average at the end {end['load_average_at_end'][0]:.2f}")
    if args.json:
        print(f"results in {args.json}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a CPU-sized run: small networks, few steps, no accuracy part")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the tests' even smaller run
    parser.add_argument("--json", type=Path, help="write the results (and their provenance) here, after every part")
    parser.add_argument("--data", type=Path, default=Path("data/cifar10"),
                        help="the .beton folder of the loader and accuracy parts (default data/cifar10)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--archs", help="comma-separated architectures for the step part")
    parser.add_argument("--batch", type=int, help="batch size of the step part")
    parser.add_argument("--steps", type=int, help="measured steps per mode in the step part")
    parser.add_argument("--loader-epochs", type=int, help="measured epochs per loader")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: the cores; loader workers are always one per core)")
    parser.add_argument("--seeds", type=int, help="runs of the speed profile to average (default 1)")
    parser.add_argument("--target", type=float, default=accuracy.SPEED_TARGET,
                        help=f"test accuracy %% to reach (default {accuracy.SPEED_TARGET})")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli.run(lambda: run(args))


if __name__ == "__main__":
    main()

