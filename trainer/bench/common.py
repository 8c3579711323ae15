"""What the bench's parts share: the sizes a run measures at, and the results file they add to."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from trainer import models
from trainer.files import write_text_atomic


@dataclass
class Settings:
    """What one run measures; --quick and --smoke shrink the full (GPU-sized) defaults."""

    loader_epochs: int = 3  # measured epochs per loader (at least; and loader_min_s of them), after a warm-up epoch
    loader_min_s: float = 3.0  # seconds of measured epochs per loader, at least: a median a burst cannot spoil
    loader_images: int = 0  # train on the first N images only (0 = all)
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
    """For the tests: every part's code path on a few batches; 2,048 images fit any CIFAR-10 copy."""
    return Settings(loader_epochs=1, loader_min_s=0.0, loader_images=2048, archs=("resnet9_tiny",), step_batch=16,
                    step_steps=2, step_warmup=2)


def cores() -> int:
    return len(os.sched_getaffinity(0))


class ResultsFile:
    """The --json file, rewritten atomically after every part with everything measured so far, so
    that a run stopped part-way (a time limit, a crash) leaves its finished parts on disk.

    The provenance is written before the first part; `parts_done` lists the parts whose numbers are
    in the file; `complete` turns true only at the end. Without a path it just collects the results.
    """

    def __init__(self, path: Path | None, header: dict, started: float) -> None:
        self.path = path
        self.started = started  # time.perf_counter() when the run began
        self.data: dict = {**header, "parts_done": [], "complete": False}
        self._write()  # at once, so that a results file from an earlier run is never taken for this one's

    def update(self, values: dict) -> None:
        """Numbers of a part still running (not listed in `parts_done`), written at once."""
        self.data.update(values)
        self._write()

    def add_part(self, name: str, values: dict) -> None:
        self.data.update(values)
        self.data["parts_done"].append(name)
        self._write()

    def finish(self) -> None:
        self.data["load_average_at_end"] = list(os.getloadavg())
        self.data["complete"] = True
        self._write()

    def _write(self) -> None:
        self.data["wall_s"] = time.perf_counter() - self.started
        if self.path is not None:
            write_text_atomic(self.path, json.dumps(self.data, indent=2) + "\n")
