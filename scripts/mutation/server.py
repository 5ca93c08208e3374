"""A long-lived test starter for one copy of the project, run as `python -m _grownfx_mutation_server` in the copy
(the tool writes this file there under that name; it imports nothing from the project).

Starting pytest for each mutant costs seconds of imports (torch above all) before the first test runs, often more
than the test that kills the mutant.  This process imports the third-party modules once and forks a fresh child per
mutant, which imports the project (with the mutant in place) and runs pytest.  The parent never imports the
project, so every child sees the files as they are when it starts.

Protocol, one JSON object per line: the tool writes {"args": [...], "log": PATH}; this process answers
{"pid": PID} when the child starts (the child leads its own session: the tool measures and kills it by that id),
then {"rc": CODE} when it ends (a negative CODE: killed by that signal).
"""
from __future__ import annotations

import importlib
import json
import os
import sys

# imported once here; never the project (the children must import the mutated files)
PRELOAD = ("torch", "numpy", "pytest", "yaml", "pydantic", "rich", "typer", "networkx", "torchvision")


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional dependency missing here is imported (and reported) by the tests
            pass


def _child(args: list[str], log: str) -> None:
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    rc = 3
    try:
        import pytest

        sys.argv = ["pytest", *args]
        rc = int(pytest.main(args))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 3
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def main() -> None:
    _preload()
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req["args"], req["log"])
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        out.write(json.dumps({"rc": rc}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
