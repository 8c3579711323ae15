"""Cluster settings users ask for (gres, setup lines, exclude, extra sbatch options, memory per GPU,
the requeue limit, an Apptainer container): each rendered into the batch script by submitit itself
(the dry run shows that script), checked on the local SLURM where the setting applies there (in a
job of two tasks, which also shows gloo DDP inside SLURM), and the container definition checked
against what the offline wheelhouse holds. The launcher runs in this process (test_launch.launch)."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_launch import launch

DEFINITION = REPO / "containers/cifar-infinity.def"


def cluster_yaml(tmp_path: Path, **changes) -> Path:
    settings = yaml.safe_load((REPO / "slurm/local.yaml").read_text())
    settings.update(changes)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_every_new_key_becomes_its_sbatch_line_through_submitit(slurm, beton_dir, tmp_path):
    image = tmp_path / "images/cifar infinity.sif"
    # #22: a container image that does not exist failed every job as it started; the dry run said nothing.
    missing = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--cluster", cluster_yaml(tmp_path, container=str(image)),
                     "--dry-run", "--runs", tmp_path, f"data.dir={beton_dir}", env=slurm)
    assert missing.returncode == 1 and missing.stderr == f"error: container: {image}: no such image file (build it " \
        "from containers/cifar-infinity.def, or set container: null)\n"
    image.parent.mkdir()
    image.write_bytes(b"an Apptainer image")
    cluster = cluster_yaml(tmp_path, gpus_per_node=4, mem_gb=None, mem_per_gpu=40, gres="gpu:a100:4",
                           exclude="node[07,12]", setup=["module load cuda/12.4", "source /opt/venv/bin/activate"],
                           sbatch=["reservation=gpu-week", "--exclusive"], max_requeues=30,
                           container=str(image))
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--cluster", cluster, "--dry-run", "--runs", tmp_path,
               f"data.dir={beton_dir}", env=slurm)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for expected in ("#SBATCH --gres=gpu:a100:4", "#SBATCH --mem-per-gpu=40G", "#SBATCH --exclude='node[07,12]'",
                     "#SBATCH --reservation=gpu-week", "#SBATCH --exclusive", "module load cuda/12.4",
                     "source /opt/venv/bin/activate"):
        assert expected in lines, (expected, r.stdout)
    assert not any(line.startswith("#SBATCH --gpus-per-node") for line in lines)  # --gres replaces it
    assert not any(line.startswith("#SBATCH --mem=") for line in lines)
    setup_at = lines.index("module load cuda/12.4")
    (srun_at,) = [i for i, line in enumerate(lines) if line.startswith("srun ")]
    assert setup_at < srun_at  # the setup runs in the batch script, before the trainers start
    # The task starts Apptainer through containers/job/run.sh (exec --nv, the folders mounted); the batch
    # script requeues from outside the container, which has no scontrol (tests/test_container.py).
    assert f"containers/job/run.sh apptainer '{image}' {tmp_path}/" in lines[srun_at]
    assert lines[srun_at].endswith(f" -u -m submitit.core._submit {tmp_path}/{r.stdout.split()[1]}/submitit/%j")
    assert any(line.startswith("export CIFAR_REQUEUE_FILE=") for line in lines[setup_at:srun_at])


@pytest.mark.parametrize("changes, message", [
    ({"mem_gb": 8, "mem_per_gpu": 40}, "mem_per_gpu: SLURM takes mem_gb (per node) or mem_per_gpu, not both"),
    ({"sbatch": ["reservation="]}, "sbatch: 'reservation=' is not 'name=value' or 'name'"),
    ({"max_requeues": -1}, "max_requeues: must not be negative"),
    ({"poll_s": 0}, "poll_s: must be more than 0 seconds, got 0"),
    # #22: sbatch entries silently beat the first-class keys (the dry run said USR2@120s, the script KILL@1).
    ({"sbatch": ["signal=KILL@1"]}, "sbatch: 'signal=KILL@1' sets what the key 'signal_delay_s' sets: use signal_delay_s"),
    ({"sbatch": ["--time=10"]}, "use time_min instead"),
    ({"sbatch": ["p=debug"]}, "use partition instead"),
    ({"sbatch": ["cpus_per_task=2"]}, "use cpus_per_task instead"),
    ({"sbatch": ["output=/tmp/x.log"]}, "submitit sets --output itself"),
    ({"setup": "module load cuda"}, "setup: expected a list of a string"),
])
def test_bad_cluster_values_are_one_line(changes, message, beton_dir, tmp_path):
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--cluster", cluster_yaml(tmp_path, **changes),
               "--dry-run", "--local", "--runs", tmp_path, f"data.dir={beton_dir}")
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_setup_lines_sbatch_options_and_two_tasks_apply_on_the_local_slurm(slurm, beton_dir, tmp_path):
    # One job of two tasks (-C tasks_per_node=2): the setup line runs once, in the batch script, and
    # the two ranks train one run with gloo DDP.
    cluster = cluster_yaml(tmp_path, setup=['echo "setup line ran on $(hostname) in job $SLURM_JOB_ID"'],
                           sbatch=["comment=cifar-knobs"], max_requeues=7)
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--cluster", cluster, "-C", "tasks_per_node=2",
               "--sweep", "knobs", "--runs", tmp_path, "--wait", f"data.dir={beton_dir}", env=slurm)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep = json.loads((tmp_path / "knobs/sweep.json").read_text())
    job_id = sweep["jobs"]["resnet9_tiny"]["job_id"]
    assert sweep["cluster"]["max_requeues"] == 7 and sweep["cluster"]["tasks_per_node"] == 2
    batch_log = next((tmp_path / "knobs/submitit").glob(f"{job_id}/{job_id}_0_log.out")).read_text()
    assert re.search(rf"setup line ran on \S+ in job {job_id.split('_')[0]}", batch_log), batch_log[-2000:]
    shown = subprocess.run(["scontrol", "show", "job", job_id], env=slurm, capture_output=True, text=True).stdout
    assert "Comment=cifar-knobs" in shown, shown
    summary = json.loads((tmp_path / "knobs/resnet9_tiny/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True


def test_container_definition_installs_the_wheelhouse_and_nothing_to_compile():
    text = DEFINITION.read_text()
    sections = dict(re.findall(r"^%(\w+)\n(.*?)(?=^%|\Z)", text, flags=re.S | re.M))
    header = text.split("%", 1)[0]
    # the image's Python is the one the wheelhouse's ffcv wheel is built for (build.sh names it)
    (image_python,) = re.findall(r"^From:\s*python:(\d+)\.(\d+)", header, flags=re.M)
    build_sh = (REPO / "jobs/offline/build.sh").read_text()
    (ffcv_tag,) = set(re.findall(r"ffcv-\$FFCV_VERSION-(cp\d+)-abi3-manylinux", build_sh))
    assert ffcv_tag == f"cp{''.join(image_python)}"
    # it copies the wheelhouse build.sh writes by default (wheelhouse/ at the repository root) ...
    assert re.search(r'^OUT=\$REPO/wheelhouse$', build_sh, flags=re.M)
    source, target = sections["files"].split()
    assert source == "wheelhouse"
    # ... and installs this project from it alone, with no index
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    install = next(line for line in sections["post"].splitlines() if "pip install" in line)
    assert "--no-index" in install and f"--find-links {target}" in install and install.split()[-1] == project
    # no compiler, no development headers, no OpenCV from the distribution
    assert not re.search(r"apt-get|apt |g\+\+|gcc|libopencv|libturbojpeg|pkg-config", text)
