"""The container image, built and run (issue #23). The image tests are opt-in, because a first build
downloads torch and its CUDA wheels (GBs, 10-20 minutes):

    CONTAINER_TEST=1 .venv/bin/python -m pytest tests/test_container.py            # build, then run it
    CONTAINER_TEST=local-base ...   # no image registry reachable: build.sh --local-base
    CONTAINER_IMAGE=cifar-infinity:TAG ...   # run an image built before (no build)

Inside the image, on the CPU, as a user who is not root: prepare the synthetic CIFAR-10, the smoke
sweep of one architecture with --local, and an ONNX export of its run; everything lands in a
folder of this machine mounted into the container, owned by that user. Then a SLURM job of the dev
cluster in the image (container_runtime: podman, the stand-in for apptainer and pyxis here),
pre-empted with USR2: the image has no scontrol, and the job is still checkpointed, requeued from
outside and resumed. The batch scripts of all three runtimes are checked without the image.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster_tools import release_requeued
from conftest import REPO, SMALL_RUN
from helpers import one_error_line
from test_cluster_knobs import cluster_yaml
from test_launch import launch, sweep_record, wait_for

MODE = os.environ.get("CONTAINER_TEST", "")
IMAGE = os.environ.get("CONTAINER_IMAGE", "")
ENGINE = shutil.which("podman") or shutil.which("docker")

opt_in = pytest.mark.skipif(not (MODE or IMAGE), reason="opt-in: set CONTAINER_TEST=1 (or local-base) to build "
                            "and run the image, or CONTAINER_IMAGE=NAME:TAG to run one built before")
has_engine = pytest.mark.skipif(ENGINE is None, reason="neither podman nor docker is installed")

# The smoke sweep of resnet9_tiny, shrunk to a few seconds; W&B off (no network in a CI container).
INSIDE = """set -eu
python -m trainer.data prepare --out /out/data --source /src/cifar-10-batches-py
python jobs/launch.py --arch resnet9_tiny --profile smoke --local --runs /out/runs --sweep smoke \
    data.dir=/out/data data.train_subset=500 data.test_subset=200 logging.mode=disabled
