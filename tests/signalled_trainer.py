"""`python -m trainer` with the tests' deterministic stop hook (conftest.signal_at_step) on one rank,
for multi-process runs, where a test cannot patch the workers from its own process:
TEST_SIGNAL_RANK's process sends itself SIGUSR2 right after global step TEST_SIGNAL_AT_STEP.

    torchrun --standalone --nproc_per_node=2 tests/signalled_trainer.py --config ... [key=value ...]
"""

import os
import sys

import pytest

from conftest import signal_at_step
from trainer.training.run import main

if __name__ == "__main__":
    if os.environ["RANK"] == os.environ["TEST_SIGNAL_RANK"]:
        signal_at_step(pytest.MonkeyPatch(), int(os.environ["TEST_SIGNAL_AT_STEP"]))
    main(sys.argv[1:])
