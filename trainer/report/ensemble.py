"""The ensemble: the members' softmax outputs averaged over the test set, beside each member's own
accuracy computed the same way (a check against its summary's test accuracy at the selected epoch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from trainer import UserError
from trainer.data import build_loaders
from trainer.data.common import DTYPES, default_threads
from trainer.device import amp_dtype
from trainer.distributed import Dist
from trainer.report.runs import Run, load_best, primary_acc
from trainer.training.evaluate import predict


@dataclass
class EnsembleResult:
    members: list[str]
    member_correct: list[int]
    member_summary_acc: list[float]  # each run's summary's accuracy at its selected epoch (best.pt's), for the check
    correct: int
    total: int
    test_set: str

    def member_acc(self, i: int) -> float:
        return 100.0 * self.member_correct[i] / self.total

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / self.total


def _test_set(run: Run) -> tuple[str, int]:
    # The summary records the data folder resolved when the run trained; config.yaml may hold a
    # path relative to where it was started.
    data_dir = (run.summary.get("data") or {}).get("dir") or run.config.data.dir
    return str(data_dir), run.config.data.test_subset


def run_ensemble(members: list[Run], device: torch.device) -> EnsembleResult:
    """Averages the members' softmax outputs over the test set, read through the project's test loader
    (SEQUENTIAL, the run's normalisation), and counts each member's own correct answers the same way.

    Each member sees the batch as its own training run evaluated it: in its data.dtype, under its
    autocast, with its TTA views if it had them (tta, tta_translate).
    """
    sets = {_test_set(m) for m in members}
    if len(sets) > 1:
        raise UserError("the members were tested on different test sets: "
                        + "; ".join(f"{m.name}: {_test_set(m)[0]} (test_subset {_test_set(m)[1]})" for m in members))
    data_dir, subset = sets.pop()
    # One float32 loader for all: a member trained on bf16 batches gets x.to(bf16), which is exactly
    # what its loader's final Convert did.
    data = dataclasses.replace(members[0].config.data, dir=data_dir, dtype="float32")
    _, test = build_loaders(data, Dist.single(device), members[0].config.train.seed, default_threads())
    nets = []
    for m in members:
        net = load_best(m, device, m.config.data.channels_last)
        fmt = torch.channels_last if m.config.data.channels_last else torch.contiguous_format
        nets.append((net, DTYPES[m.config.data.dtype], fmt, amp_dtype(device, m.config.train.amp), m.config.train.tta,
                     m.config.train.tta_translate))

    member_correct = [0] * len(members)
    correct = total = 0
    with torch.no_grad():
        for x, y in test:
            probs = []
            for i, (net, input_dtype, fmt, amp, tta, tta_translate) in enumerate(nets):
                logits = predict(net, x.to(dtype=input_dtype, memory_format=fmt), tta, amp, tta_translate)
                member_correct[i] += int((logits.argmax(1) == y).sum())
                probs.append(logits.softmax(1))
            mean = torch.stack(probs).mean(0)
            correct += int((mean.argmax(1) == y).sum())
            total += y.shape[0]
    where = f"{total:,} test images of {data_dir}" + (f" (test_subset {subset})" if subset else "")
    return EnsembleResult([m.name for m in members], member_correct, [primary_acc(m.summary) for m in members],
                          correct, total, where)


def ensemble_text(e: EnsembleResult) -> str:
    lines = [f"Softmax outputs of the best checkpoints averaged over {e.test_set}; each member's accuracy is "
             "recomputed the same way, beside its summary's test accuracy at the selected epoch (best.pt's) as a check.", "",
             "| model | test acc % | correct | summary's test acc % |", "| --- | ---: | ---: | ---: |"]
    for i, name in enumerate(e.members):
        lines.append(f"| {name} | {e.member_acc(i):.2f} | {e.member_correct[i]:,} / {e.total:,} "
                     f"| {e.member_summary_acc[i]:.2f} |")
    lines.append(f"| ensemble of {len(e.members)} | {e.acc:.2f} | {e.correct:,} / {e.total:,} | |")
    best = max(range(len(e.members)), key=e.member_acc)
    lines += ["", f"Ensemble {e.acc:.2f}% vs the best single model, {e.members[best]}, {e.member_acc(best):.2f}%: "
                  f"{e.acc - e.member_acc(best):+.2f} points."]
    return "\n".join(lines)
