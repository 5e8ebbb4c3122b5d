"""Errors a user can cause, and the one place that turns them into one line and exit code 2.

    diffxattn generate "x" --steps 0      ->  diffxattn generate: error: argument --steps: ... (exit 2)

A user error is a `ValueError` (bad value, config, prompt, pipeline folder, checkpoint, data: the project's
own error classes below all are) or an `OSError` (missing file, permission, full disk). Code that reads a
user's file wraps whatever the reading library raises into one of these classes (a malformed config can
make diffusers raise TypeError or IndexError), so any other exception is a bug and keeps its traceback.
`--debug` shows the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import errno
import reprlib
import sys
from typing import Callable

USER_ERRORS = (ValueError, OSError)
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
MAX_MESSAGE = 600  # characters: an error that quotes a 1 MB prompt still fits a terminal line or two


class UserError(ValueError):
    """Bad input the user can fix; the message names the bad value and what was expected."""


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 3


def short_repr(value, limit: int = 160) -> str:
    """repr() bounded in length and depth: a value built by a YAML alias bomb is never expanded."""
    return shorten(_repr.repr(value), limit)


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut in the middle to at most about `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} …[{len(text) - 2 * half} characters]… {text[-half:]}"


def message(error: BaseException) -> str:
    """The user-facing text of an error: bounded, a full disk said as such."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        where = f" while writing {error.filename}" if error.filename else ""
        return shorten(f"disk full{where} ({error.strerror}); free space on that disk or write somewhere else")
    text = str(error) or type(error).__name__
    if "Original Traceback (most recent call last)" in text:  # re-raised from a DataLoader worker
        text = text.strip().splitlines()[-1]
    lines = text.splitlines()
    if _is_prompt_error(error):  # problem, prompt, caret: three lines by design, each bounded
        return "\n".join(shorten(line) for line in lines)
    return shorten(" ".join(line.strip() for line in lines))


def _is_prompt_error(error: BaseException) -> bool:
    from .prompt_syntax import PromptSyntaxError  # torch-free, unlike .prompts

    return isinstance(error, PromptSyntaxError)


def run(prog: str, command: Callable[[], int | None], debug: bool = False, failures: tuple = ()) -> int:
    """Run a command-line command: its exit code (0 for None), or one line on stderr and 2 for a user error.

    Exceptions in `failures` (e.g. a training loss that became NaN) are reported the same way with code 1.
    """
    try:
        return command() or 0
    except (*USER_ERRORS, *failures) as e:
        if debug:
            raise
        print(f"{prog}: error: {message(e)}", file=sys.stderr)
        return 1 if isinstance(e, failures) else 2


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), like every other error of the project."""

    def error(self, text: str):
        self.exit(2, f"{self.prog}: error: {shorten(text)} (see {self.prog} --help)\n")


def arg_type(check: Callable):
    """An argparse `type` from a checking function: its ValueError becomes argparse's one-line error."""
    def convert(text: str):
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = check.__name__
    return convert
