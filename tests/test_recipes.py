"""Every seed architecture trains with its own recipe config, as `jobs/launch.py --all` runs it: the
smoke profile's overrides on the tests' data, in this process (the SLURM smoke sweep submits two of
them; what SLURM adds is the same for every architecture)."""

import json

import pytest

from helpers import run_main
from trainer import models
from trainer.launch.plan import config_path, load_profiles

SEED_ARCHS = [name for name, spec in models.REGISTRY.items() if spec.seed_row]


def test_the_seven_seed_architectures_are_the_ones_trained_here():
    assert len(SEED_ARCHS) == 7


@pytest.mark.slow
@pytest.mark.parametrize("arch", SEED_ARCHS)
def test_recipe_trains_a_smoke_epoch(arch, beton_dir, tmp_path):
    run_dir = tmp_path / arch
    # Smaller than the smoke profile (64 images, 2 steps) and on the resident loader (no ffcv pipeline
    # to compile per run: the loaders have tests of their own): what is checked is that the recipe's
    # network, optimizer and schedule train and evaluate, not what they learn.
    r = run_main("trainer", "--config", str(config_path(arch)), "--run-dir", str(run_dir), *load_profiles()["smoke"],
                 f"data.dir={beton_dir}", "data.train_subset=64", "data.test_subset=64", "data.val_split=0", "data.loader=resident",
                 "logging.mode=disabled")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["arch"] == arch and summary["epochs_run"] == 1
    assert summary["params"] == sum(p.numel() for p in models.build(arch).parameters())
