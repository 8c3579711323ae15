"""The accuracy part: wall time of jobs/configs/speed.yaml to reach its target test accuracy, mean
over seeds, by running the real trainer as a user would."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer import UserError, run_files

REPO = Path(__file__).resolve().parents[2]
SPEED_CONFIG = REPO / "jobs/configs/speed.yaml"
SPEED_TARGET = 94.0  # test accuracy (%) the speed profile aims at (Page; airbench94)


def bench_accuracy(data_dir: Path, seeds: int, target: float) -> dict:
    """Runs the trainer on the speed profile once per seed; per run, the training wall time
    (compile and evaluation included, as the trainer counts it) until an evaluated epoch's test
    accuracy first reached the target."""
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
            rows = run_files.read_metrics(run_dir / run_files.METRICS)
            if not rows:
                raise UserError(f"the speed profile's run (seed {seed}) wrote no metrics")
            # The speed profile evaluates once, at the end (train.eval_every: 0), as airbench does: the
            # time to the target is then the whole run's, and only epochs that were evaluated count.
            evaluated = [m for m in rows if "test_acc" in m]
            if not evaluated:
                raise UserError(f"the speed profile's run (seed {seed}) evaluated no epoch")
            hit = next((m for m in evaluated if m["test_acc"] >= target), None)
            runs.append({"seed": seed, "time_to_target_s": hit["elapsed_s"] if hit else None,
                         "epoch_reached": hit["epoch"] if hit else None, "final_test_acc": evaluated[-1]["test_acc"],
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


def print_table(results: dict) -> None:
    if "skipped" in results:
        print(f"\ntime to accuracy: skipped ({results['skipped']})")
        return
    print(f"\ntime to accuracy: {results['config']} to {results['target_acc']}% test accuracy, training seconds incl. "
          f"compile and evaluation")
    print(f"  {'seed':<6}{'to target s':>12}{'epoch':>7}{'final acc':>11}{'train s':>9}{'process s':>11}")
    for x in results["runs"]:
        hit = f"{x['time_to_target_s']:.1f}" if x["time_to_target_s"] is not None else "not reached"
        print(f"  {x['seed']:<6}{hit:>12}{x['epoch_reached'] or '-':>7}{x['final_test_acc']:>10.2f}%"
              f"{x['train_s']:>9.1f}{x['process_wall_s']:>11.1f}")
    mean = results["mean_time_to_target_s"]
    print(f"  mean: {f'{mean:.1f} s' if mean is not None else 'n/a'} to target ({results['reached']}/"
          f"{len(results['runs'])} reached), final accuracy {results['mean_final_test_acc']:.2f}%")
