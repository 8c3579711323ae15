"""Typed, strict run configuration: dataclasses filled from YAML files and `key=value` overrides.

A config file may name another one to start from (`extends: base.yaml`, relative to itself); its
values are laid over that file's, then the command-line overrides over both. The strict loader
(trainer/strict_yaml.py) checks every layer against the dataclasses below, so an error is one line
naming the file (or the override) and the dotted key it is about.

The schema and load_config import nothing from trainer.models (which imports this module), so
model.arch is checked against the registry by the commands that load a run config: they pass
`archs=models.names()` to load_config (main, `python -m trainer.config`, is one of them).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.files import write_text_atomic
# ConfigError is the loader's: importers of this module get it here too.
from trainer.strict_yaml import (
    REQUIRED, ConfigError, Retired, load_dataclass, parse_override, parse_yaml, read_layers, sources,
)

# Keys and choices of older versions, kept only to name their replacement in the error.
RETIRED = Retired(
    keys={
        # Two stop mechanisms overlapped; budget_s fits the schedule to the time instead of cutting it.
        "train.time_budget_s": "use train.budget_s=N (fits the steps to N seconds and ends mid-epoch if need be)",
    },
    values={
        "onecycle": "triangle",  # linear warm-up then linear decay, fixed momentum: not torch's OneCycleLR
    },
)


IMAGE_SIDE = 32  # CIFAR-10's images are 32x32: the bound of data.translate and data.cutout

# Keys that say where and how a machine runs a run, not what it computes: the same data in another
# folder, loader workers, threads, compiling, how often the ranks agree, how long they wait, where
# it logs. A resume may change them (training/checkpoint.py), and runs that differ only in them (and
# the seed) are seeds of one recipe in the report (report/runs.py). A key ending in "." is a section.
PLACEMENT_KEYS = ("data.dir", "data.num_workers", "train.threads", "train.compile", "train.stop_check_s",
                  "train.dist_timeout_s", "logging.")


def flat(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A config's to_dict (or a saved one) as {"section.key": value}."""
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def matches(name: str, keys: tuple[str, ...]) -> bool:
    """Whether "section.key" `name` is one of `keys` (a key ending in "." stands for its section)."""
    return any(name == k or (k.endswith(".") and name.startswith(k)) for k in keys)

# ---------------------------------------------------------------------------------------------
# The schema. Defaults are the project's shared recipe; jobs/configs/*.yaml set per-arch values.


