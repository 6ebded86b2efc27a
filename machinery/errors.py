"""The errors a person running the scripts can fix, and how any error is said in one line.

UserError's message is printed alone (`error: ...`), without a traceback, and the script exits non-zero.
"""
import signal
import sys


class UserError(Exception):
    """A problem the person running the script can fix: a damaged data file, a bad checkpoint, a taken folder..."""


class NonFiniteLoss(ArithmeticError):
    """The loss or the weights became NaN or infinite: the weights are garbage from here on."""


def one_line(error, with_type=False):
    """An exception in one line: the first line of its message (its type's name if it has none), after its type's
    name where `with_type` (as run.json's "error" gives it)."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if with_type else lines[0]


def quiet_ctrl_c():
    """Ctrl-C while torch loads (seconds): a word and exit 130, not the traceback of an import. Called by each
    script before its heavy imports; a run installs its own handlers once it starts (runs.stop_signals_handled)."""
    def stop(*_):
        print("Stopped.", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, stop)
