"""Errors a user can act on, and the exit codes of the command line.

The one error style of grownfx, for every module (new code included):

* A problem with what the user gave (a recipe, an option, a dataset, a run folder, a file on disk) raises a
  subclass of `UserError` whose message is ONE line naming the problem and where it is (file, field, line) and,
  when there is one, what to do about it.  The command line prints `error: <message>` on stderr and exits 2
  (`EXIT_USER`), never with a traceback.  An error that lists several problems found together (a recipe's)
  gives `lines()`: one `error: ...` line each.
* Subclass `UserError` together with the builtin type callers already catch, e.g.
  `class RecipeError(UserError, ValueError)`, and raise it `from None` when the cause adds nothing for a user.
* Anything else is a defect of grownfx: `error: <Type>: <message>` and a hint to rerun with `--debug` for the
  traceback, exit 1 (`EXIT_BUG`).
* Ctrl-C (SIGINT) and SIGTERM stop a command through `Interrupted`: exit 130 and 143 (128 + the signal's
  number, the shell's convention), with one line saying what was kept and how to continue.
* Warnings are `warning: <message>` on stderr and leave the exit code alone.

This module imports the standard library only: the command line loads it before torch.
"""

from __future__ import annotations

import signal

__all__ = ["EXIT_BUG", "EXIT_OK", "EXIT_USER", "Interrupted", "UserError", "exit_code", "message_lines"]

EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2


class UserError(Exception):
    """A problem with the user's input or environment, told in one line; the command line exits 2."""

    exit_code = EXIT_USER

    def lines(self) -> list[str]:
        """The problems, one line each (one, unless a subclass collects several)."""
        return [str(self)]


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT (Ctrl-C) or SIGTERM; `exit_code` is 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        self.signum = int(signum)
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def __str__(self) -> str:
        text = super().__str__()
        return f"interrupted ({self.signal_name})" + (f": {text}" if text else "")


def exit_code(exc: BaseException) -> int:
    """The command line's exit code for `exc`: 2 for a UserError, 128 + signal for an interrupt, else 1."""
    if isinstance(exc, UserError):
        return exc.exit_code
    if isinstance(exc, Interrupted):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return EXIT_BUG


def message_lines(exc: BaseException) -> list[str]:
    """What the command line prints for `exc`, without the traceback."""
    if isinstance(exc, UserError):
        return [f"error: {line}" for line in exc.lines()]
    if isinstance(exc, KeyboardInterrupt):
        return [str(exc) if isinstance(exc, Interrupted) else "interrupted (SIGINT)"]
    text = str(exc).strip()
    return [f"error: {type(exc).__name__}" + (f": {text}" if text else "")]
