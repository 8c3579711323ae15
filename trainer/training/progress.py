"""What a run has done so far, as one record: checkpointed with every last.pt and restored whole."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trainer.training.budget import Plan


@dataclass(frozen=True)
class Best:
    """The selected epoch so far: the best validation accuracy when there is a validation split
    (data.val_split), else the best test accuracy. best.pt holds its weights."""

    test_acc: float = -1.0  # below any real accuracy, so the first epoch is always the best so far
    epoch: int = 0
    train_acc: float = 0.0  # in that epoch, as the seed's table has it
    elapsed_s: float = 0.0  # training wall time when it was reached
    val_acc: float | None = None  # None: no validation split, the epoch was selected on test_acc

    @property
    def score(self) -> float:
        """What the selection maximises."""
        return self.val_acc if self.val_acc is not None else self.test_acc


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # steps done in the epoch in progress; 0 between epochs
    global_step: int = 0
    best: Best = field(default_factory=Best)
    bad_epochs: int = 0  # epochs since the best (selected) one
    elapsed_s: float = 0.0  # training wall time over all segments of the run, compiling excluded
    compile_s: float = 0.0  # torch.compile's time over all segments (each process start compiles again)
    last_test_acc: float | None = None
    wandb_run_id: str | None = None  # so a resumed run goes on logging to the same W&B run
    # The best test accuracy of any epoch, whatever was selected: what the seed reported. With a
    # validation split it is an optimistic figure (chosen on the test set), kept for comparison.
    best_test_acc: float = -1.0
    best_test_epoch: int = 0
    last_val_acc: float | None = None
    # train.budget_s: the plan fitted to the budget, None until it is (or without a budget). A
    # resumed run follows it rather than measuring again, so every segment trains to the same end.
    plan: Plan | None = None
    # The last epoch whose test (and validation) set was evaluated: train.eval_every skips some.
    evaluated_epoch: int = 0
    last_train_acc: float = 0.0  # of the last epoch trained (its evaluation may come at the run's end)

    @property
    def mid_epoch(self) -> bool:
        return self.epoch_step > 0

    def record_epoch(self, test_acc: float, val_acc: float | None, train_acc: float) -> bool:
        """Notes the evaluation of the epoch just completed (self.epoch); True if it is the new
        selected epoch: a higher validation accuracy, or test accuracy without validation. Ties keep
        the earlier epoch."""
        self.last_test_acc, self.last_val_acc = test_acc, val_acc
        self.evaluated_epoch = self.epoch
        if test_acc > self.best_test_acc:
            self.best_test_acc, self.best_test_epoch = test_acc, self.epoch
        candidate = Best(test_acc, self.epoch, train_acc, self.elapsed_s, val_acc)
        if candidate.score > self.best.score:
            self.best, self.bad_epochs = candidate, 0
            return True
        self.bad_epochs += 1
        return False

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, so a checkpoint holding them loads with weights_only=True."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Progress:
        """The progress stored in `state` (a checkpoint's top level; other keys are ignored). Fields
        added since checkpoints were first written get what an older checkpoint implies: it selected
        on the test set, so its best epoch is also its best-test epoch, and it evaluated every epoch."""
        best = state["best"]
        implied = {"compile_s": 0.0, "best_test_acc": best["test_acc"], "best_test_epoch": best["epoch"],
                   "last_val_acc": None, "plan": None, "evaluated_epoch": state["epoch"],
                   "last_train_acc": best["train_acc"]}
        values = {f.name: state[f.name] if f.name in state or f.name not in implied else implied[f.name]
                  for f in fields(cls)}
        plan = Plan(**values["plan"]) if values["plan"] is not None else None
        return cls(**{**values, "best": Best(**best), "plan": plan})
