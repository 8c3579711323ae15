"""OS errors are the user's to fix (a run folder that is a file, a read-only file system, a full
disk): one line `error: PATH: reason` and exit code 1, never a traceback, and with several ranks
never a hang or an abort.

The read-only and full file systems are real: a tmpfs mounted inside a private mount namespace
(`unshare -m`, which needs root), so nothing is visible outside the test's process."""

import errno
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SMALL_RUN
from helpers import SMALL, error_lines, one_error_line, run_main
from trainer import cli


@pytest.mark.parametrize(
    "error, line",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl"),
         "error: /runs/a/metrics.jsonl: No space left on device"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "/runs/a", None, "/other/a"),
         "error: /runs/a -> /other/a: Invalid cross-device link"),
        (OSError(errno.ENOSPC, "No space left on device"), "error: No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied", b"/runs/a"), "error: /runs/a: Permission denied"),
    ],
)
def test_os_error_is_one_line_naming_the_file(error, line, capsys):
    def main() -> int:
        raise error

    with pytest.raises(SystemExit) as exit_:
        cli.run(main)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == line + "\n"


def test_naming_gives_an_os_error_its_file():
    # A write() that fails names no file: the caller knows which one it was writing.
    with pytest.raises(OSError) as raised, cli.naming(Path("/runs/a/metrics.jsonl")):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == "/runs/a/metrics.jsonl"
    assert cli.describe_os_error(raised.value) == "/runs/a/metrics.jsonl: No space left on device"
    # One that names its file keeps it, and its type.
    with pytest.raises(FileNotFoundError) as raised, cli.naming("/runs/a/metrics.jsonl"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/runs/a/config.yaml")
    assert raised.value.filename == "/runs/a/config.yaml"


def test_run_dir_that_is_a_file_is_one_line(tmp_path):
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("a file\n")
    r = run_main("trainer", "--config", str(SMALL), "--run-dir", str(not_a_folder))
    assert r.returncode == 1
    assert len(error_lines(r.stderr)) == 1 and r.stderr.startswith(f"error: {not_a_folder}"), r.stderr
    assert not_a_folder.read_text() == "a file\n"


@pytest.mark.parametrize("argv, fragment", [
    (["--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml: cannot read config (No such file or directory)"),
    (["--config", str(SMALL), "nosuch.key=1"], "unknown key 'nosuch'"),
    (["--config", str(SMALL), "optim.lr=fast"], "optim.lr"),
    (["--config", str(SMALL), "model.arch=resnet99"], "unknown architecture 'resnet99'"),
    (["--config", str(SMALL), "--restart"], "--restart needs --run-dir"),
    ([], "pass --config FILE"),
])
def test_a_mistaken_command_is_refused_before_the_training_stack(argv, fragment, tmp_path, monkeypatch):
    """Refused before _train, which imports torch, ffcv and wandb (seconds on a small CPU, issue #21).
    In this process they are imported already: the order is what is checked here; the real process's
    imports, in test_entry_points."""
    from trainer.training import run

    def train_stack(*args):
        raise AssertionError("the training stack was reached")

    monkeypatch.setattr(run, "_train", train_stack)
    r = run_main("trainer", *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    one_error_line(r, fragment.replace("{tmp}", str(tmp_path)))


@pytest.fixture(scope="session")
def private_mounts() -> None:
    """Skips unless this process may mount a tmpfs in a mount namespace of its own (root)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs (unshare -m; needs root): {probe.stderr.strip()}")


def on_tmpfs(mount_point: Path, options: str, *command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `command` with a fresh tmpfs mounted (with `options`) at `mount_point`, in a mount
    namespace of its own: no one else sees the mount, and it goes when the command ends. A process
    of its own, because a mount namespace is: unshare(CLONE_NEWNS) in this process would move only
    the calling thread, not torch's or ffcv's."""
    mount_point.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount_point))} && exec {shlex.join(command)}"
    # A session of its own, so that a timeout ends the command's children (torchrun's workers) too;
    # on the CPU, where several ranks can share the machine (gloo).
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_read_only_run_folder_is_one_line(private_mounts, beton_dir, tmp_path):
    mount = tmp_path / "ro"
    r = on_tmpfs(mount, "ro", sys.executable, "-m", "trainer", "--config", str(SMALL), f"data.dir={beton_dir}",
                 "--run-dir", str(mount / "run"))
    assert r.returncode == 1
    assert error_lines(r.stderr) == [f"error: {mount / 'run'}: Read-only file system"], r.stderr


# An epoch of 5 steps: the first checkpoint comes soon.
ONE_SHORT_EPOCH = [*SMALL_RUN, "data.train_subset=500", "data.test_subset=200", "train.epochs=1"]


@pytest.mark.slow
def test_full_disk_is_one_line_naming_the_file(private_mounts, beton_dir, tmp_path):
    # 1 MiB: room for config.yaml, none for a checkpoint (1.6 MB of weights). torch's own writer
    # would report it as "unexpected pos 479872 vs 479768".
    mount = tmp_path / "full"
    r = on_tmpfs(mount, "size=1m", sys.executable, "-m", "trainer", "--config", str(SMALL), f"data.dir={beton_dir}",
                 *ONE_SHORT_EPOCH, "--run-dir", str(mount / "run"))
    assert r.returncode == 1
    assert error_lines(r.stderr) == [f"error: {mount / 'run/checkpoints/best.pt'}: No space left on device"], r.stderr


@pytest.mark.slow
def test_full_disk_on_rank_0_ends_every_rank_without_a_hang_or_an_abort(private_mounts, beton_dir, tmp_path):
    # Rank 0 fails writing best.pt while rank 1 is already in the next collective: rank 0 must not
    # wait for it in a barrier it will never reach.
    mount = tmp_path / "full"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    try:
        r = on_tmpfs(mount, "size=1m", torchrun, "--standalone", "--nproc_per_node=2", "-m", "trainer",
                     "--config", str(SMALL), f"data.dir={beton_dir}", *ONE_SHORT_EPOCH,
                     "--run-dir", str(mount / "run"), timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks hung after rank 0 failed")
    assert r.returncode != 0
    assert f"error: {mount / 'run/checkpoints/best.pt'}: No space left on device" in r.stderr.splitlines(), r.stderr
    assert "terminate called" not in r.stderr and "Aborted" not in r.stderr, r.stderr[-3000:]
    assert os.path.isdir(mount) and not any(mount.iterdir())  # the tmpfs went with its namespace
