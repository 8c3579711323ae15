"""Speed benchmarks, every ratio measured in the same run: loaders, training steps, time to accuracy.

    python -m trainer.bench [--quick] [--json PATH] [--archs a,b] [--seeds N] [--parts loader,step,accuracy]

loader    training images/s with the same augmentations everywhere (flip, translate 4, cutout 8,
          float32, batch 512, all on the training device) for (a) a torch DataLoader with per-sample
          torchvision transforms and one worker per core, the baseline most CIFAR code uses, (b) the
          FFCV loader, (c) the device-resident loader; the median of full epochs (at least 3 s of
          them) after a warm-up epoch (ffcv's first epoch compiles), ratios to (a).
step      training images/s per architecture on synthetic batches already on the device: eager fp32
          (the baseline), AMP (bf16 autocast; fp16 with a GradScaler on GPUs without bf16), and AMP
          + torch.compile + channels_last; warm-up steps excluded, compile time reported apart; on a
          GPU the block of steps is timed and the model FLOPs utilisation of the compiled step shown,
          on a CPU the median step (robust to other processes).
accuracy  wall time of jobs/configs/speed.yaml to reach its target test accuracy, mean over seeds,
          by running the real trainer. Runs on a GPU; on a CPU only when named in --parts (hours).

--quick is a CPU-sized version (a few minutes on 2 cores): one measured loader epoch, three small
networks at a small batch for a few steps, no accuracy part. The results, with the command, commit,
device, software and data they came from, go to --json PATH (written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from trainer import UserError, cli, models, provenance
from trainer.config import DataConfig
from trainer.data.cifar10 import MEAN, STD, data_record
from trainer.data.loaders import MEAN_PIXEL, build_loaders, check_data_dir
from trainer.distributed import device_name
from trainer.files import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
SPEED_CONFIG = REPO / "jobs/configs/speed.yaml"
SPEED_TARGET = 94.0  # test accuracy (%) the speed profile aims at (Page; airbench94)

# Peak dense bf16 tensor throughput (FLOP/s) by device name, from the vendors' data sheets; the
# first entry whose text is in the name wins, so the specific names come first. Unknown: no MFU.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (the name reads "H100 80GB HBM3")
    ("H200", 989e12),  # also GH200: the same H100-class tensor cores
    ("A100", 312e12),
)

# The loader part's recipe: the same on all three loaders.
LOADER_BATCH = 512
AUGMENT = {"flip": True, "translate": 4, "cutout": 8}


@dataclass
class Settings:
    """What one run measures; --quick and --smoke shrink the full (GPU-sized) defaults."""

    loader_epochs: int = 3  # measured epochs per loader (at least; and 3 s of them), after a warm-up epoch
    loader_images: int = 0  # train on the first N images only (0 = all 50,000)
    archs: tuple[str, ...] = ()
    step_batch: int = 256
    step_steps: int = 20  # measured steps per mode
    step_warmup: int = 3  # steps before timing (compile happens in the first)
    seeds: int = 1


def full_settings() -> Settings:
    return Settings(archs=tuple(models.seed_names()) + ("resnet9",))


def quick_settings() -> Settings:
    return Settings(loader_epochs=1, archs=("resnet9_tiny", "mobilenet", "resnet9"), step_batch=32, step_steps=5,
                    step_warmup=2)


def smoke_settings() -> Settings:
    """For the tests: every part's code path in well under a minute of measuring."""
    return Settings(loader_epochs=1, loader_images=4096, archs=("resnet9_tiny",), step_batch=16, step_steps=2,
                    step_warmup=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------------------------
# Loaders


class TorchvisionCifar(torch.utils.data.Dataset):
    """CIFAR-10 as most PyTorch code feeds it: PIL images through per-sample torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class Cutout:
    """A `side` x `side` square inside the image set to 0 (the mean colour after Normalize), as
    ffcv's Cutout places it; a few microseconds a sample (torchvision's RandomErasing, drawing a
    random area and aspect ratio first, takes about 80)."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import random

        top = random.randint(0, image.shape[-2] - self.side)
        left = random.randint(0, image.shape[-1] - self.side)
        image[..., top : top + self.side, left : left + self.side] = 0
        return image


def torchvision_loader(images: np.ndarray, labels: np.ndarray, device: torch.device, workers: int):
    """The baseline: the same augmentations as the other loaders, per sample, in worker processes."""
    import torchvision.transforms as T

    transform = T.Compose([
        T.RandomCrop(32, padding=AUGMENT["translate"], fill=MEAN_PIXEL),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
        Cutout(AUGMENT["cutout"]),
    ])
    return torch.utils.data.DataLoader(
        TorchvisionCifar(images, labels, transform), batch_size=LOADER_BATCH, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=True, pin_memory=device.type == "cuda",
    )


