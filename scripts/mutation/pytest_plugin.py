"""The pytest side of scripts.mutation, loaded with `-p _grownfx_mutation_plugin` inside a copy of the project
(the tool writes this file there under that name; it imports nothing from the project).

--mutation-map-out OUT     the coverage-map run: coverage.py with one context per test (its node id), started
                           before any conftest imports the project; each test's duration, CPU time and outcome to
                           OUT (JSON),
                           the coverage data to OUT.cov; subprocesses measure themselves (the copy's sitecustomize)
                           into OUT's folder under the test's context
--mutation-select FILE     run only these node ids (a JSON list), in that order
--mutation-result FILE     what happened (JSON): the first failure, collection errors, the test running now
--mutation-limits FILE     {node id: CPU seconds} (JSON): a test of this process that uses more ends the run at
                           once (exit 124, "timed_out" in the result), long before the whole run's limit
"""

from __future__ import annotations

import json
import os
import time

import pytest

_state = {"cov": None, "tests": {}, "order": None, "missing": [], "first_failure": None, "failures": [],
          "collect_errors": [], "current": None, "result": None, "map_out": None, "started": time.time(),
          "limits": None, "timed_out": None}


def pytest_addoption(parser):
    group = parser.getgroup("grownfx-mutation")
    group.addoption("--mutation-map-out", default=None)
    group.addoption("--mutation-cov-include", action="append", default=[])
    group.addoption("--mutation-select", default=None)
    group.addoption("--mutation-result", default=None)
    group.addoption("--mutation-limits", default=None)
    group.addoption("--mutation-preimport", default=None)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    ns = early_config.known_args_namespace
    out = getattr(ns, "mutation_map_out", None)
    if out:
        import coverage

        cov = coverage.Coverage(data_file=out + ".cov", include=list(ns.mutation_cov_include) or None,
                                config_file=False, branch=False)
        cov.start()
        _state["cov"], _state["map_out"] = cov, out
        os.environ["GROWNFX_MUTATION_COVDIR"] = os.path.dirname(os.path.abspath(out))
        os.environ["GROWNFX_MUTATION_COV_INCLUDE"] = os.pathsep.join(ns.mutation_cov_include)
        os.environ["GROWNFX_MUTATION_CONTEXT"] = ""
    _state["result"] = getattr(ns, "mutation_result", None)
    limits = getattr(ns, "mutation_limits", None)
    if limits:
        with open(limits) as f:
            _state["limits"] = json.load(f)
    select = getattr(ns, "mutation_select", None)
    if select:
        with open(select) as f:
            _state["order"] = {nodeid: i for i, nodeid in enumerate(json.load(f))}


def pytest_collection_modifyitems(session, config, items):
    order = _state["order"]
    if order is None:
        return
    def rank(it):  # a node id, or a bare file path standing for every test in that file
        return order.get(it.nodeid, order.get(it.nodeid.split("::")[0]))

    keep = sorted((it for it in items if rank(it) is not None), key=rank)
    dropped = [it for it in items if rank(it) is None]
    found = {it.nodeid for it in keep} | {it.nodeid.split("::")[0] for it in keep}
    _state["missing"] = [n for n in order if n not in found]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_collection_finish(session):
    """The coverage-map run: import every module of the measured packages after collection, before the first
    test, so that what a module runs when it is imported (a default value, a module constant) is recorded as run
    at import (reached by every test of the file), not as run by whichever test happened to import it first."""
    path = session.config.getoption("mutation_preimport")
    if _state["cov"] is None or not path:
        return
    import importlib

    with open(path) as f:
        names = json.load(f)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # an optional dependency missing: the tests that need the module import it themselves
            pass


def pytest_collectreport(report):
    if report.failed:
        _state["collect_errors"].append(report.nodeid or "<session>")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cov = _state["cov"]
    _state["current"] = item.nodeid
    _write_result()
    if cov is not None:
        cov.switch_context(item.nodeid)
        os.environ["GROWNFX_MUTATION_CONTEXT"] = item.nodeid
    cpu0 = _cpu()
    limit = (_state["limits"] or {}).get(item.nodeid)
    if limit:
        import signal

        signal.signal(signal.SIGPROF, _over_limit)
        signal.setitimer(signal.ITIMER_PROF, limit)  # this process's CPU time (user + system)
    try:
        yield
    finally:
        if limit:
            import signal

            signal.setitimer(signal.ITIMER_PROF, 0)
        t = _state["tests"].setdefault(item.nodeid, {"duration": 0.0, "outcome": "passed"})
        t["cpu"] = round(_cpu() - cpu0, 3)
        if cov is not None:
            cov.switch_context("")
            os.environ["GROWNFX_MUTATION_CONTEXT"] = ""
        _state["current"] = None


def _over_limit(signum, frame):
    """A test ran past its CPU limit: a mutant that loops.  Stop now, not after the whole run's limit."""
    _state["timed_out"] = _state["current"]
    _write_result(final=True)
    os._exit(124)


def _cpu() -> float:
    """CPU seconds of this process and of the children it has waited for (a test's subprocesses)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pytest_runtest_logreport(report):
    t = _state["tests"].setdefault(report.nodeid, {"duration": 0.0, "outcome": "passed"})
    t["duration"] += report.duration
    if report.failed:
        t["outcome"] = "failed"
        _state["failures"].append(report.nodeid)
        if _state["first_failure"] is None:
            _state["first_failure"] = report.nodeid
    elif report.skipped and t["outcome"] != "failed":
        t["outcome"] = "skipped"


def _write_result(final: bool = False) -> None:
    path = _state["result"]
    if not path:
        return
    data = {"final": final, "current": _state["current"], "first_failure": _state["first_failure"],
            "failures": _state["failures"], "collect_errors": _state["collect_errors"],
            "missing": _state["missing"], "ran": len(_state["tests"]), "timed_out": _state["timed_out"],
            "passed": sum(t["outcome"] == "passed" for t in _state["tests"].values())}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _write_result(final=True)
    cov = _state["cov"]
    if cov is not None:
        cov.stop()
        cov.save()
        out = _state["map_out"]
        with open(out + ".tmp", "w") as f:
            json.dump({"tests": _state["tests"], "collect_errors": _state["collect_errors"],
                       "exitstatus": int(exitstatus), "wall_s": time.time() - _state["started"]}, f)
        os.replace(out + ".tmp", out)
