"""Atomic file writes (what a reader finds under a name is either the old file or the whole new one)
and exclusive lock files."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; it replaces `path` only when the block succeeds.

    The temporary file lives in the same folder so the final rename cannot cross filesystems
    (os.replace is atomic only within one). On any error or interrupt it is removed and `path`
    keeps its previous content; only a process killed inside the block leaves it behind (see
    remove_stale_temp_files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Removes the temporary files atomic_path(path) left when its process was killed mid-write, and
    returns them. Only for a caller that knows no one is writing `path` now (it holds the lock)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class LockHeld(Exception):
    """Another process holds the lock; `holder` is what it wrote into the lock file ("" if nothing yet)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path}: held by {holder or 'another process'}")
        self.path, self.holder = path, holder


class FileLock:
    """An exclusive lock on a file with fcntl.flock, held until release() or until the process
    ends: the OS releases it when the process dies, even by kill -9, so no stale lock is ever left
    to clean up by hand. The holder writes who it is into the file, for whoever it refuses.

    The file is never deleted on release: a process may have it open and be about to lock it, and
    it would then hold a lock on a file no one else can find.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, path: str | os.PathLike, holder: str) -> FileLock:
        """Takes the lock now or raises LockHeld; does not wait. OSError if the file cannot be
        opened or the filesystem cannot lock (ENOLCK, ENOSYS, EOPNOTSUPP)."""
        path = Path(path)
        # Not O_TRUNC: the file holds the current holder's name. O_CLOEXEC: a program the holder
        # starts (W&B's service, compile workers) must not keep the lock after the holder dies.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_by = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(path, held_by) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder + "\n").encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor releases the lock
            self._fd = -1


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex), read in chunks: the one hash of files that results and checks record."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
