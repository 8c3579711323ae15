import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The project's test data: the shared CIFAR-10 copy beside the checkout (CIFAR10_SOURCE overrides).
CIFAR10_SOURCE = Path(os.environ.get("CIFAR10_SOURCE", REPO.parent / "shared/data/cifar10/cifar-10-batches-py"))


@pytest.fixture(scope="session")
def cifar_source() -> Path:
    if not (CIFAR10_SOURCE / "data_batch_1").is_file():
        pytest.fail(f"CIFAR-10 test data not found at {CIFAR10_SOURCE} (set CIFAR10_SOURCE)")
    return CIFAR10_SOURCE


@pytest.fixture(scope="session")
def beton_dir(tmp_path_factory, cifar_source) -> Path:
    """The shared CIFAR-10 converted once per test session by the real converter."""
    from trainer.data.cifar10 import prepare

    out = tmp_path_factory.mktemp("cifar10")
    prepare(out, cifar_source)
    return out


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python -m ...` as a user would, capturing its output."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
