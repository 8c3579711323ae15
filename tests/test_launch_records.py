"""What the launcher reads and writes besides the jobs: sweep.json (one reader and writer, which the
report shares without pulling in submitit), the run folders --force moves aside, each architecture's
recipe config, and the metrics --status shows."""

import json
import subprocess
import sys

import pytest
from torch import nn

from conftest import REPO


def test_sweep_json_round_trip_and_the_record_from_before_seeds(tmp_path):
    from trainer import sweep_file
    from trainer.sweep_file import Job, SweepRecord

    runs = [Job("resnet-lr0.1-s0", "resnet", "lr0.1", 0, ("optim.lr=0.1", "train.seed=0")), Job("vgg_bn", "vgg_bn")]
    record = SweepRecord("s", runs, ["resnet", "vgg_bn"], "local", "smoke", ["logging.group=s"], {"nodes": 1},
                         {"vgg_bn": {"job_id": "7", "submitted": "now"}}, "abc")
    sweep_file.write(tmp_path, record)
    assert sweep_file.read(tmp_path) == record
    assert list(json.loads((tmp_path / "sweep.json").read_text())) == [
        "sweep", "executor", "profile", "archs", "runs", "overrides", "cluster", "jobs", "git_sha"]

    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": "old", "archs": ["alexnet", "resnet"]}))
    old = sweep_file.read(tmp_path)
    assert old.runs == [Job("alexnet", "alexnet"), Job("resnet", "resnet")] and old.jobs == {} and old.executor is None


@pytest.mark.parametrize("text", ["{", "[]", '{"archs": ["resnet"]}', '{"sweep": "s", "runs": [{"name": "x"}]}'])
def test_an_unreadable_sweep_json_is_one_line_naming_it(tmp_path, text):
    from trainer import UserError, sweep_file

    (tmp_path / "sweep.json").write_text(text)
    with pytest.raises(UserError) as error:
        sweep_file.read(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'sweep.json'}: unreadable sweep record (")
    assert "\n" not in str(error.value)


def test_the_report_reads_a_sweep_without_submitit(tmp_path):
    code = ("import sys; from trainer.report.runs import find_runs; import trainer.sweep_file; "
            "assert 'submitit' not in sys.modules, 'submitit imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_folder_replaced_twice_within_a_second_keeps_both_copies(tmp_path):
    """The launcher's --force once named the copy by the second alone: a second --force within that
    second failed to rename onto the first copy."""
    from trainer import run_files

    run_dir = tmp_path / "resnet"
    assert run_files.move_aside(run_dir) is None  # nothing there: nothing to keep
    for _ in range(3):  # the two moves must fall within one clock second; a tick between them retries
        kept = []
        for n in range(2):
            run_dir.mkdir()
            (run_dir / "summary.json").write_text(str(n))
            kept.append(run_files.move_aside(run_dir))
        if kept[1].name.startswith(kept[0].name):
            break
    first, second = kept
    assert first.name.startswith(f"resnet{run_files.REPLACED}") and second.name == f"{first.name}-2"
    assert (first / "summary.json").read_text() == "0" and (second / "summary.json").read_text() == "1"
    assert not run_dir.exists()


def test_every_architecture_trains_with_its_own_recipe():
    from trainer import models
    from trainer.config import load_config
    from trainer.launch import CONFIGS, config_path

    for arch in models.names():
        path = config_path(arch)
        assert path.parent == CONFIGS and path.is_file(), arch
        assert load_config(path, [f"model.arch={arch}"]).model.arch == arch
    assert config_path("resnet9_tiny").name == "tiny.yaml" and config_path("airbench94").name == "airbench94.yaml"


def test_an_architecture_without_a_recipe_is_refused_by_name():
    """It once trained with tiny.yaml's recipe, silently."""
    from trainer import UserError
    from trainer.launch.plan import recipe_path
    from trainer.models import Registry

    registry = Registry()
    spec = registry.register("linear", lambda num_classes=10: nn.Linear(4, num_classes), seed_row=None, params_target=0.0)
    with pytest.raises(UserError, match="^architecture 'linear' names no recipe config"):
        recipe_path(spec)
    spec = registry.register("gone", lambda num_classes=10: nn.Linear(4, num_classes), seed_row=None, params_target=0.0,
                             recipe="gone.yaml")
    with pytest.raises(UserError, match="^architecture 'gone': its recipe config .*gone.yaml does not exist"):
        recipe_path(spec)


def test_status_shows_the_best_of_the_evaluated_epochs(tmp_path):
    """With train.eval_every, epochs without a test accuracy once stopped --status with a KeyError."""
    from trainer.launch.status import _progress

    lines = [{"epoch": 1, "elapsed_s": 1.0}, {"epoch": 2, "elapsed_s": 2.0, "test_acc": 41.5}, {"epoch": 3, "elapsed_s": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert _progress(tmp_path) == (3, 41.5)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert _progress(tmp_path) == (1, None)
    assert _progress(tmp_path / "none") == (0, None)
