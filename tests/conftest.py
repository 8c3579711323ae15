"""What the tests share: the data they run on, the cluster they start, and a seconds-long run.

Data: by default a small synthetic CIFAR-10 written here in the official python layout (correct
pickles, 5 x 1,000 training and 1,000 test images) and converted by the project's own `prepare`, so
the pipeline tests run anywhere in seconds. Tests that need the real images take `real_cifar_source`:
$CIFAR10_SOURCE, or the shared copy beside the checkout, or they skip with the reason.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_CIFAR10 = Path(os.environ.get("CIFAR10_SOURCE", REPO.parent / "shared/data/cifar10/cifar-10-batches-py"))
DEV_CLUSTER = REPO / "slurm/devcluster/cluster.sh"

SYNTHETIC_PER_BATCH = 1000  # images in each of the 5 training files and in the test file
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# A run of seconds on the CPU: 3,000 images in 30 steps an epoch, 3 epochs. Augmentation off,
# because ffcv's random flips and translations are not seeded and several tests compare weights
# bit for bit.
SMALL_RUN = [
    "data.train_subset=3000", "data.test_subset=500", "data.batch_size=100", "data.flip=false", "data.translate=0",
    "train.epochs=3", "train.ema=0.9", "logging.mode=disabled", "logging.log_every=2", "data.val_split=0",
]


def write_synthetic_cifar10(folder: Path, per_batch: int = SYNTHETIC_PER_BATCH, seed: int = 0) -> Path:
    """A CIFAR-10 folder in the official python layout whose images a network can learn: each class
    has its own colour and a stripe direction, under noise. Every image is distinct."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(40, 216, size=(10, 3))
    ys, xs = np.mgrid[0:32, 0:32]

    def images(labels: np.ndarray) -> np.ndarray:
        n = len(labels)
        stripes = np.where(labels[:, None, None] % 2 == 0, ys, xs)[None] // 4 % 2  # (1, n, 32, 32)
        base = colours[labels][:, :, None, None] * (0.6 + 0.4 * stripes.transpose(1, 0, 2, 3))
        noisy = base + rng.normal(0, 25, size=(n, 3, 32, 32))
        return np.clip(noisy, 0, 255).astype(np.uint8).reshape(n, 3072)  # channel-planar rows, as the files hold

    def write(name: str, n: int, label: str) -> None:
        labels = rng.permutation(np.arange(n) % 10)  # balanced, as the real files are
        batch = {b"batch_label": label.encode(), b"labels": labels.tolist(), b"data": images(labels),
                 b"filenames": [f"synthetic_{name}_{i:05d}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=3))

    for i in range(1, 6):
        write(f"data_batch_{i}", per_batch, f"training batch {i} of 5")
    write("test_batch", per_batch, "testing batch 1 of 1")
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=3))
    return folder


@pytest.fixture(scope="session")
def cifar_source(tmp_path_factory) -> Path:
    """The synthetic CIFAR-10 folder (official layout), the same for the whole session."""
    return write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic") / "cifar-10-batches-py")


@pytest.fixture(scope="session")
def real_cifar_source() -> Path:
    if not (REAL_CIFAR10 / "data_batch_1").is_file():
        pytest.skip(f"the real CIFAR-10 is not at {REAL_CIFAR10} (set CIFAR10_SOURCE to a cifar-10-batches-py folder)")
    return REAL_CIFAR10


@pytest.fixture(scope="session")
def beton_dir(tmp_path_factory, cifar_source) -> Path:
    """The synthetic CIFAR-10 converted once per test session by the real converter."""
    from trainer.data.cifar10 import prepare

    out = tmp_path_factory.mktemp("cifar10")
    prepare(out, cifar_source)
    return out


def start_cluster(nodes: int = 1) -> dict:
    """Starts the dev cluster with `nodes` compute nodes (a no-op when it is up with as many; a
    cluster up with another count is restarted) and returns the environment that talks to it."""
    r = subprocess.run(["bash", str(DEV_CLUSTER), "start", "--nodes", str(nodes)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    conf = r.stdout.strip().split("SLURM_CONF=", 1)[1].strip().strip("'\"")
    return {**os.environ, "SLURM_CONF": conf}


@pytest.fixture(scope="session")
def slurm_session():
    """Stops the dev cluster after the session if it was down before it. Every test that uses the
    cluster depends on this (through `slurm` or a multi-node fixture), which also marks it."""
    was_up = subprocess.run(["bash", str(DEV_CLUSTER), "status"], capture_output=True).returncode == 0
    yield
    if not was_up:
        subprocess.run(["bash", str(DEV_CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def slurm(slurm_session) -> dict:
    """Environment for talking to the single-node dev cluster (slurm/devcluster/cluster.sh); starts
    it, installing its Debian packages on first use. Per test, because the multi-node tests restart
    the cluster with several nodes: this puts the one node back (and costs 0.3 s when it is up)."""
    return start_cluster(1)


def pytest_collection_modifyitems(items):
    import torch

    for item in items:
        # A test that starts the cluster is slow and needs root: marked so `-m "not slurm"` leaves it out.
        if "slurm_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python -m ...` as a user would, capturing its output."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_tiny_run(beton_dir, tmp_path_factory) -> Path:
    """One epoch of the tests' config (tests/configs/small.yaml) on the synthetic data with an offline W&B run: a finished run folder
    (best.pt with trained BatchNorm statistics, summary, W&B records) for tests that only read one."""
    run_dir = tmp_path_factory.mktemp("trained") / "resnet9_tiny"
    done = subprocess.run([sys.executable, "-m", "trainer", "--config", str(REPO / "tests/configs/small.yaml"),
                           "--run-dir", str(run_dir), f"data.dir={beton_dir}", *SMALL_RUN, "train.epochs=1",
                           "train.ema=0", "logging.mode=offline"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (run_dir / "stdout.txt").write_text(done.stdout)
    return run_dir
