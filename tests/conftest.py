"""What the tests share: the data they run on, the cluster they start, and a seconds-long run.

Data: by default a small synthetic CIFAR-10 written here in the official python layout (correct
pickles, 5 x 1,000 training and 1,000 test images) and converted by the project's own `prepare`, so
the pipeline tests run anywhere in seconds. Tests that need the real images take `real_cifar_source`:
$CIFAR10_SOURCE, or the shared copy beside the checkout, or they skip with the reason.
"""

import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def _keep_this_worker_on_its_own_cores() -> None:
    """Under pytest-xdist, gives each worker its own share of the cores before numpy or torch is
    imported, so torch's threads, the loaders' workers and every process a test starts see only
    those (train.threads=0 and data.num_workers follow the affinity). Unpinned, two workers each ran
    as many torch threads as the machine has cores: 4 spinning threads on 2 cores."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    cores = sorted(os.sched_getaffinity(0))
    if worker is None or count is None or int(count) > len(cores):
        return
    os.sched_setaffinity(0, cores[int(worker.removeprefix("gw"))::int(count)])


_keep_this_worker_on_its_own_cores()

import numpy as np  # noqa: E402  (after the pinning: numpy's threads count the cores when it loads)
import pytest  # noqa: E402

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


# ---- the suite on both cores (pytest-xdist) ----------------------------------------------------
#
# `pytest` runs the tests in two worker processes by default (pytest-xdist, `--dist loadgroup`);
# `-n 0` or `-p no:xdist` runs them in this process, as does naming a single test file. Work that
# must not be done twice or at once stays on one worker: see work_groups.

MAX_WORKERS = 2  # more would split the same work thinner: the SLURM group alone is a third of the suite
PER_WORKER_FIXTURES = {"cifar_source", "beton_dir", "real_cifar_source"}  # seconds: cheaper than a worker waiting


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Two workers and --dist loadgroup unless the command chose (-n, --dist); nothing without
    pytest-xdist. Here rather than in addopts, so that `-p no:xdist` still parses."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if config.option.numprocesses is None:
        config.option.numprocesses = "auto"
    if config.option.dist == "no":
        config.option.dist = "loadgroup"
    config.option.loadscopereorder = False  # the workers' order (work_groups' first) is the plan


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's, as below
def pytest_configure_node(node):
    """Tells each worker that the tests are scheduled by group: a worker reads the command line
    again, not the options pytest_cmdline_main set here, so it would not mark the groups."""
    node.workerinput["cifar_loadgroup"] = node.config.getoption("dist") == "loadgroup"


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: unknown under -p no:xdist
def pytest_xdist_auto_num_workers(config):
    """One worker a core, at most MAX_WORKERS; none (this process) for a single test file."""
    paths = {Path(arg.split("::")[0]) for arg in config.args}
    if len(paths) == 1 and next(iter(paths)).is_file():
        return 0
    return min(MAX_WORKERS, len(os.sched_getaffinity(0)))


def work_groups(items) -> dict:
    """The tests that must run on one worker, by group name: every test of the dev SLURM cluster
    (one cluster, which the multi-node tests restart) in "slurm", and the users of an expensive
    shared fixture (session- or module-scoped: a reference run, the 2-rank run, a module's sweep)
    together, so that it is computed once. A test that needs two groups joins them."""
    parent = {}

    def root(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    keys_of = {}
    for item in items:
        keys = []
        for name in getattr(item, "fixturenames", ()):
            fixture = item._fixtureinfo.name2fixturedefs.get(name, [None])[-1]
            if not fixture or not fixture.baseid:  # pytest's own (tmp_path_factory: a session fixture)
                continue
            if name == "slurm_session":
                keys.append("slurm")
            elif fixture.scope == "session" and name not in PER_WORKER_FIXTURES:
                keys.append(name)
            elif fixture.scope == "module":
                keys.append(f"{item.module.__name__}.{name}")
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
        keys_of[item] = keys
    slurm = root("slurm")
    return {item: "slurm" if root(keys[0]) == slurm else root(keys[0]) for item, keys in keys_of.items() if keys}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        # A test that starts the cluster is slow and needs root: marked so `-m "not slurm"` leaves it out.
        if "slurm_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    if hasattr(config, "workerinput") and config.workerinput.get("cifar_loadgroup"):
        config.option.loadgroup = True  # read by xdist's own hook, after this one: the "@group" node ids
        groups = work_groups(items)
        for item, group in groups.items():
            item.add_marker(pytest.mark.xdist_group(group))
        # The scheduler hands out work in this order: the SLURM group first (the longest chain,
        # mostly waiting on jobs), then the other groups, then single tests, which fill the gaps.
        items.sort(key=lambda item: (groups.get(item) != "slurm", item not in groups))


@pytest.hookimpl(trylast=True)  # after xdist's own hook, which appends "@group" to the node ids
def pytest_collection_finish(session):
    """Refuses a worker's run whose groups did not reach its node ids: the scheduler would then
    hand SLURM tests to both workers at once, which fail each other on the one cluster. pytest 9.2
    keeps node ids where xdist 3.8 no longer writes them (constraints.txt pins pytest 9.1)."""
    config = session.config
    if not (hasattr(config, "workerinput") and config.workerinput.get("cifar_loadgroup")):
        return
    ungrouped = [item.nodeid for item in session.items
                 if item.get_closest_marker("xdist_group") and "@" not in item.nodeid.rpartition("]")[2]]
    if ungrouped:
        message = (f"error: pytest-xdist's --dist loadgroup left {len(ungrouped)} grouped tests ungrouped (e.g. "
                   f"{ungrouped[0]}) under pytest {pytest.__version__}: install constraints.txt's pytest "
                   f"(./setup.sh), or run in one process with -n 0")
        sys.stderr.write(message + "\n")  # a worker's exception reaches the terminal only as xdist's INTERNALERROR
        raise pytest.UsageError(message)


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python -m ...` as a user would, capturing its output."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_tiny_run(beton_dir, tmp_path_factory) -> Path:
    """One epoch of the tests' config (tests/configs/small.yaml) on the synthetic data with an offline W&B run: a finished run folder
    (best.pt with trained BatchNorm statistics, summary, W&B records) for tests that only read one.
    A real process, not run_main: W&B's console capture (test_wandb reads it back) wraps the
    process's own stdout, which an in-process run's captured stdout is not."""
    run_dir = tmp_path_factory.mktemp("trained") / "resnet9_tiny"
    done = subprocess.run([sys.executable, "-m", "trainer", "--config", str(REPO / "tests/configs/small.yaml"),
                           "--run-dir", str(run_dir), f"data.dir={beton_dir}", *SMALL_RUN, "train.epochs=1",
                           "train.ema=0", "logging.mode=offline"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (run_dir / "stdout.txt").write_text(done.stdout)
    return run_dir


# ---- training runs shared by several tests -------------------------------------------------------


def signal_at_step(monkeypatch, step: int, signum: int = signal.SIGUSR2) -> None:
    """The deterministic stop hook: the Trainer sends `signum` to its own process right after global
    step `step`, so the real handler and the real stop check act on it at a known step, with no
    sleep() guessing where a separate process has got to. With train.stop_check_s tiny the ranks
    check every step, and the run stops after exactly that step."""
    from trainer.training.trainer import Trainer

    train_step = Trainer._train_step

    def step_then_signal(self, *args, **kwargs):
        train_step(self, *args, **kwargs)
        if self.progress.global_step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Trainer, "_train_step", step_then_signal)


# A stop check after every step (a positive interval no step is shorter than): a signal stops the
# run after the step it arrived in. No weight depends on it, so a run with it resumes onto the
# same weights as one without.
EVERY_STEP = "train.stop_check_s=0.000001"


def small_run_args(beton_dir: Path, *extra: str) -> list[str]:
    """tests/configs/small.yaml shrunk to seconds (SMALL_RUN) on the test data, with `extra` overrides."""
    return ["--config", str(REPO / "tests/configs/small.yaml"), f"data.dir={beton_dir}", *SMALL_RUN, *extra]


@pytest.fixture(scope="session")
def small_reference(beton_dir, tmp_path_factory) -> Path:
    """SMALL_RUN (3 epochs of 30 steps) trained uninterrupted, in this process, once a session: the
    run every exact-resume proof of that configuration compares its weights and accuracies with
    (test_trainer: the run folder, the resume at an epoch boundary, SIGUSR2 mid-epoch, eval_every,
    the truncated last.pt)."""
    from helpers import run_main

    run_dir = tmp_path_factory.mktemp("reference") / "small"
    r = run_main("trainer", *small_run_args(beton_dir), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    return run_dir


def resident_run_args(beton_dir: Path, *extra: str) -> list[str]:
    """jobs/configs/tiny.yaml (alternating flip, reflect translation, whitening, lookahead, fast
    biases, 6-view TTA) shrunk to seconds, with every other augmentation on too (cutout, mixup,
    cutmix): 20 steps an epoch, 2 epochs; one thread, which keeps a busy 2-core machine from slowing
    it tenfold."""
    return [
        "--config", str(REPO / "jobs/configs/tiny.yaml"), f"data.dir={beton_dir}", "data.loader=resident",
        "data.train_subset=2000", "data.test_subset=200", "data.batch_size=100", "data.flip=true", "data.translate=2",
        "data.cutout=8", "data.mixup=0.2", "data.cutmix=1.0", "data.mix_prob=0.5",
        "train.epochs=2", "train.ema=0.9", "train.threads=1", "logging.mode=disabled", "logging.log_every=2", *extra,
    ]


@pytest.fixture(scope="session")
def resident_reference(beton_dir, tmp_path_factory) -> Path:
    """resident_run_args trained uninterrupted in this process, once a session: what the resident
    loader's mid-epoch resume with augmentation replayed must end on
    (test_resident::test_mid_epoch_resume_with_augmentation_is_exact)."""
    from helpers import run_main

    run_dir = tmp_path_factory.mktemp("reference") / "resident"
    r = run_main("trainer", *resident_run_args(beton_dir), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    return run_dir


SIGNALLED_STEP = 27  # two_rank_run's pause: epoch 2, step 7 of 20
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # shaped like a W&B API key


@dataclass(frozen=True)
class TwoRankRun:
    """A 2-process run and what it printed: `paused` (rank 1 alone signalled at SIGNALLED_STEP),
    `resumed` (the same command again, to the end); `paused_state` is last.pt as the pause left it."""

    run_dir: Path
    paused: subprocess.CompletedProcess
    resumed: subprocess.CompletedProcess
    paused_state: dict


@pytest.fixture(scope="session")
def two_rank_run(beton_dir, tmp_path_factory) -> TwoRankRun:
    """One 2-process gloo DDP run under torchrun, read by several tests: SMALL_RUN on 2,000 images
    (20 steps an epoch) for 2 epochs with ffcv's flip and translation, a validation split, offline
    W&B and strict collectives (every tensor all-reduced or broadcast made on the training device, as
    NCCL demands); paused by a SIGUSR2 sent to rank 1 only, right after global step 27 (epoch 2, step
    7: no logging step), and resumed to the end. Read by test_trainer::test_two_process_gloo_ddp_with_offline_wandb,
    test_signals::test_two_ranks_agree_on_the_step_when_only_one_is_signalled, and
    test_validation's two-process test."""
    import torch

    run_dir = tmp_path_factory.mktemp("two_ranks") / "run"
    args = [*small_run_args(beton_dir, "data.train_subset=2000", "data.test_subset=200", "train.epochs=2",
                            "data.flip=true", "data.translate=2", "data.val_split=250",
                            "logging.mode=offline", "logging.log_every=1000", EVERY_STEP), "--run-dir", str(run_dir)]
    env = {**os.environ, "WANDB_API_KEY": FAKE_WANDB_KEY, "TRAINER_STRICT_COLLECTIVES": "1",
           "TEST_SIGNAL_RANK": "1", "TEST_SIGNAL_AT_STEP": str(SIGNALLED_STEP)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    paused = subprocess.run([*torchrun, str(REPO / "tests/signalled_trainer.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env=env)
    assert paused.returncode == 0, paused.stderr[-3000:]
    paused_state = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    resumed = subprocess.run([*torchrun, "-m", "trainer", "--run-dir", str(run_dir)], cwd=REPO, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "WANDB_API_KEY": FAKE_WANDB_KEY,
                                                          "TRAINER_STRICT_COLLECTIVES": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return TwoRankRun(run_dir, paused, resumed, paused_state)

