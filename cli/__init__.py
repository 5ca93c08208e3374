"""The `grownfx` command line (installed as grownfx.cli).

A Ctrl-C while the command line is still importing (before a command's own handler runs) ends with one line and
exit code 130, not a traceback through importlib.
"""

import os
import sys


def _interrupted(kind, value, tb, _default=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        try:
            sys.stdout.flush()
            sys.stderr.write("interrupted\n")
            sys.stderr.flush()
        finally:
            os._exit(130)
    _default(kind, value, tb)


if os.path.basename(sys.argv[0] or "") in ("grownfx", "__main__.py", "-m"):  # the command line, not an import
    sys.excepthook = _interrupted
