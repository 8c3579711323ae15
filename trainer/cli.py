"""What every command-line entry point shares: one error line and a non-zero exit for bad input.

Bad input is a UserError, or an OSError: a run folder that is a file, a read-only file system, a
full disk are the user's to fix, so they are reported as `error: PATH: reason`, as the shell's own
tools say it, not as a traceback.
"""

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from trainer import UserError


def first_line(e: BaseException) -> str:
    """An exception's message, its first line only (torch's and numba's span many), or the type's
    name where it has none: what a one-line error quotes."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def described(e: BaseException) -> str:
    """`Type: first line of the message`, or the type alone."""
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__


def describe_os_error(e: OSError) -> str:
    """`PATH: reason` (`PATH -> PATH2: reason` for a rename or link), or the reason alone if the
    error names no file."""
    reason = e.strerror or str(e) or type(e).__name__
    if not isinstance(e.filename, (str, bytes, os.PathLike)):  # None, or a file descriptor
        return reason
    path = os.fsdecode(e.filename)
    if isinstance(e.filename2, (str, bytes, os.PathLike)):
        path = f"{path} -> {os.fsdecode(e.filename2)}"
    return f"{path}: {reason}"


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Gives an OSError raised inside the block `path` as its file if it names none: a write() or
    close() that fails (a full disk) does not say which file it was writing."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from e  # the errno picks the subclass


def run(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
