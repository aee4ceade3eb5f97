"""The errors every experiment raises for what the user can fix, and its one-line warnings."""

import sys


class ConfigError(ValueError):
    """An experiment that cannot run as asked; the message names the problem and the fix."""


class DiskFull(ConfigError):
    """An output could not be written for want of space; finished work is kept."""


def warn(message: str) -> None:
    """One line on stderr, as the command line prints its errors."""
    print(f"memk: warning: {message}", file=sys.stderr, flush=True)
