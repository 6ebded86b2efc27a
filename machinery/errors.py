"""The errors a person running the scripts can fix, and how any error is said in one line.

UserError's message is printed alone (`error: ...`), without a traceback, and the script exits non-zero.
"""
import argparse
import os
import signal
import sys


class UserError(Exception):
    """A problem the person running the script can fix: a damaged data file, a bad checkpoint, a taken folder..."""


class NonFiniteLoss(ArithmeticError):
    """The loss or the weights became NaN or infinite: the weights are garbage from here on."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose error is one line that names the problem (exit 2), not the usage text and then it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(error, with_type=False):
    """An exception in one line: the first line of its message (its type's name if it has none), after its type's
    name where `with_type` (as run.json's "error" gives it)."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if with_type else lines[0]


def prepare_console():
    """What each script does first, before its heavy imports, so that the console never turns a finished job into
    a traceback: Ctrl-C while torch loads (seconds) says a word and exits 130; an output the shell closed
    (`>&-`, `2>&-`) goes to the null device instead; a name the console cannot encode (a cp1252 console and a
    file named in Greek) is printed with backslash escapes. A run installs its own signal handlers once it starts
    (runs.stop_signals_handled)."""
    def stop(*_):
        print("Stopped.", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, stop)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:  # the file descriptor was closed before Python started
            setattr(sys, name, open(os.devnull, "w"))
        elif hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
