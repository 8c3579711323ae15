"""Taking the run folder: one trainer at a time writes in it.

Rank 0 holds the folder's lock (.lock, naming the holder's PID and host) for the whole run, and a
second trainer is refused: two trainers writing one folder interleave their metrics and
checkpoints. A command failing before it writes anything leaves the folder as it found it (Claim.undo).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from trainer import UserError, run_files
from trainer.distributed import Dist
from trainer.files import FileLock, LockHeld
from trainer.training import checkpoint
from trainer.training.collectives import broadcast_object

# What flock says on a filesystem that cannot lock (e.g. Lustre mounted without -o flock).
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


@dataclass
class Claim:
    """Rank 0's hold on the run folder for one command: its lock (two trainers writing one folder
    interleave their metrics and checkpoints), and what the command did to take it, so that a
    command failing before it writes anything leaves the folder as it found it."""

    run_dir: Path
    locks: list[FileLock] = field(default_factory=list)
    created: bool = False  # this command made run_dir (and its lock file)
    replaced: Path | None = None  # --restart moved the old folder here

    def undo(self) -> None:
        """Removes the folder this command created, if it still holds nothing but the lock file,
        and puts back a folder that --restart moved aside."""
        if self.created:
            (self.run_dir / run_files.LOCK).unlink(missing_ok=True)
            try:
                self.run_dir.rmdir()  # only if empty: nothing else is ever deleted
            except OSError:
                return
        if self.replaced is not None and not self.run_dir.exists():
            self.replaced.rename(self.run_dir)
            self.replaced = None

    def release(self) -> None:
        for lock in self.locks:
            lock.release()


def _holder() -> str:
    """Who holds a run folder, as a refused process prints it."""
    job = os.environ.get("SLURM_JOB_ID")
    return (f"PID {os.getpid()} on host {socket.gethostname()}" + (f" (SLURM job {job})" if job else "")
            + f", since {datetime.now().isoformat(timespec='seconds')}")


def _lock(claim: Claim) -> None:
    """Creates the run folder if needed and takes its lock, or refuses naming the holder. The lock
    lasts while this process lives: a requeued job gets it once its previous incarnation is gone."""
    run_dir = claim.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        claim.locks.append(FileLock.acquire(run_dir / run_files.LOCK, _holder()))
    except LockHeld as e:
        raise UserError(f"{run_dir}: in use by another trainer ({e.holder or 'its PID not written yet'}); "
                        f"let it finish or stop it, or choose another --run-dir") from None
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise
        print(f"warning: {run_dir}: cannot lock it on this filesystem ({e.strerror}); make sure no other trainer "
              f"uses it", file=sys.stderr)
    claim.created = claim.created or created  # only now: a lock file that is not ours is never removed


def _check_history(run_dir: Path) -> None:
    """Refuses a folder holding a run's results but no checkpoint: starting afresh would overwrite them."""
    ckpt_dir = run_dir / run_files.CHECKPOINTS
    if (ckpt_dir / checkpoint.LAST).exists() or (ckpt_dir / checkpoint.PREV).exists():
        return  # resumed from, or refused by checkpoint.load_latest if none is readable
    metrics = run_dir / run_files.METRICS
    history = [p.name for p in (metrics, run_dir / run_files.SUMMARY) if p.exists() and p.stat().st_size > 0]
    if history:
        raise UserError(f"{run_dir}: holds {' and '.join(history)} but no checkpoint to resume from; "
                        f"{run_files.RESTART_HINT}")


def claim_run_dir(run_dir: Path, restart: bool = False) -> Claim:
    """Takes the run folder for this process (see Claim); with `restart`, first moves the folder
    aside (renamed, never deleted) so the run starts afresh in an empty one."""
    claim = Claim(run_dir)
    try:
        _lock(claim)
        if restart and any(p.name != run_files.LOCK for p in run_dir.iterdir()):
            claim.replaced = run_files.aside_path(run_dir)
            run_dir.rename(claim.replaced)  # its lock goes with it, still held: no one starts in it meanwhile
            _lock(claim)
        elif not restart:
            _check_history(run_dir)
    except BaseException as e:
        claim.undo()
        claim.release()
        if isinstance(e, OSError):
            raise UserError(f"{e.filename or run_dir}: {e.strerror or e}") from None
        raise
    return claim


def claim_on_every_rank(run_dir: Path, restart: bool, group: Dist) -> Claim | None:
    """Rank 0 claims the folder; every rank learns whether it could, so all fail alike if not."""
    claim, error = None, None
    if group.is_main:
        try:
            claim = claim_run_dir(run_dir, restart)
        except UserError as e:
            error = str(e)
    error = broadcast_object(error, group)  # also: no rank reads the folder before --restart moved it
    if error is not None:
        raise UserError(error)
    return claim
