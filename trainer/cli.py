"""What every command-line entry point shares: one error line and a non-zero exit for bad input."""

import sys
from collections.abc import Callable

from trainer import UserError


def run(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
