"""One error type for everything a user can fix, and the CLI wrapper that turns it into exit code 2."""
from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence


class FastdiffError(Exception):
    """A problem with the user's input (config, file, data, environment) and how to fix it."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a FastdiffError becomes one line on stderr and exit code 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(main(argv) or 0)
    except FastdiffError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
