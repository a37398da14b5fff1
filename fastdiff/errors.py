"""One error type for everything a user can fix, the stop a signal asks for, and the CLI wrapper that turns
them into exit codes: 2 for a FastdiffError, 128 + the signal number (143 SIGTERM, 130 SIGINT) for a graceful
stop, each as one line on stderr and no traceback."""
from __future__ import annotations

import logging
import signal
import sys
from typing import Callable, Sequence


class FastdiffError(Exception):
    """A problem with the user's input (config, file, data, environment) and how to fix it."""


class Preempted(Exception):
    """The run stopped at a safe point because a signal asked it to; its state is on disk.

    `signum` is the signal (SIGTERM from a scheduler, SIGINT from Ctrl-C); the CLI exits with 128 + signum.
    """

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; re-run the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a FastdiffError becomes one line on stderr and exit code 2, a graceful stop (Preempted)
    one line and 128 + the signal number; no traceback for either."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(main(argv) or 0)
    except FastdiffError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
