"""What a run has done so far, as one record (Progress, with a budget's Plan): checkpointed with
every last.pt and restored whole; the epoch's running figures on the device (EpochSums); and the
compile time not yet counted in it (CompileClock)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from trainer.training.collectives import all_reduce_max, all_reduce_sum


@dataclass(frozen=True)
class Plan:
    """A budget's plan (train.budget_s), fitted by budget.BudgetController and kept in the progress."""

    budget_s: float
    calibrated_at: int  # the global step at which the plan was fitted
    step_s: float  # one training step, on the slowest rank
    eval_s: float  # one evaluation (test set, and validation set if any), on the slowest rank
    checkpoint_s: float  # one checkpoint (last.pt's state and best.pt's weights serialised)
    margin_s: float
    total_steps: int  # the plan: training ends after this many steps, the schedule reaches zero there
    epochs: float  # total_steps in epochs
    images_per_s: float  # global images per second while training (steps only)
    # The re-fits of the plan's rest during the run: (at_step, step_s, total_steps) each, the step
    # time measured since the fit before it and the total fitted from it.
    refits: tuple[tuple[int, float, int], ...] = ()
    # Where the clock ended the plan (the budget's time up): its reading then; None otherwise.
    time_up_at_s: float | None = None

    def refitted(self, at_step: int, step_s: float, total_steps: int, steps_per_epoch: int) -> Plan:
        return replace(self, total_steps=total_steps, epochs=total_steps / steps_per_epoch,
                       refits=(*self.refits, (at_step, step_s, total_steps)))

    def ended(self, at_step: int, elapsed_s: float, steps_per_epoch: int) -> Plan:
        """The plan ended at `at_step` by the clock (`elapsed_s`): the budget's time is up."""
        return replace(self, total_steps=at_step, epochs=at_step / steps_per_epoch, time_up_at_s=elapsed_s)

    def record(self, elapsed_s: float) -> dict[str, Any]:
        """summary.json's `budget`: the plan (as re-fitted), and how the run used the budget."""
        return {"budget_s": self.budget_s, "fitted_steps": self.total_steps, "fitted_epochs": self.epochs,
                "images_per_s": self.images_per_s, "calibrated_at_step": self.calibrated_at, "step_s": self.step_s,
                "eval_s": self.eval_s, "checkpoint_s": self.checkpoint_s, "margin_s": self.margin_s,
                "refits": [{"at_step": at, "step_s": step_s, "total_steps": total} for at, step_s, total in self.refits],
                "time_up_at_s": self.time_up_at_s, "used_s": elapsed_s, "within_budget": elapsed_s <= self.budget_s}

    def describe(self) -> str:
        return (f"budget plan: {self.total_steps} steps ({self.epochs:.2f} epochs) in train.budget_s={self.budget_s:g}"
                f" (fitted at step {self.calibrated_at}: {self.step_s * 1000:.1f} ms/step, "
                f"{self.images_per_s:,.0f} img/s, evaluation {self.eval_s:.1f} s, checkpoint {self.checkpoint_s:.2f} s, "
                f"margin {self.margin_s:.1f} s)")


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
    # Wall time over all segments of the run: training (compiling included, compile_s of it) and
    # evaluating; what train.budget_s counts.
    elapsed_s: float = 0.0
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
        plan = values["plan"]
        if plan is not None:  # re-fits: tuples again (a checkpoint before them has none)
            plan = Plan(**{**plan, "refits": tuple(tuple(r) for r in plan.get("refits", ()))})
        return cls(**{**values, "best": Best(**best), "plan": plan})


class EpochSums:
    """The epoch's running figures, added up on the device after every step without a host sync:
    its loss sum, correct answers and images (`train`, checkpointed with the progress, so that a
    resumed epoch adds on), the loss sum and images since the last log (`window`), and the first
    step whose loss was not finite (`first_bad`, -1: none). Reading them is a collective."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.train = torch.zeros(3, device=device, dtype=torch.float64)
        self.window = torch.zeros(2, device=device, dtype=torch.float64)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def restart(self) -> None:
        """An epoch (or this segment of one) starts: the window and the non-finite check start over."""
        self.first_bad.fill_(-1)
        self.window.zero_()

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, step: int) -> None:
        """Adds a step's batch: its mean loss, logits and labels (class indices, or (B, 10)
        probabilities: a mixed image counts as the class it shows most of)."""
        loss = loss.detach().double()
        n = y.shape[0]  # a Python int: it reaches the device as a kernel argument, not a copied tensor
        count = torch.full_like(loss, n)
        labels = y.argmax(1) if y.ndim == 2 else y
        self.train += torch.stack([loss * n, (out.argmax(1) == labels).sum().double(), count])
        self.window += torch.stack([loss * n, count])
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)

    def totals(self) -> list[float]:
        """The epoch's loss sum, correct answers and images over all ranks."""
        return all_reduce_sum(self.train.clone(), self.device).tolist()

    def window_loss(self) -> float:
        """The mean loss since the last call, over all ranks; the window starts over."""
        window = all_reduce_sum(self.window, self.device)
        loss = (window[0] / window[1]).item()
        window.zero_()
        return loss

    def first_bad_step(self) -> int | None:
        """The epoch's first step (a global step) whose loss was not finite on any rank, if any."""
        bad = int(all_reduce_max(self.first_bad.clone(), self.device).item())
        return bad if bad >= 0 else None


class CompileClock:
    """This process's compile time: the first call of each compiled graph (one step or batch:
    negligible beside compiling), timed, until the epoch's metrics take it into the progress. The
    wall times and the budget include it (compiling is time the run spends, and must pay for itself
    inside a budget); it is reported apart so that a warm cache or another machine can be told apart."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.pending_s = device, 0.0

    def first_call(self, call: Callable[..., Any], *args: Any) -> None:
        start = time.perf_counter()
        call(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per graph: the compile ends when the work does
        self.pending_s += time.perf_counter() - start

    def take(self, progress: Progress) -> float:
        """The compile time since the last call, added to the progress's total."""
        taken, self.pending_s = self.pending_s, 0.0
        progress.compile_s += taken
        return taken