@dataclass
class DataConfig:
    dir: str = "data/cifar10"  # holds train.beton and test.beton (python -m trainer.data prepare)
    # What data.dir holds. beton: train.beton and test.beton (python -m trainer.data prepare).
    # python: CIFAR-10's official "python version" batch files (data_batch_1..5, test_batch,
    # batches.meta), read without ffcv: the resident loader only; for a machine where ffcv does not
    # install or import (the GPU check falls back to it).
    format: Literal["beton", "python"] = "beton"
    # The global batch: each of the N processes trains on batch_size / N images a step (N must divide
    # it), so the recipe trains the same on any number of GPUs; optim.lr is per 256 images of it.
    batch_size: int = 256
    num_workers: int = 4  # ffcv decoding threads per process; lowered (one warning) to the cores this process may use
    flip: bool = True  # random horizontal flip
    translate: int = 4  # random translation by up to this many pixels (zero padding); 0 = off
    cutout: int = 0  # side of a square cut out of each training image; 0 = off
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # what the loaders hand out
    channels_last: bool = True  # NHWC batches: faster convolutions on GPUs and on the CPU
    train_subset: int = 0  # train on the first N images only (0 = all 50,000): smoke runs
    test_subset: int = 0  # evaluate on the first N test images only (0 = all 10,000)
    # ffcv: decoded and augmented by ffcv's worker threads each epoch (trainer/data/ffcv_loader.py).
    # resident: the whole set read once onto the training device, augmented there batch-wise with
    # seeded torch ops, so a resumed epoch replays its augmentations too (trainer/data/resident.py).
    loader: Literal["ffcv", "resident"] = "ffcv"
    # Hold out N training images (N/10 per class) as a validation set: the best epoch, best.pt and
    # early stopping are then chosen on it, never on the test set. Drawn from all of train.beton
    # before train_subset, which then takes the first images of the rest; 0 = off (select on test).
    val_split: int = 0
    val_seed: int = 0  # which images are held out; the same on every rank and every resume
    # The on-device augmentations below exist in the resident loader only (batch-wise seeded torch
    # ops; ffcv's pipeline has none of them).
    # random: each image mirrored with probability 1/2 every epoch. alternate (airbench): a seeded
    # random half in the first epoch, then every image mirrored in alternate epochs, so any two
    # consecutive epochs show each image both ways.
    flip_mode: Literal["random", "alternate"] = "random"
    # What a translation shifts in: fill (the mean colour, as ffcv's RandomTranslate) or reflect
    # (the image mirrored at its border, as torch's reflect padding).
    translate_mode: Literal["fill", "reflect"] = "fill"
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup (Zhang et al. 2018): images and labels mixed in pairs; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix (Yun et al. 2019): a box pasted from the partner image; 0 = off
    mix_prob: float = 1.0  # the probability a batch is mixed at all; with both on, each mixed batch picks one of them

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "num_workers")
        _non_negative(self, "translate", "cutout", "train_subset", "test_subset", "val_split", "val_seed",
                      "mixup", "cutmix")
        # A cutout square or a shift as large as the image leaves nothing of it; with the ffcv loader,
        # a larger cutout also raised in a loader thread and left the main process waiting forever.
        for name in ("translate", "cutout"):
            if getattr(self, name) >= IMAGE_SIDE:
                raise ValueError(f"{name}: pixels inside the {IMAGE_SIDE}x{IMAGE_SIDE} image: at most "
                                 f"{IMAGE_SIDE - 1}, got {getattr(self, name)}")
        if self.val_split % 10:
            raise ValueError(f"val_split: must be a multiple of 10 (N/10 images of each class), got {self.val_split}")
        if not 0 <= self.mix_prob <= 1:
            raise ValueError(f"mix_prob: must be in [0, 1], got {self.mix_prob}")
        if self.format == "python" and self.loader != "resident":
            raise ValueError("format: python (the batch files, no ffcv) needs data.loader=resident")
        if self.loader != "resident":
            on_device = {"flip_mode": self.flip_mode != "random", "translate_mode": self.translate_mode != "fill",
                         "mixup": self.mixup > 0, "cutmix": self.cutmix > 0}
            for name, used in on_device.items():
                if used:
                    raise ValueError(f"{name}: an on-device augmentation, needs data.loader=resident")


@dataclass
class ModelConfig:
    # A name from the registry (python -m trainer.models lists them); checked by load_config's archs.
    arch: str = REQUIRED
    # Options of the architecture (null/false = as the architecture is defined); an architecture that
    # lacks one refuses it by name (trainer/models/options.py says which has what).
    output_stride: int | None = None  # MobileNets/EfficientNet: 16 (2x2 final maps) or 8 (one stride-2 stage at stride 1)
    # ResNet-9s, airbench94: a frozen 2x2 patch-whitening first layer (airbench), fitted to the training images
    whiten: bool = False
    # gelu: every ReLU replaced by a GELU (airbench); relu: as the architecture defines it (airbench94 is GELU throughout)
    activation: Literal["relu", "gelu"] = "relu"
    bn_momentum: float | None = None  # BatchNorm running-statistics momentum (torch's convention; null: 0.1)
    bn_eps: float | None = None  # BatchNorm epsilon (null: 1e-5)
    bn_frozen_scale: bool = False  # BatchNorm scales fixed at 1, only the biases learn (airbench)
    dirac_init: bool = False  # 3x3 convolutions (all but the first) start as identity maps plus their usual init (airbench)

    def __post_init__(self) -> None:
        if self.output_stride not in (None, 8, 16):
            raise ValueError(f"output_stride: must be 8 or 16, got {self.output_stride}")
        if self.bn_momentum is not None and not 0 <= self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum: must be in [0, 1], got {self.bn_momentum}")
        if self.bn_eps is not None and self.bn_eps <= 0:
            raise ValueError(f"bn_eps: must be positive, got {self.bn_eps}")