python -m trainer.export /out/runs/smoke/resnet9_tiny --format onnx --out /out/resnet9_tiny.onnx
"""


@pytest.fixture(scope="module")
def image() -> str:
    if IMAGE:
        return IMAGE
    args = ["--local-base"] if MODE == "local-base" else []
    r = subprocess.run(["bash", str(REPO / "containers/build.sh"), *args], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-4000:]
    last = r.stdout.strip().splitlines()[-1]  # build.sh: built NAME:TAG (SIZE GB) in M min S s
    print(last)
    return last.split()[2]


def engine_env() -> dict:
    """podman with the runtime build.sh found it needs here (runc), unless the user chose one."""
    env = dict(os.environ)
    if ENGINE.endswith("podman") and "CONTAINERS_CONF" not in env:
        probe = subprocess.run([ENGINE, "run", "--rm", "--pull=never", "--entrypoint", "true", IMAGE or "cifar-infinity:latest"],
                               capture_output=True)
        if probe.returncode != 0:
            env["CONTAINERS_CONF"] = str(REPO / "containers/podman-runc.conf")
    return env


@pytest.mark.slow
@opt_in
@has_engine
def test_image_trains_the_smoke_sweep_and_exports_into_a_mounted_folder(image, cifar_source, tmp_path):
    # Not root inside: a user's uid, so that files written through the mount are theirs on the host.
    # As root here, a stand-in user (4242) shows the same: the files are not root's.
    uid, gid = (os.getuid(), os.getgid()) if os.getuid() else (4242, 4242)
    out, src = tmp_path / "out", tmp_path / "src"
    out.mkdir()
    os.chown(out, uid, gid)
    shutil.copytree(cifar_source, src / cifar_source.name)  # readable by that user (pytest's own folders are not)
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    user = ["--userns=keep-id"] if ENGINE.endswith("podman") and os.getuid() else ["--user", f"{uid}:{gid}"]
    r = subprocess.run([ENGINE, "run", "--rm", *user, "-e", "HOME=/out/home",
                        "-v", f"{src}:/src:ro", "-v", f"{out}:/out", image, "bash", "-c", INSIDE],
                       capture_output=True, text=True, timeout=1800, env=engine_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    run = out / "runs/smoke/resnet9_tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] >= 1 and summary["device"].startswith("cpu")
    # The image names its commit without .git: from the stamp build.sh put in it.
    assert summary["git_sha"] and summary["git_sha"] != "unknown", summary.get("git_sha")
    assert (out / "resnet9_tiny.onnx").stat().st_size > 10_000
    written = [p for p in out.rglob("*") if not p.is_symlink()]
    assert written and {(p.stat().st_uid, p.stat().st_gid) for p in written} == {(uid, gid)}


# ---- jobs in the image on SLURM ---------------------------------------------------------------------


def dry_run(tmp_path: Path, beton_dir: Path, **cluster) -> list[str]:
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--cluster", cluster_yaml(tmp_path, **cluster),
               "--dry-run", "--runs", tmp_path, "--sweep", "s", f"data.dir={beton_dir}")
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_pyxis_jobs_start_the_image_through_srun_with_the_folders_mounted(beton_dir, tmp_path):
    lines = dry_run(tmp_path, beton_dir, container="registry.example.org#cifar-infinity:abc123",
                    container_runtime="pyxis")
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert "--container-image=registry.example.org#cifar-infinity:abc123" in srun
    mounts = srun.split("--container-mounts=")[1].split()[0].split(",")
    assert f"{REPO}/containers/job:/opt/cifar-job:ro" in mounts
    assert {f"{tmp_path}/s:{tmp_path}/s", f"{beton_dir}:{beton_dir}", f"{REPO}:{REPO}"} <= set(mounts)
    assert f" /opt/cifar-job/python -u -m submitit.core._submit {tmp_path}/s/submitit/%j" in srun
    assert f"export CIFAR_REQUEUE_FILE={tmp_path}/s/submitit/requeue-\"$SLURM_JOB_ID\"" in lines


def test_a_podman_image_that_is_not_there_is_one_line(beton_dir, tmp_path):
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--runs", tmp_path, "--dry-run", f"data.dir={beton_dir}",
               "--cluster", cluster_yaml(tmp_path, container="cifar-infinity:no-such-tag", container_runtime="podman"))
    if shutil.which("podman"):
        one_error_line(r, "container: cifar-infinity:no-such-tag: no such podman image here (containers/build.sh builds it)")
    else:
        one_error_line(r, "container_runtime: podman is not installed here")
    one_error_line(launch("--arch", "resnet9_tiny", "--runs", tmp_path, "--dry-run", "--cluster",
                          cluster_yaml(tmp_path, container="x", container_runtime="docker")),
                   "container_runtime: expected one of apptainer, pyxis, podman, got 'docker'")


@pytest.mark.slow
@opt_in
@pytest.mark.skipif(shutil.which("podman") is None, reason="the dev cluster's container runtime is podman")
def test_a_job_in_the_image_is_requeued_from_outside_after_usr2(image, slurm, beton_dir, tmp_path, monkeypatch):
    """The dev cluster runs the job's Python in the image (podman); SLURM's USR2 before the time limit
    reaches the trainer inside, which checkpoints; submitit's `scontrol requeue` inside is handed out
    (the image has no scontrol) and the batch script requeues; the job resumes and finishes."""
    import submitit

    env = engine_env()
    no_scontrol = subprocess.run(["podman", "run", "--rm", "--pull=never", image, "sh", "-c", "command -v scontrol"],
                                 capture_output=True, text=True, env=env)
    assert no_scontrol.returncode != 0 and no_scontrol.stdout == "", no_scontrol.stdout  # really none inside

    setup = [f"export CONTAINERS_CONF={env['CONTAINERS_CONF']}"] if "CONTAINERS_CONF" in env else []
    cluster = cluster_yaml(tmp_path, container=image, container_runtime="podman", setup=setup, time_min=30)
    run = [*SMALL_RUN, "data.train_subset=2000", "data.test_subset=200", "train.stop_check_s=1", "train.threads=1"]
    r = launch("--arch", "resnet9_tiny", "--sweep", "boxed", "--runs", tmp_path, "--cluster", cluster,
               f"data.dir={beton_dir}", *run, env=slurm)
    assert r.returncode == 0, r.stderr
    job_id = sweep_record(tmp_path, "boxed")["jobs"]["resnet9_tiny"]["job_id"]
    run_dir = tmp_path / "boxed/resnet9_tiny"
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 600, "the first epoch")
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    submitit.SlurmJob(folder=tmp_path / "boxed/submitit/%j", job_id=job_id)._interrupt(timeout=True)  # USR2

    release_requeued(job_id, slurm)  # requeued from outside its container
    done = launch("--status", "boxed", "--runs", tmp_path, "--wait", env=slurm)
    assert done.returncode == 0, done.stdout[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "boxed/submitit").rglob("*_log.*"))
    assert "stopped by signal SIGUSR2" in logs and "requeue of job" in logs and "resuming resnet9_tiny" in logs
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 3
    assert not list((tmp_path / "boxed/submitit").glob("requeue-*"))  # answered, nothing left behind
