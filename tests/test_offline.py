"""Installing without a registry (jobs/offline/): the code stamp that names the commit where there is no
.git, and — opt-in, since they need a package index and minutes — the wheelhouse builds."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

OFFLINE = REPO / "jobs/offline"
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]


def python(code: str, root: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs `code` with the trainer package imported from `root`, as a copy or an install would."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd or root, env=env, capture_output=True, text=True, timeout=120)


def git_sha_in(root: Path, cwd: Path | None = None) -> str:
    r = python("from trainer import provenance; print(provenance.git_sha())", root, cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git checkout of its own holding the trainer package, a config and pyproject.toml, committed."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "trainer", repo / "trainer", ignore=shutil.ignore_patterns("__pycache__", "_stamp.json"))
    (repo / "jobs").mkdir()
    (repo / "jobs/profiles.yaml").write_text("full: []\n")
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (repo / ".gitignore").write_text("__pycache__/\n/trainer/_stamp.json\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*GIT, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(repo), "commit", "-q", "-m", "x"], check=True)
    return repo


def test_stamp_names_the_commit_in_a_copy_without_git(checkout, tmp_path):
    sha = git_sha_in(checkout)
    assert len(sha) == 40  # committed, clean
    stamp = subprocess.run([sys.executable, "-m", "trainer.provenance", "stamp"], cwd=checkout,
                           env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True, timeout=120)
    assert stamp.returncode == 0, stamp.stderr
    record = json.loads((checkout / "trainer/_stamp.json").read_text())
    assert record["git_sha"] == sha and "jobs/profiles.yaml" in record["files"] and "trainer/_stamp.json" not in record["files"]

    shutil.rmtree(checkout / ".git")  # the copy a machine without the repository gets
    assert git_sha_in(checkout) == sha
    (checkout / "jobs/profiles.yaml").write_text("full: []\nsmoke: []\n")
    assert git_sha_in(checkout) == sha + "-modified"


def test_an_installed_package_compares_only_its_own_files_with_the_stamp(checkout, tmp_path):
    sha = git_sha_in(checkout)
    subprocess.run([sys.executable, "-m", "trainer.provenance", "stamp"], cwd=checkout,
                   env={**os.environ, "PYTHONPATH": str(checkout)}, check=True, capture_output=True, timeout=120)
    site = tmp_path / "site"  # what a wheel installs: the package with its stamp, no jobs/, no pyproject.toml
    shutil.copytree(checkout / "trainer", site / "trainer")
    assert git_sha_in(site, cwd=tmp_path) == sha
    with (site / "trainer/cli.py").open("a") as f:
        f.write("# changed\n")
    assert git_sha_in(site, cwd=tmp_path) == sha + "-modified"


def test_a_package_inside_some_other_checkout_does_not_take_its_commit(checkout, tmp_path):
    """An installed copy under a venv inside a checkout must not report that checkout's commit."""
    site = checkout / ".venv/lib/site-packages"
    shutil.copytree(checkout / "trainer", site / "trainer")
    assert git_sha_in(site) == "None"


def test_stamp_outside_a_checkout_is_one_error_line(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(REPO / "trainer", site / "trainer", ignore=shutil.ignore_patterns("__pycache__", "_stamp.json"))
    r = subprocess.run([sys.executable, "-m", "trainer.provenance", "stamp"], cwd=site,
                       env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "not the top of a git checkout" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (site / "trainer/_stamp.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OFFLINE_BUILD_TEST") not in ("1", "full"),
                    reason="builds ffcv and wheels (a minute cold; needs a package index, a CPython 3.12, root): "
                           "set OFFLINE_BUILD_TEST=1")
def test_build_sh_makes_a_self_contained_ffcv_wheel(tmp_path):
    py312 = sorted(Path("/root/.pyenv/versions").glob("3.12.*/bin/python"))
    if not py312 and not os.environ.get("PYTHON312"):
        pytest.skip("no CPython 3.12 (set PYTHON312)")
    py = os.environ.get("PYTHON312") or str(py312[-1])
    wheels = tmp_path / "wheels"
    cmd = [str(OFFLINE / "build.sh"), str(wheels), "--python", py, "--packages", "terminaltables==3.1.10 submitit==1.5.4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = sorted(p.name for p in wheels.glob("*.whl"))
    assert [n.split("-")[0] for n in names] == ["ffcv", "submitit", "terminaltables"]
    assert "ffcv-1.0.2-cp311-abi3-manylinux_2_35_x86_64.whl" in names
    assert (wheels / "requirements.txt").read_text().split() == ["ffcv==1.0.2", "submitit==1.5.4", "terminaltables==3.1.10"]
    with zipfile.ZipFile(wheels / "ffcv-1.0.2-cp311-abi3-manylinux_2_35_x86_64.whl") as z:
        metadata = z.read("ffcv-1.0.2.dist-info/METADATA").decode()
    assert "Requires-Dist: opencv-python-headless" in metadata and "Requires-Dist: opencv-python\n" not in metadata
    native = json.loads((wheels / ".check-native.json").read_text())  # checked under 3.12, system libraries hidden
    assert native["python"].startswith("3.12") and native["resize_max_diff"] <= 1
    assert {"libopencv_core", "libopencv_imgproc", "libturbojpeg", "libX11", "libxcb"} <= {d.split("-")[0] for d in native["dependencies_in_wheel"]}
    assert set(native["dependencies_from_system"]) <= {"ld-linux-x86-64.so.2", "libc.so.6", "libgcc_s.so.1", "libm.so.6",
                                                       "libstdc++.so.6", "libz.so.1", "linux-vdso.so.1"}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ffcv: compile" not in again.stdout and "check:" not in again.stdout  # nothing redone


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OFFLINE_BUILD_TEST") != "full",
                    reason="the whole wheelhouse (torch and CUDA libraries: gigabytes, minutes): set OFFLINE_BUILD_TEST=full")
def test_build_sh_whole_wheelhouse_installs_offline(tmp_path):
    """The project's wheel and every dependency for this venv's Python; build.sh's checks install
    them into a fresh venv with no index and run ffcv, the stamp and an editable copy of the tree."""
    wheels = tmp_path / "wheelhouse"
    r = subprocess.run([str(OFFLINE / "build.sh"), str(wheels), "--python", sys.executable], capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pins = (wheels / "requirements.txt").read_text().split()
    assert {"cifar-infinity==0.1.0", "ffcv==1.0.2", "torch==2.14.1"} <= set(pins) and len(pins) == len(list(wheels.glob("*.whl")))
    with zipfile.ZipFile(next(wheels.glob("cifar_infinity-*.whl"))) as z:
        assert "trainer/_stamp.json" in z.namelist()
    installed = json.loads((wheels / ".check-wheel.json").read_text())
    assert installed["git_sha"] == installed["stamp"]
    tree = json.loads((wheels / ".check-tree.json").read_text())
    assert tree["git_sha"] == tree["stamp"] and "smoke" in tree["profiles"]
    assert json.loads((wheels / ".check-install.json").read_text())["raw_mean_diff"] == 0