@dataclass
class OptimConfig:
    lr: float = 0.1  # peak learning rate per 256 images of global batch (scaled linearly)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # not applied to BatchNorm weights and biases
    label_smoothing: float = 0.1
    # Per-iteration decay after the warmup: cosine, or triangle (linear down to zero; with the linear
    # warmup the learning rate draws a triangle, as in Page's schedule). airbench: airbench94's own
    # shape, 0.2 of the peak at the start, the peak at 23% of the steps, 0.07 at the end (linear in
    # between); it has its warmup built in, so it takes warmup_epochs 0.
    schedule: Literal["triangle", "cosine", "airbench"] = "cosine"
    warmup_epochs: float = 2.0  # linear warmup from zero, per iteration
    # Learning-rate multiplier of the BatchNorm biases (found by module type; other biases, such as the
    # whitening layer's, keep optim.lr): airbench trains them 64x faster than the weights. A network
    # without BatchNorm refuses it (trainer/training/optim.py).
    bias_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "lr", "bias_lr_mult")
        _non_negative(self, "momentum", "weight_decay", "label_smoothing", "warmup_epochs")
        if self.label_smoothing >= 1:
            raise ValueError("label_smoothing: must be below 1")
        if self.schedule == "airbench" and self.warmup_epochs:
            raise ValueError(f"warmup_epochs: schedule airbench has its own warmup (the peak at 23% of the steps); "
                             f"set optim.warmup_epochs=0, got {self.warmup_epochs:g}")


@dataclass
class TrainConfig:
    epochs: int = 150  # the budget, as the seed had
    patience: int = 20  # stop after this many epochs without a better test accuracy; 0 = never
    seed: int = 0
    # Autocast. auto: bf16 on GPUs that have it (fp16 with a GradScaler on older ones), and on CPUs
    # only where bf16 is native (AVX512-BF16 or AMX), else fp32: emulated bf16 is slower than fp32.
    # true: bf16 (fp16 on old GPUs) everywhere, emulated or not; false: fp32.
    amp: bool | Literal["auto"] = "auto"
    compile: bool | None = None  # torch.compile; null = on for CUDA, off on the CPU
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 = off
    tta: bool = False  # average predictions over the image and its mirror at test time
    # With tta: also the mirror pair shifted by this many pixels up-left and down-right (reflect
    # padding), weighted 1/4 each against 1/2 for the unshifted pair: 6 views (airbench's level 2). 0 = 2 views.
    tta_translate: int = 0
    # Lookahead-style weight averaging (airbench): every `lookahead_every` steps a slow copy of the
    # weights moves towards the trained ones and the network is reset to it; the slow copy's decay
    # rises as lookahead_decay x (step / total steps)^3, and the run ends on the slow weights. 0 = off.
    lookahead_every: int = 0
    lookahead_decay: float = 0.95**5
    # Fit the schedule to this much wall time (s; 0 = off): throughput is measured over the first
    # steps, then the total steps are set so that warmup, decay, evaluations and checkpoints end inside
    # it; train.epochs is then only an upper bound. The plan is checkpointed and the same on every rank.
    budget_s: float = 0.0
    # Evaluate the test (and validation) set, and save the epoch's checkpoints, every this many
    # epochs; 0 = only once, at the end of the run (airbench evaluates once). The last epoch is always
    # evaluated, and a stop signal still saves a checkpoint. Early stopping needs 1 (it counts epochs).
    eval_every: int = 1
    threads: int = 0  # torch CPU threads per process; 0 = the cores available / processes
    # Seconds between the ranks' checks for SIGTERM/SIGUSR2 inside an epoch: a stop waits about this
    # long; each check is one small host sync.
    stop_check_s: float = 5.0
    # The longest any collective (and joining the process group) may wait for the other ranks
    # before this rank fails: a crashed or cut-off peer ends the job in this time, not NCCL's
    # default 10 minutes or gloo's 30. Evaluation and checkpointing between two collectives must fit.
    dist_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _positive(self, "epochs", "stop_check_s", "dist_timeout_s")
        _non_negative(self, "patience", "threads", "tta_translate", "lookahead_every", "budget_s", "eval_every")
        if not 0 <= self.ema < 1:
            raise ValueError("ema: must be in [0, 1)")
        if not 0 <= self.lookahead_decay < 1:
            raise ValueError(f"lookahead_decay: must be in [0, 1), got {self.lookahead_decay}")
        if self.tta_translate >= 16:
            raise ValueError(f"tta_translate: a shift of a few pixels (airbench: 1), got {self.tta_translate}")
        if self.tta_translate and not self.tta:
            raise ValueError("tta_translate: the shifted views are mirror pairs; set train.tta=true too")
        if self.budget_s and self.patience:
            raise ValueError("patience: must be 0 with train.budget_s (the schedule is fitted to end at the budget)")
        if self.patience and self.eval_every != 1:
            raise ValueError(f"eval_every: early stopping (patience {self.patience}) evaluates every epoch; "
                             f"set train.eval_every=1 or train.patience=0, got {self.eval_every}")


