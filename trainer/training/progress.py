"""What a run has done so far, as one record: checkpointed with every last.pt and restored whole."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Best:
    """The epoch with the best test accuracy so far."""

    test_acc: float = -1.0  # below any real accuracy, so the first epoch is always the best so far
    epoch: int = 0
    train_acc: float = 0.0  # in that epoch, as the seed's table has it
    elapsed_s: float = 0.0  # training wall time when it was reached


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # steps done in the epoch in progress; 0 between epochs
    global_step: int = 0
    best: Best = field(default_factory=Best)
    bad_epochs: int = 0  # epochs since the best one
    elapsed_s: float = 0.0  # training wall time over all segments of the run
    last_test_acc: float | None = None
    wandb_run_id: str | None = None  # so a resumed run goes on logging to the same W&B run

    @property
    def mid_epoch(self) -> bool:
        return self.epoch_step > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, so a checkpoint holding them loads with weights_only=True."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Progress:
        """The progress stored in `state` (a checkpoint's top level; other keys are ignored)."""
        values = {f.name: state[f.name] for f in fields(cls)}
        return cls(**{**values, "best": Best(**values["best"])})
