"""A job as submitit sees it: what each of its tasks runs (TrainJob, pickled at submission and
unpickled on the node). Imported when jobs are submitted, not before (it needs submitit); the
state of a job submitted earlier is state.py's.
"""

from __future__ import annotations

import os
import signal
import socket
from datetime import datetime
from pathlib import Path

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """What each task of a job runs: the trainer, with ranks exported from SLURM's variables.

    Checkpointable's checkpoint() resubmits this same object, which is all a requeue needs: the
    trainer resumes from its run folder.
    """

    def __init__(self, config: Path, overrides: list[str], run_dir: Path) -> None:
        self.config, self.overrides, self.run_dir = config, overrides, run_dir

    def __call__(self) -> dict | None:
        # In the job's log: when it started and with which GPUs (under --local, the slot it was given).
        print(f"{datetime.now().isoformat(timespec='milliseconds')} job started on {socket.gethostname()}: "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}", flush=True)
        from trainer.distributed import export_submitit_env
        from trainer.training.run import train
        from trainer.training.stopping import Stopped

        export_submitit_env()
        try:
            return train(self.config, self.overrides, self.run_dir)
        except Stopped as stop:
            if stop.signum == signal.SIGUSR2:
                # The trainer saved its state and put submitit's handler back; hand that handler
                # the signal: it calls checkpoint() and requeues the job (from rank 0).
                os.kill(os.getpid(), signal.SIGUSR2)
            return None

