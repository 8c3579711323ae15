"""Statistics over seeds for the report: each architecture (at each grid point) as mean ± std (n)
with a 95% confidence interval of the mean, which architectures' intervals overlap, and each
architecture's best grid point.

The interval is Student's t: mean ± t(0.975, n−1) · std / √n, with the sample standard deviation
(n−1 in the denominator). scipy is not a dependency, and neither numpy nor torch has t quantiles,
so the quantiles for up to 30 degrees of freedom are tabulated below (tests check each against a
numerical integral of the t density) and a Cornish-Fisher expansion, within 2e-4 of the exact value
from 30 on, covers more.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from trainer.report.runs import Run, is_number, primary_acc

# t(0.975, df) for df = 1..30: the two-sided 95% quantiles of Student's t distribution.
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom: must be at least 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964  # the normal quantile, corrected for df (Abramowitz & Stegun 26.7.5, two terms)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    std: float | None  # the sample standard deviation; None for a single value

    @property
    def half_width(self) -> float | None:
        """Half the 95% confidence interval of the mean; None without a spread to estimate."""
        return None if self.std is None else t975(self.n - 1) * self.std / math.sqrt(self.n)

    @property
    def interval(self) -> tuple[float, float] | None:
        h = self.half_width
        return None if h is None else (self.mean - h, self.mean + h)


def stats(values: list[float]) -> Stats | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stats(len(values), statistics.fmean(values), std)


def mean_text(s: Stats | None) -> str:
    """`93.12 ± 0.21 (3)`: mean ± sample std (runs); one run has no ±."""
    if s is None:
        return "-"
    return f"{s.mean:.2f} ({s.n})" if s.std is None else f"{s.mean:.2f} ± {s.std:.2f} ({s.n})"


def interval_text(s: Stats | None) -> str:
    interval = s.interval if s is not None else None
    return "-" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


@dataclass
class Group:
    """An architecture at one grid point: its runs, one per seed."""

    arch: str
    point: str | None
    runs: list[Run]

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    @property
    def label(self) -> str:
        return self.arch if self.point is None else f"{self.arch} {self.point}"

    @property
    def test(self) -> Stats | None:
        """Over the seeds' best test accuracies (each run's best epoch, as the seed's table)."""
        return stats([a for a in (primary_acc(r.summary) for r in self.finished) if math.isfinite(a)])  # NaN: named by read_run

    @property
    def val(self) -> Stats | None:
        """Over the seeds' validation accuracies: only when every finished run recorded one."""
        values = [r.summary.get("val_acc") for r in self.finished]
        if not values or not all(is_number(v) for v in values):
            return None
        return stats([v for v in values if math.isfinite(v)])


def groups(runs: list[Run]) -> list[Group]:
    """The runs grouped by architecture and grid point, in the order each group first appears."""
    found: dict[tuple[str, str | None], Group] = {}
    for r in runs:
        found.setdefault(r.group, Group(r.arch, r.point, [])).runs.append(r)
    return list(found.values())


def has_seeds(gs: list[Group]) -> bool:
    return any(len(g.finished) > 1 for g in gs)


def has_grid(gs: list[Group]) -> bool:
    return any(g.point is not None for g in gs)


def selection_metric(gs: list[Group]) -> str:
    """What picks an architecture's best point: validation accuracy when every finished run of the
    sweep recorded one, else the best test accuracy (then the choice itself has seen the test set)."""
    finished = [r for g in gs for r in g.finished]
    return "val_acc" if finished and all(is_number(r.summary.get("val_acc")) for r in finished) else "best_test_acc"


def best_points(gs: list[Group]) -> dict[str, Group]:
    """Each architecture's group with the highest mean of the selection metric (finished runs only)."""
    metric = selection_metric(gs)
    best: dict[str, Group] = {}
    for g in gs:
        s = g.val if metric == "val_acc" else g.test
        if s is None:
            continue
        held = best.get(g.arch)
        held_s = None if held is None else (held.val if metric == "val_acc" else held.test)
        if held_s is None or s.mean > held_s.mean:
            best[g.arch] = g
    return best


def overlap_text(gs: list[Group]) -> str:
    """Which architectures' 95% intervals overlap (each at its best point when there is a grid):
    overlapping intervals mean these seeds cannot order the two."""
    reps = sorted(best_points(gs).values(), key=lambda g: -g.test.mean)
    with_interval = [g for g in reps if g.test.interval is not None]
    single = [g.label for g in reps if g.test.interval is None]
    lines = []
    pairs = [(a, b) for i, a in enumerate(with_interval) for b in with_interval[i + 1:]
             if a.test.interval[0] <= b.test.interval[1] and b.test.interval[0] <= a.test.interval[1]]
    if len(with_interval) < 2:
        lines.append("Fewer than two architectures have an interval (two finished seeds or more), so none are compared.")
    elif pairs:
        lines.append("The 95% intervals of " + "; ".join(f"{a.label} and {b.label}" for a, b in pairs)
                     + " overlap: these seeds do not tell those architectures apart.")
        apart = len(with_interval) * (len(with_interval) - 1) // 2 - len(pairs)
        lines.append(f"The other {apart} pair(s) do not overlap." if apart else "Every pair overlaps.")
    else:
        lines.append("No two architectures' 95% intervals overlap.")
    if single:
        lines.append(f"With one finished run, no interval: {', '.join(single)}.")
    return " ".join(lines)


def seeds_section(gs: list[Group]) -> str:
    """Mean ± std over seeds and the 95% interval, one row per architecture (and grid point)."""
    grid = has_grid(gs)
    head = "| arch | point |" if grid else "| arch |"
    lines = [f"{head} test acc % mean ± std (n) | 95% interval of the mean | min | max | runs |",
             "| --- |" + (" --- |" if grid else "") + " ---: | ---: | ---: | ---: | --- |"]
    for g in sorted(gs, key=lambda g: -(g.test.mean if g.test else -1)):
        accs = [primary_acc(r.summary) for r in g.finished]
        low, high = (f"{min(accs):.2f}", f"{max(accs):.2f}") if accs else ("-", "-")
        cells = [g.arch, *([g.point or ""] if grid else []), mean_text(g.test), interval_text(g.test), low, high,
                 f"{len(g.finished)} of {len(g.runs)} finished"]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("The 95% confidence interval of the mean: mean ± t(0.975, n−1) · std / √n (Student's t; the sample "
            "std, n−1 in its denominator). " + overlap_text(gs))
    return "\n".join(["## Over seeds", "", *lines, "", note])


def grid_section(gs: list[Group]) -> str:
    """Every grid point's mean accuracy and each architecture's best point, with what chose it."""
    metric = selection_metric(gs)
    best = best_points(gs)
    lines = ["| arch | point | test acc % mean ± std (n) | val acc % mean | best point |",
             "| --- | --- | ---: | ---: | --- |"]
    for g in gs:
        val = f"{g.val.mean:.2f}" if g.val is not None else "-"
        lines.append(f"| {g.arch} | {g.point or ''} | {mean_text(g.test)} | {val} | {'★' if best.get(g.arch) is g else ''} |")
    if metric == "val_acc":
        how = "Best point: the highest mean validation accuracy (val_acc); the test accuracy did not choose it."
    else:
        how = ("Best point: the highest mean best test accuracy, since the summaries record no validation "
               "accuracy (val_acc): the choice has seen the test set, so the best point's test accuracy is optimistic.")
    picks = "; ".join(f"{arch}: {g.point} ({mean_text(g.test)})" for arch, g in best.items())
    return "\n".join(["## Grid", "", *lines, "", how, f"Best points: {picks or 'none finished'}."])
