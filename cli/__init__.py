"""The `grownfx` command line (installed as grownfx.cli).

A Ctrl-C or a SIGTERM while the command line is still importing (before a command's own handler runs) ends with one
line and exit code 130 (SIGINT) or 143 (SIGTERM), not a traceback through importlib nor a silent death.
"""

import os
import signal
import sys

from grownfx.errors import Interrupted, exit_code


def _interrupted(kind, value, tb, _default=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        try:
            sys.stdout.flush()
            sys.stderr.write((str(value) if isinstance(value, Interrupted) else "interrupted (SIGINT)") + "\n")
            sys.stderr.flush()
        finally:
            os._exit(exit_code(value))
    _default(kind, value, tb)


def _terminated(signum, frame):
    raise Interrupted(signum)


if os.path.basename(sys.argv[0] or "") in ("grownfx", "__main__.py", "-m"):  # the command line, not an import
    sys.excepthook = _interrupted
    signal.signal(signal.SIGTERM, _terminated)