def time_loader(loader, device: torch.device, epochs: int, threads: int, min_seconds: float = 3.0) -> dict:
    """Images/s of the median epoch among at least `epochs` full epochs and `min_seconds` of them,
    after one warm-up epoch (whose seconds are kept apart). A fast loader's epoch lasts a fraction
    of a second, which a burst of another process's work can spoil; the median of many is robust."""

    def epoch() -> tuple[int, float]:
        torch.set_num_threads(threads)
        start, n = time.perf_counter(), 0
        for x, y in loader:
            x = x.to(device, non_blocking=True)  # a no-op for the loaders that deliver on the device
            y = y.to(device, non_blocking=True)
            n += y.shape[0]
        _sync(device)
        return n, time.perf_counter() - start

    _, warmup_s = epoch()
    speeds, images, seconds = [], 0, 0.0
    while len(speeds) < epochs or seconds < min_seconds:
        n, s = epoch()
        speeds.append(n / s)
        images, seconds = n, seconds + s
    return {"images_per_s": float(np.median(speeds)), "warmup_s": warmup_s, "epochs": len(speeds),
            "images_per_epoch": images, "epoch_images_per_s": speeds}


def bench_loaders(data_dir: Path, device: torch.device, s: Settings, threads: int) -> dict:
    from trainer.data.resident import read_beton

    workers = _cores()
    cfg = DataConfig(dir=str(data_dir), batch_size=LOADER_BATCH, num_workers=workers, dtype="float32",
                     channels_last=True, train_subset=s.loader_images, test_subset=LOADER_BATCH, **AUGMENT)
    results = {}

    images, labels = read_beton(data_dir / "train.beton", s.loader_images or None, workers)
    baseline = torchvision_loader(images.numpy(), labels.numpy(), device, workers)
    results["dataloader"] = time_loader(baseline, device, s.loader_epochs, threads)
    del baseline  # stops its worker processes

    start = time.perf_counter()
    train, _ = build_loaders(replace(cfg, loader="ffcv"), device, seed=0, threads=threads)
    build_s = time.perf_counter() - start
    results["ffcv"] = {**time_loader(train, device, s.loader_epochs, threads), "build_s": build_s}
    del train

    start = time.perf_counter()
    train, _ = build_loaders(replace(cfg, loader="resident"), device, seed=0, threads=threads)
    build_s = time.perf_counter() - start
    results["resident"] = {**time_loader(train, device, s.loader_epochs, threads), "build_s": build_s}
    del train

    base = results["dataloader"]["images_per_s"]
    for r in results.values():
        r["ratio"] = r["images_per_s"] / base
    return results


def print_loader_table(r: dict, device: torch.device) -> None:
    print(f"\nloader: training images/s (median epoch), batch {LOADER_BATCH}, flip + translate {AUGMENT['translate']} + "
          f"cutout {AUGMENT['cutout']}, float32, on {device.type}; ratio to the DataLoader")
    rows = [("torch DataLoader + torchvision", "dataloader"), ("FFCV", "ffcv"), ("resident", "resident")]
    print(f"  {'loader':<32}{'img/s':>10}{'ratio':>8}{'warm-up s':>11}{'build s':>9}{'epochs':>8}")
    for label, key in rows:
        x = r[key]
        build = f"{x['build_s']:.1f}" if "build_s" in x else "-"
        print(f"  {label:<32}{x['images_per_s']:>10,.0f}{x['ratio']:>7.2f}x{x['warmup_s']:>11.1f}{build:>9}"
              f"{x['epochs']:>8}")


# ---------------------------------------------------------------------------------------------
# Training steps

MODES = {  # name: (autocast, torch.compile, channels_last)
    "eager_fp32": (False, False, False),
    "amp": (True, False, False),
    "compiled_amp": (True, True, True),
}


def amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def time_steps(arch: str, device: torch.device, mode: str, s: Settings) -> dict:
    """Images/s of full training steps (forward, loss, backward, SGD) on one synthetic batch."""
    autocast, use_compile, channels_last = MODES[mode]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = models.build(arch).to(device, memory_format=memory_format).train()
    net = torch.compile(model) if use_compile else model
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast and dtype == torch.float16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.2)
    x = torch.randn(s.step_batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (s.step_batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = criterion(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    start = time.perf_counter()
    for _ in range(s.step_warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":  # the whole block, so that the GPU runs ahead of the host as in training
        start = time.perf_counter()
        for _ in range(s.step_steps):
            step()
        _sync(device)
        step_s = (time.perf_counter() - start) / s.step_steps
    else:  # a CPU step is synchronous: time each, keep the median (robust to other processes' bursts)
        times = []
        for _ in range(s.step_steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        step_s = float(np.median(times))
    del net, model, optimizer
    if use_compile:
        torch._dynamo.reset()
    return {"images_per_s": s.step_batch / step_s,
            # the warm-up beyond what its steps would take at the measured speed: compiling, mostly
            "compile_s": max(0.0, warmup_s - step_s * s.step_warmup) if use_compile else None}


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def bench_steps(device: torch.device, s: Settings, threads: int) -> dict:
    from trainer.models.__main__ import forward_flops

    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    results = {}
    for arch in s.archs:
        torch.set_num_threads(threads)
        r = {mode: time_steps(arch, device, mode, s) for mode in MODES}
        base = r["eager_fp32"]["images_per_s"]
        train_flops = 3 * forward_flops(models.build(arch))  # per image: forward + backward (2x forward)
        results[arch] = {
            "eager_fp32": base,
            "amp": r["amp"]["images_per_s"],
            "compiled_amp": r["compiled_amp"]["images_per_s"],
            "step_ratio_amp": r["amp"]["images_per_s"] / base,
            "step_ratio_compiled_amp": r["compiled_amp"]["images_per_s"] / base,
            "compile_s": r["compiled_amp"]["compile_s"],
            "train_gflops_per_image": train_flops / 1e9,
            # model FLOPs utilisation of the compiled AMP step; None off a GPU or on an unknown card
            "mfu": train_flops * r["compiled_amp"]["images_per_s"] / peak if peak else None,
        }
        print(f"  {arch}: done", file=sys.stderr, flush=True)
    return results


def print_step_table(r: dict, device: torch.device, s: Settings) -> None:
    amp = "bf16" if amp_dtype(device) == torch.bfloat16 else "fp16"
    timing = "the block" if device.type == "cuda" else "the median step"
    print(f"\nstep: training images/s on {device_name(device)}, batch {s.step_batch}, {timing} of {s.step_steps} after "
          f"{s.step_warmup} warm-up; AMP = {amp} autocast; ratios to eager fp32")
    print(f"  {'arch':<16}{'eager fp32':>11}{'AMP':>10}{'AMP x':>7}{'compiled':>10}{'comp. x':>8}{'compile s':>10}"
          f"{'MFU':>7}")
    for arch, x in r.items():
        mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] is not None else "-"
        print(f"  {arch:<16}{x['eager_fp32']:>11,.0f}{x['amp']:>10,.0f}{x['step_ratio_amp']:>6.2f}x"
              f"{x['compiled_amp']:>10,.0f}{x['step_ratio_compiled_amp']:>7.2f}x{x['compile_s']:>10.1f}{mfu:>7}")


# ---------------------------------------------------------------------------------------------
# Time to accuracy


def bench_accuracy(data_dir: Path, seeds: int, target: float) -> dict:
    """Runs the trainer on the speed profile once per seed; per run, the training wall time
    (compile and per-epoch evaluation included, as the trainer counts it) until the test accuracy
    first reached the target."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        for seed in range(seeds):
            run_dir = Path(tmp) / f"seed{seed}"
            cmd = [sys.executable, "-m", "trainer", "--config", str(SPEED_CONFIG), "--run-dir", str(run_dir),
                   f"data.dir={data_dir}", f"train.seed={seed}", "logging.mode=disabled"]
            start = time.perf_counter()
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if r.returncode != 0:
                raise UserError(f"the speed profile's run (seed {seed}) failed: {r.stderr.strip()[-2000:]}")
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            hit = next((m for m in rows if m["test_acc"] >= target), None)
            runs.append({"seed": seed, "time_to_target_s": hit["elapsed_s"] if hit else None,
                         "epoch_reached": hit["epoch"] if hit else None, "final_test_acc": rows[-1]["test_acc"],
                         "train_s": rows[-1]["elapsed_s"], "process_wall_s": wall, "epochs": len(rows)})
            print(f"  seed {seed}: done", file=sys.stderr, flush=True)
    times = [r["time_to_target_s"] for r in runs]
    return {
        "config": str(SPEED_CONFIG.relative_to(REPO)),
        "target_acc": target,
        "runs": runs,
        "reached": sum(t is not None for t in times),
        "mean_time_to_target_s": float(np.mean(times)) if all(t is not None for t in times) else None,
        "mean_final_test_acc": float(np.mean([r["final_test_acc"] for r in runs])),
    }


def print_accuracy_table(r: dict) -> None:
    if "skipped" in r:
        print(f"\ntime to accuracy: skipped ({r['skipped']})")
        return
    print(f"\ntime to accuracy: {r['config']} to {r['target_acc']}% test accuracy, training seconds incl. "
          f"compile and evaluation")
    print(f"  {'seed':<6}{'to target s':>12}{'epoch':>7}{'final acc':>11}{'train s':>9}{'process s':>11}")
    for x in r["runs"]:
        hit = f"{x['time_to_target_s']:.1f}" if x["time_to_target_s"] is not None else "not reached"
        print(f"  {x['seed']:<6}{hit:>12}{x['epoch_reached'] or '-':>7}{x['final_test_acc']:>10.2f}%"
              f"{x['train_s']:>9.1f}{x['process_wall_s']:>11.1f}")
    mean = r["mean_time_to_target_s"]
    print(f"  mean: {f'{mean:.1f} s' if mean is not None else 'n/a'} to target ({r['reached']}/{len(r['runs'])} "
          f"reached), final accuracy {r['mean_final_test_acc']:.2f}%")


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = smoke_settings() if args.smoke else quick_settings() if args.quick else full_settings()
    if args.archs:
        s.archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
        unknown = [a for a in s.archs if a not in models.names()]
        if unknown:
            raise UserError(f"--archs: unknown architecture(s) {', '.join(unknown)}; valid: {', '.join(models.names())}")
    for name in ("batch", "steps", "loader_epochs", "seeds"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be positive, got {value}")
            setattr(s, {"batch": "step_batch", "steps": "step_steps"}.get(name, name), value)
    parts = [p.strip() for p in args.parts.split(",")] if args.parts else ["loader", "step", "accuracy"]
    if set(parts) - {"loader", "step", "accuracy"}:
        raise UserError(f"--parts: expected a comma-separated subset of loader,step,accuracy, got '{args.parts}'")
    data_dir = check_data_dir(args.data).resolve()
    threads = args.threads or _cores()
    if threads < 0:
        raise UserError(f"--threads: must be positive, got {threads}")
    torch.set_num_threads(threads)
    load = os.getloadavg()

    result: dict = {
        "command": " ".join(["python", "-m", "trainer.bench", *sys.argv[1:]]),
        "git_sha": provenance.git_sha(),
        "device": device_name(device),
        "torch_version": torch.__version__,
        "data": data_record(data_dir),
        "date": datetime.now().isoformat(timespec="seconds"),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "threads": threads,
        "load_average_at_start": list(load),
    }
    print(f"trainer.bench ({result['mode']}) on {result['device']}, torch {torch.__version__}, {threads} threads; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)

    if "loader" in parts:
        loaders = bench_loaders(data_dir, device, s, threads)
        result["loader"] = loaders
        result["loader_ratio_ffcv"] = loaders["ffcv"]["ratio"]
        result["loader_ratio_resident"] = loaders["resident"]["ratio"]
        print_loader_table(loaders, device)
    if "step" in parts:
        result["step_settings"] = {"batch": s.step_batch, "steps": s.step_steps, "warmup_steps": s.step_warmup,
                                   "amp_dtype": str(amp_dtype(device)).removeprefix("torch."),
                                   "peak_flops": peak_flops(result["device"]) if device.type == "cuda" else None}
        result["step"] = bench_steps(device, s, threads)
        print_step_table(result["step"], device, s)
    if "accuracy" in parts:
        if device.type != "cuda" and not (args.parts and "accuracy" in args.parts):
            why = "--quick: not on a CPU" if args.quick or args.smoke else "no GPU: hours on a CPU; --parts accuracy forces it"
            result["time_to_accuracy"] = {"skipped": why}
        elif args.quick or args.smoke:
            result["time_to_accuracy"] = {"skipped": "--quick"}
        else:
            result["time_to_accuracy"] = bench_accuracy(data_dir, s.seeds, args.target)
        print_accuracy_table(result["time_to_accuracy"])

    result["load_average_at_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - started
    print(f"\n{result['wall_s']:.0f} s in all; load average at the end {result['load_average_at_end'][0]:.2f}")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"results in {args.json}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a CPU-sized run: a few minutes on 2 cores")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the tests' even smaller run
    parser.add_argument("--json", type=Path, help="write the results (and their provenance) here")
    parser.add_argument("--data", type=Path, default=Path("data/cifar10"), help="the .beton folder (default data/cifar10)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--parts", help="comma-separated subset of loader,step,accuracy (default: all)")
    parser.add_argument("--archs", help="comma-separated architectures for the step part")
    parser.add_argument("--batch", type=int, help="batch size of the step part")
    parser.add_argument("--steps", type=int, help="measured steps per mode in the step part")
    parser.add_argument("--loader-epochs", type=int, help="measured epochs per loader")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: the cores; loader workers are always one per core)")
    parser.add_argument("--seeds", type=int, help="runs of the speed profile to average (default 1)")
    parser.add_argument("--target", type=float, default=SPEED_TARGET, help=f"test accuracy %% to reach (default {SPEED_TARGET})")
    args = parser.parse_args()
    cli.run(lambda: run(args))


if __name__ == "__main__":
    main()