@dataclass
class LoggingConfig:
    project: str = "cifar-infinity"  # W&B project
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff a key is set
    group: str | None = None  # W&B group: the sweep a run belongs to
    tags: list[str] = field(default_factory=list)
    log_every: int = 100  # steps between train-loss points (host syncs; besides the stop checks every train.stop_check_s)
    # How long W&B may take to start online (wandb's own default waits 90 s without a network); past
    # it the run logs offline instead, to upload later with `wandb sync`.
    init_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _positive(self, "log_every", "init_timeout_s")


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        # Without autocast the network runs in float32, and half-precision batches would meet
        # float32 weights in the first layer. Casting them back would train on rounded images the
        # user did not ask for, so the combination is refused instead. train.amp=auto turns
        # autocast off on CPUs without native bf16, so it is refused here too, on every machine: a
        # config that loads on a login node and fails on the compute node would be worse.
        if self.train.amp is not True and self.data.dtype != "float32":
            why = ("train.amp=false runs the network in float32" if self.train.amp is False else
                   "train.amp=auto runs the network in float32 on CPUs without native bf16")
            raise ValueError(
                f"data.dtype={self.data.dtype} needs autocast, but {why}; "
                "set data.dtype=float32 (or train.amp=true)"
            )


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name}: must be positive, got {getattr(obj, name)}")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ValueError(f"{name}: must not be negative, got {getattr(obj, name)}")


def build_config(layers: list[tuple[str, Any]]) -> Config:
    return load_dataclass(Config, layers, RETIRED)


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), *, archs: Collection[str] = ()
) -> Config:
    """The config in `path` (None: defaults only), with `key=value` overrides applied last.

    archs: the architectures model.arch may name (models.names()); a command passes them, so an
    unknown one is an error before anything starts. Empty: not checked (the schema alone)."""
    layers = read_layers(Path(path)) if path is not None else []
    layers += [(f"override '{o}'", parse_override(o)) for o in overrides]
    cfg = build_config(layers)
    if archs and cfg.model.arch not in archs:
        raise ConfigError(f"{sources(layers)}: model.arch: unknown architecture '{cfg.model.arch}'; "
                          f"valid: {', '.join(sorted(archs))}")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def from_yaml(text: str, source: str = "<string>") -> Config:
    return build_config([(source, parse_yaml(text, source))])


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    write_text_atomic(path, to_yaml(cfg))
