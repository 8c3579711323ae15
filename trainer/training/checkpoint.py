"""Checkpoints in the run folder's checkpoints/: written atomically, loadable with `weights_only=True`.

`last.pt` holds the whole training state and is replaced at every save; the one it replaces is kept
as `prev.pt`, so a `last.pt` that was cut short (a full disk, a node lost mid-write on a non-atomic
filesystem) or is otherwise unreadable is reported and the previous good state is used instead.
`best.pt` holds the model weights of the selected epoch so far: the best validation accuracy with a
validation split (data.val_split), else the best test accuracy.

The training state: the state_dict of each stateful part (model, ema, optimizer, scheduler, scaler,
lookahead), the progress (its fields at the top level, the budget plan among them), the partial
epoch's sums, every rank's random number generators, the world size, the architecture and the config.
A Checkpointer is given the run's parts by those names and saves and restores them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import random
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer import UserError
from trainer.cli import first_line, naming
from trainer.config import PLACEMENT_KEYS, Config, ModelConfig, flat, matches, to_dict
from trainer.distributed import Dist
from trainer.files import atomic_path, remove_stale_temp_files
from trainer.run_files import RESTART_HINT
from trainer.training.collectives import all_gather_object
from trainer.training.progress import Best, Progress

if TYPE_CHECKING:
    from torch.distributed.checkpoint.stateful import Stateful

LAST, PREV, BEST = "last.pt", "prev.pt", "best.pt"


def save(state: dict[str, Any], path: Path, keep_previous: bool = False) -> None:
    with atomic_path(path) as tmp:
        # Through a Python file: torch's own writer turns a full disk into "unexpected pos N vs M";
        # a Python write raises the OSError, which torch's error then carries as its context.
        # Unbuffered, so that the failing write is the one torch makes, not a later flush.
        try:
            with open(tmp, "wb", buffering=0) as f:
                torch.save(state, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):  # e.g. ENOSPC: say so, naming the checkpoint
                raise OSError(e.__context__.errno, e.__context__.strerror, str(path)) from None
            raise
        if keep_previous and path.exists():
            os.replace(path, path.with_name(PREV))


def describe_load_error(e: Exception) -> str:
    """Why torch.load failed, in one line. torch's refusal of a pickle that is not plain weights is
    several paragraphs advising to load it unsafely; what matters is that it was refused."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        if "GLOBAL" in text:  # it names a function or class to call: code, not data
            return "not a weights-only checkpoint (refused: it would run code)"
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        reason = paragraphs[1].splitlines()[-1] if len(paragraphs) > 2 else "unsupported content"
        return f"not a weights-only checkpoint (refused: {reason})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first.split('. ')[0]}" if first else type(e).__name__


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's content, read with weights_only=True; ValueError with the reason in one line
    if the file is missing, cut short, not a checkpoint, or would run code when unpickled."""
    try:
        with warnings.catch_warnings():
            # A raw pickle (not torch.save's zip) draws torch's warning about its pickle protocol
            # before the refusal: the refusal is the one line to show.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong types: all mean "not usable"
        raise ValueError(describe_load_error(e)) from None
    if not isinstance(state, dict):
        raise ValueError(f"not a checkpoint (a {type(state).__name__}, not a dict)")
    return state


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in `folder` (last.pt, else prev.pt), or None if there is none.

    If there are checkpoints but none can be read, this raises UserError rather than returning
    None: starting afresh would overwrite best.pt and the metrics of a run that existed.
    """
    problems: list[tuple[Path, str]] = []
    for name in (LAST, PREV):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = load(path)
        except ValueError as e:
            problems.append((path, str(e)))
            continue
        for bad, why in problems:
            print(f"warning: {bad} is unreadable ({why}); resuming from {path.name}", file=sys.stderr)
        return state
    if problems:
        why = "; ".join(f"{path.name}: {reason}" for path, reason in problems)
        raise UserError(f"{folder}: no readable checkpoint to resume from ({why}); {RESTART_HINT}")
    return None


