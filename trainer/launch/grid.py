"""Seeds and grids: the jobs of a sweep, each named.

`--seeds N` trains every job N times with train.seed=0..N-1, and a comma list in an override
(`optim.lr=0.05,0.1 train.ema=0,0.999`) makes a grid: every combination x architecture x seed, all
in one job array. A job's name, which is its run folder's and its W&B run's, is the architecture,
then the grid point (lr0.05-ema0), then s<seed>: runs/<sweep>/resnet-lr0.05-ema0-s1/. Without
either, it is the architecture alone. More than CONFIRM_ABOVE jobs need --yes.
"""

from __future__ import annotations

from trainer import UserError
from trainer.strict_yaml import parse_override
from trainer.sweep_file import Job


# A sweep of more jobs than this (architectures x grid points x seeds) needs --yes: a typo in a
# grid (a list where one value was meant) should not fill a cluster's queue.
CONFIRM_ABOVE = 50
# ...and no sweep has more than this, --yes or not: SLURM's default MaxArraySize (1001) caps a job
# array's indices at 1000, and a launch of thousands is a typo (--seeds 200000) more often than a plan.
MAX_JOBS = 1000


def grid_values(override: str) -> list[str]:
    """The values of one `key=value` override: several when the value is a comma list
    (`optim.lr=0.05,0.1`), one otherwise. Only top-level commas of scalars split: a comma inside
    brackets or braces (`logging.tags=[a,b]`) or inside a quoted value (`data.dir="a,b"`) is part
    of the value."""
    _, sep, raw = override.partition("=")
    if not sep:
        return [raw]  # not key=value: the config's parser names the problem
    values, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(raw):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"" and depth == 0 and raw[start:i].strip() == "":  # a quote opening a value
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    if len(values) == 1:
        return [raw]
    values = [v.strip() for v in values]
    if any(v == "" for v in values):
        raise UserError(f"'{override}': an empty value in a comma list; a grid is key=v1,v2,...")
    # Compared as the config reads them: 0.1 and 0.10 (or 1e-1) are one point, trained twice otherwise.
    key = override.partition("=")[0]
    parsed = [repr(parse_override(f"{key}={v}")) for v in values]
    if len(set(parsed)) != len(parsed):
        twice = next(v for v, p in zip(values, parsed) if parsed.count(p) > 1)
        raise UserError(f"'{override}': the value {twice} given twice in a comma list (as the config reads it)")
    return values


def _safe(text: str) -> str:
    """`text` with what a folder name or a shell could trip on replaced by '_'."""
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in text).strip("_") or "_"


def expand_grid(overrides: list[str]) -> tuple[list[str], list[tuple[str, tuple[str, ...]]]]:
    """The overrides every job shares, and the grid's points in order (the first key varies
    slowest): each a short, filesystem-safe name and its key=value overrides. One point named ""
    without a comma list."""
    fixed, axes = [], []
    for override in overrides:
        values = grid_values(override)
        if len(values) == 1:
            fixed.append(override)
        else:
            axes.append((override.partition("=")[0], values))
    keys = [k for k, _ in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1} | {k for k in keys if any(o.startswith(f"{k}=") for o in fixed)})
    if repeated:
        raise UserError(f"{', '.join(repeated)}: given twice (once as a comma list); give each grid key once")
    if not axes:
        return fixed, [("", ())]
    # The key's last part names it in the point (lr, ema), unless two keys share it (then the whole key).
    last = [k.rpartition(".")[2] for k in keys]
    labels = [_safe(k if last.count(s) > 1 else s) for k, s in zip(keys, last)]
    points = [()]
    for key, values in axes:
        points = [(*p, (key, v)) for p in points for v in values]
    named = [("-".join(f"{label}{_safe(v)}" for label, (_, v) in zip(labels, p)), tuple(f"{k}={v}" for k, v in p))
             for p in points]
    if len({name for name, _ in named}) < len(named):  # values that differ only in characters _safe replaced
        named = [(f"p{i}", o) for i, (_, o) in enumerate(named)]
    return fixed, named


def plan_jobs(archs: list[str], points: list[tuple[str, tuple[str, ...]]], seeds: int | None) -> list[Job]:
    """Every architecture x point x seed, architecture-major. The name: the architecture, then the
    point's name, then s<seed> with --seeds (seed k of --seeds N is train.seed=k, k = 0..N-1)."""
    jobs = []
    for arch in archs:
        for point, point_overrides in points:
            for seed in range(seeds) if seeds is not None else [None]:
                parts = [arch, point, f"s{seed}" if seed is not None else ""]
                name = "-".join(p for p in parts if p)
                extra = (*point_overrides, *([f"train.seed={seed}"] if seed is not None else []))
                jobs.append(Job(name, arch, point or None, seed, extra))
    return jobs


def name_width(names: list[str]) -> int:
    """The column width that fits every job name (15 fits the architectures alone)."""
    return max([15, *map(len, names)])