def remove_stale_saves(folder: Path) -> list[Path]:
    """Removes what a save killed mid-write left in `folder` (.last.pt.*.tmp, ...); returns them.
    Only for the process holding the run folder's lock: no one else may be saving now."""
    return [tmp for name in (LAST, PREV, BEST) for tmp in remove_stale_temp_files(folder / name)]


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators, as tensors and plain values (numpy's key array would not load
    with weights_only=True, so it is stored as a tensor). Of the GPUs only this process's own: a
    resumed process may see fewer GPUs (one per process under srun), and another rank's GPU
    generator is that rank's to save."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # written before one state per process: every visible GPU's
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def _check_same_model(folder: Path, saved: Mapping[str, Any], cfg: Config) -> None:
    """The model options (whitening, GELU, output stride...) are the network the weights belong to:
    some would load into another layout without an error (GELU has no weights) and train on as
    something else. Keys a checkpoint predates had their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    now = to_dict(cfg)["model"]
    changed = [k for k, v in now.items() if saved.get(k, defaults.get(k)) != v]
    if changed:
        was = ", ".join(f"model.{k}={saved.get(k, defaults.get(k))!r}" for k in changed)
        raise UserError(f"{folder}: this run began with {was}; the model options must stay as the run began; "
                        "use another --run-dir")


def _check_same_split(folder: Path, saved: dict, cfg: Config) -> None:
    """Refuses to resume with another validation split: the best epoch so far was selected on the
    saved one (or on the test set), and images it held out may already have been trained on."""
    # Absent from checkpoints written before the split existed: those had none.
    was = (saved.get("val_split", 0), saved.get("val_seed", 0))
    now = (cfg.data.val_split, cfg.data.val_seed)
    if was != now:
        raise UserError(f"{folder}: the run was started with data.val_split={was[0]} data.val_seed={was[1]}, not "
                        f"{now[0]} and {now[1]}; resume it with its own values, or use another --run-dir")


# What a resumed run may change: when it stops or evaluates, and where and how it runs (PLACEMENT_KEYS).
# Anything else (the recipe, the data it trains on, the seed, the precision) would make the folder's
# config.yaml claim the whole run trained as the resumed part did.
RESUMABLE_CHANGES = ("train.epochs", "train.patience", "train.budget_s", "train.eval_every", *PLACEMENT_KEYS)


def _check_same_recipe(folder: Path, saved: Mapping[str, Any], cfg: Config) -> None:
    """Refuses a resume whose config differs from the run's beyond RESUMABLE_CHANGES. Sections and
    keys a checkpoint predates had their defaults."""
    defaults = to_dict(Config(model=ModelConfig(arch=cfg.model.arch)))
    before = flat({section: {**values, **(saved.get(section) or {})} for section, values in defaults.items()})
    changed = [f"{name}={before.get(name)!r} (now {value!r})" for name, value in flat(to_dict(cfg)).items()
               if before.get(name) != value and not matches(name, RESUMABLE_CHANGES)]
    if changed:
        raise UserError(f"{folder}: this run began with {', '.join(changed)}; a resumed run trains as it began "
                        "(only when it stops, where it logs and how this machine runs it may change); resume "
                        "without those overrides, or use another --run-dir")


class Checkpointer:
    """The run's checkpoints in `folder`: it owns the state saved and restored. `parts` are the run's
    stateful parts (each with state_dict and load_state_dict; None where this run has none) under the
    names last.pt keeps them by: model, ema, optimizer, scheduler, scaler, lookahead. The progress
    and the partial epoch's sums are the trainer's, passed at each save."""

    def __init__(self, folder: Path, parts: Mapping[str, Stateful | None], group: Dist, cfg: Config) -> None:
        self.folder, self.parts, self.group, self.cfg = folder, dict(parts), group, cfg

    def training_state(self, progress: Progress, train_sums: torch.Tensor) -> dict[str, Any]:
        """What last.pt holds. A collective (it gathers every rank's generators): every rank calls it."""
        return {
            **{name: part.state_dict() if part is not None else None for name, part in self.parts.items()},
            **progress.to_dict(),
            "train_sums": train_sums.cpu(),
            "rng": all_gather_object(rng_state(self.group.device), self.group),
            "world_size": self.group.world_size,
            "arch": self.cfg.model.arch,
            "config": to_dict(self.cfg),
        }

    def save_last(self, progress: Progress, train_sums: torch.Tensor) -> None:
        """Writes the training state to last.pt, keeping the one it replaces as prev.pt. A collective
        (it gathers every rank's generators): every rank calls it; rank 0 writes."""
        state = self.training_state(progress, train_sums)
        if self.group.is_main:
            with naming(self.folder / LAST):  # a full disk: say where
                save(state, self.folder / LAST, keep_previous=True)

    def save_best(self, weights: dict[str, torch.Tensor], best: Best) -> None:
        """Writes best.pt (rank 0; the others have the same weights): the weights to deploy (the EMA's
        when there is one), what they scored, and what they were selected by (`val_acc` None: by the
        test accuracy, without a validation split)."""
        if not self.group.is_main:
            return
        state = {"model": weights, "arch": self.cfg.model.arch, "epoch": best.epoch, "test_acc": best.test_acc,
                 "val_acc": best.val_acc, "selected_by": "val" if best.val_acc is not None else "test",
                 "config": to_dict(self.cfg)}
        with naming(self.folder / BEST):
            save(state, self.folder / BEST)

    def cost_s(self, progress: Progress, train_sums: torch.Tensor, weights: dict[str, torch.Tensor]) -> float:
        """One checkpoint's cost on this rank, for the budget: last.pt's state gathered and serialised
        to memory, and best.pt's weights (an upper bound: best.pt is written only for a better epoch).
        A collective, as save_last."""
        start = time.perf_counter()
        torch.save(self.training_state(progress, train_sums), io.BytesIO())
        torch.save(weights, io.BytesIO())
        return time.perf_counter() - start

    def resume(self, train_sums: torch.Tensor) -> Progress | None:
        """Loads the newest readable training state into the parts and `train_sums` and this rank's
        generators; returns its progress, or None if there is nothing to resume."""
        folder, cfg, group = self.folder, self.cfg, self.group
        state = load_latest(folder)
        if state is None:
            return None
        if state["arch"] != cfg.model.arch:
            raise UserError(f"{folder}: holds a '{state['arch']}' run, not '{cfg.model.arch}'; use another --run-dir")
        _check_same_split(folder, state["config"]["data"], cfg)
        _check_same_model(folder, state["config"].get("model", {}), cfg)
        _check_same_recipe(folder, state["config"], cfg)
        for name, part in self.parts.items():
            # e.g. an EMA or lookahead switched on when resuming starts afresh (absent: written before it existed)
            if part is not None and state.get(name) is not None:
                try:
                    part.load_state_dict(state[name])
                except (RuntimeError, ValueError, KeyError) as e:
                    # The layout the config builds (model.* options, optim.bias_lr_mult's parameter
                    # groups) is not the one the run began with: torch's message spans many lines.
                    raise UserError(f"{folder}: its {name} state does not fit this config ({first_line(e)}); the model "
                                    "options and optim.bias_lr_mult must stay as the run began; use another "
                                    "--run-dir") from None
        train_sums.copy_(state["train_sums"])
        progress = Progress.from_dict(state)
        if state["world_size"] == group.world_size:
            set_rng_state(state["rng"][group.rank], group.device)
        else:  # a different number of ranks cannot replay the same random streams
            torch.manual_seed(cfg.train.seed + 1 + group.rank + 1000 * progress.global_step)
        return progress
