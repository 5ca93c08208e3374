"""The mutation tool (python -m scripts.mutation) on a tiny synthetic project written in tmp_path: it finds the
mutants it should (and none where it must not), a good test kills them, a weak test leaves a survivor, a test's
subprocess sees the mutant, equivalents are listed and never run, --changed picks only touched lines, and the
exit code goes red under --fail-under.  The developer's tree is never modified."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scripts.mutation.mutants import find_mutants

REPO = Path(__file__).resolve().parents[1]

SOURCE = '''\
"""Module docstring: 1 + 1 is never mutated."""
import logging

log = logging.getLogger(__name__)
LIMIT: int = 3


def f(x: int = 4, items=None, t=None) -> float:
    """Docstring with 2 numbers."""
    total = 0
    total = x + 1
    if x < LIMIT and x in items:
        log.info("x is %d", x + 1)
        return max(x, 2) * 2.0
    for i in range(x):
        if not i:
            continue
        break
    y = t.sum(dim=1) + t.size(0)
    z = any(items)
    items.append(x)
    total += x
    ok = True
    return divmod(x, 3)


def g(x):
    return x - 1  # pragma: no mutate


class A:
    def __repr__(self):
        return "A(%d)" % (1 + 2)

    def h(self):
        raise ValueError(f"bad {1 + 1}")
'''


def _lines(source: str):
    return {i + 1: line.strip() for i, line in enumerate(source.splitlines())}


def test_finds_each_operator_and_skips_docstrings_messages_annotations_repr_and_pragmas():
    mutants = find_mutants("pkg/mod.py", SOURCE)
    got = {(m.operator, m.mutated.strip()) for m in mutants}
    expected = {
        ("comparison", "if x <= LIMIT and x in items:"), ("comparison", "if x < LIMIT and x not in items:"),
        ("boolean", "if x < LIMIT or x in items:"), ("boolean", "if i:"), ("boolean", "ok = False"),
        ("arithmetic", "total = x - 1"), ("arithmetic", "return max(x, 2) / 2.0"), ("arithmetic", "total -= x"),
        ("constant", "def f(x: int = 5, items=None, t=None) -> float:"), ("constant", "return max(x, 2) * 4.0"),
        ("constant", "return divmod(x, 4)"), ("constant", "LIMIT: int = 4"),
        ("drop", "pass"), ("drop", "return None"), ("swap-args", "return divmod(3, x)"),
        ("min-max", "return min(x, 2) * 2.0"), ("any-all", "z = all(items)"),
        ("dim", "y = t.sum(dim=2) + t.size(0)"), ("dim", "y = t.sum(dim=0) + t.size(0)"),
        ("dim", "y = t.sum(dim=1) + t.size(1)"), ("dim", "y = t.sum(dim=1) + t.size(-1)"),
        ("break-continue", "break"), ("break-continue", "continue"),
    }
    assert expected <= got, expected - got
    lines = _lines(SOURCE)
    by_line = {}
    for m in mutants:
        by_line.setdefault(lines[m.line], set()).add((m.operator, m.mutated.strip()))
    # dropped statements: a re-assignment, a call, an augmented assignment, an unread first binding -- but not
    # the first value of a local read later (always an UnboundLocalError) nor a module constant
    assert ("drop", "pass") in by_line["total = x + 1"] and ("drop", "pass") in by_line["items.append(x)"]
    assert ("drop", "pass") in by_line["ok = True"] and ("drop", "pass") in by_line["total += x"]
    assert ("drop", "pass") not in by_line.get("total = 0", set())
    assert not any(op == "drop" for op, _ in by_line["LIMIT: int = 3"])
    # never: docstrings, the log call, g (pragma), __repr__, the raise and its f-string, max's symmetric arguments,
    # the dimension constants as plain constants
    untouched = ['"""Module docstring: 1 + 1 is never mutated."""', '"""Docstring with 2 numbers."""',
                 'log.info("x is %d", x + 1)', "return x - 1  # pragma: no mutate", 'return "A(%d)" % (1 + 2)',
                 'raise ValueError(f"bad {1 + 1}")']
    for line in untouched:
        assert line not in by_line, (line, by_line.get(line))
    assert ("swap-args", "return max(2, x) * 2.0") not in got
    assert ("constant", "y = t.sum(dim=1) + t.size(1)") not in got
    for m in mutants:  # every mutant is valid Python
        compile(m.apply(SOURCE), "pkg/mod.py", "exec")


def test_ids_are_stable_across_edits_elsewhere_and_change_with_the_line():
    before = {m.id: m for m in find_mutants("pkg/mod.py", SOURCE)}
    shifted = "def new():\n    return 7\n\n\n" + SOURCE
    after = {m.id: m for m in find_mutants("pkg/mod.py", shifted)}
    assert set(before) <= set(after)  # ids of the old mutants survive lines inserted above
    assert all(after[i].line == before[i].line + 4 for i in before)
    edited = SOURCE.replace("return divmod(x, 3)", "return divmod(x, 5)")
    ids = {m.id for m in find_mutants("pkg/mod.py", edited)}
    old = {i for i, m in before.items() if "divmod" in m.original}
    assert old and not old & ids
    assert len(before) == len(set(before))  # identical edits in one function get distinct ids


# -- the tool end to end on a tiny project -------------------------------------------------------------------------

CALC = '''\
def is_adult(age):
    return age >= 18


def scale(values, factor):
    return [v * factor for v in values]
'''

# tiny.cli lives in cli/ (a setuptools package-dir, as grownfx.cli does): only the copies' import hook finds it
LOOP = '''\
def count_up(n):
    i = 0
    while i < n:
        i += 1
    return i
'''

TESTS = '''\
import subprocess
import sys

from tiny.calc import is_adult, scale


def test_adult_boundary():  # a good test: the boundary on both sides
    assert is_adult(18) and not is_adult(17)


def test_scale_weak():  # a weak test: checks the length, not the values
    assert len(scale([1, 2], 3)) == 2


def test_count_weakly():  # reaches count_up in this process but tells almost nothing
    from tiny.cli.loop import count_up

    assert isinstance(count_up(2), int)


def test_unrelated():
    assert sum([1, 2]) == 3


def test_count_in_a_subprocess():  # the mutant must reach a child process too
    code = "from tiny.cli.loop import count_up; print(count_up(3))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "3"
'''

PYPROJECT = '''\
[project]
name = "tiny"

[tool.setuptools]
packages = ["tiny", "tiny.cli"]

[tool.setuptools.package-dir]
"tiny.cli" = "cli"

[tool.grownfx.mutation]
targets = ["tiny", "cli"]
tests = ["tests"]
pytest_args = []
equivalents = "equivalents.yaml"
jobs = 2
'''


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                          check=True, capture_output=True, text=True).stdout


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "tiny").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "tiny" / "__init__.py").write_text("")
    (root / "tiny" / "calc.py").write_text(CALC)
    (root / "cli").mkdir()
    (root / "cli" / "__init__.py").write_text("")
    (root / "cli" / "loop.py").write_text(LOOP)
    (root / "tests" / "test_calc.py").write_text(TESTS)
    (root / "pyproject.toml").write_text(PYPROJECT)
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    return root


def _tool(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROWNFX_MUTATION_")}
    return subprocess.run([sys.executable, "-m", "scripts.mutation", "--root", str(root),
                           "--cache-dir", str(root.parent / "cache"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _ids(root: Path, *args: str) -> dict[tuple[str, int, str, str], str]:
    """{(file, line, operator, mutated text): id} from --list."""
    proc = _tool(root, "--list", *args)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for row in proc.stdout.splitlines():
        if len(row) > 12 and row[10:12] == "  " and row[:10].isalnum():
            mid, rest = row.split("  ", 1)
            where, op_and = rest.split(" ", 1)
            op, change = op_and.split(": ", 1)
            path, line = where.rsplit(":", 1)
            out[(path, int(line), op, change.split("  ->  ")[1].strip())] = mid
    return out


def _tree_digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".mutation" not in p.parts and ".git" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_kills_with_good_tests_reports_survivors_honours_equivalents_and_fails_under(tmp_path):
    pytest.importorskip("coverage")
    root = _project(tmp_path)
    ids = _ids(root)
    equivalent = ids[("cli/loop.py", 2, "constant", "i = 1")]  # starting at 1: the same result for every n >= 1
    (root / "equivalents.yaml").write_text(
        f"- id: {equivalent}\n  file: cli/loop.py\n  reason: count_up(n) is only called with n >= 1\n"
        "- id: 0123456789\n  file: tiny/calc.py\n  reason: an entry whose mutant no longer exists\n")
    before = _tree_digest(root)
    proc = _tool(root, "--timeout-base", "4", "--timeout-factor", "1", "--fail-under", "100",
                 "--report", str(tmp_path / "rep"))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # red: the weak test leaves survivors
    assert "under --fail-under 100" in proc.stdout
    assert _tree_digest(root) == before  # the developer's tree is untouched
    assert not list((root / ".mutation" / "work").glob("run-*"))  # the copies are gone
    rep = json.loads((tmp_path / "rep.json").read_text())
    # cli/loop.py is first imported inside a test (test_count_weakly): what it runs at import (its `def` line) is
    # still recorded as run at import, reached by every test of the file, not by that test alone
    cmap = json.loads(max((root.parent / "cache").rglob("map-*.json"), key=lambda f: f.stat().st_mtime).read_text())
    assert 1 in cmap["import_lines"]["cli/loop.py"], cmap["import_lines"]
    status = {(m["line"], m["operator"], m["mutated"].strip()): m for m in rep["mutants"]}
    boundary = status[(2, "comparison", "return age > 18")]
    assert boundary["status"] == "killed" and boundary["killer"] == "tests/test_calc.py::test_adult_boundary"
    weak = status[(6, "arithmetic", "return [v / factor for v in values]")]
    assert weak["status"] == "survived" and weak["ran"] == 1
    # killed through the child process the test starts: the copy's import hook reaches it
    loop = status[(3, "comparison", "while i <= n:")]
    assert loop["file"] == "cli/loop.py" and loop["status"] == "killed", loop
    assert loop["killer"] == "tests/test_calc.py::test_count_in_a_subprocess"
    endless = status[(4, "arithmetic", "i -= 1")]
    assert endless["status"] == "timeout" and "CPU" in endless["detail"]  # an endless loop burns CPU
    eq = status[(2, "constant", "i = 1")]
    assert eq["status"] == "equivalent" and eq["reason"].startswith("count_up(n)") and eq["seconds"] == 0
    assert [e["id"] for e in rep["stale_equivalents"]] == ["0123456789"]
    c = rep["counts"]
    assert rep["score"] == pytest.approx((c["killed"] + c["timeout"]) / (c["total"] - c["equivalent"]))
    md = (tmp_path / "rep.md").read_text()
    assert "## Survivors" in md and "return [v / factor for v in values]" in md and equivalent in md
    # green when the bar is met; --id reruns one mutant (from the cached coverage map)
    proc = _tool(root, "--id", boundary["id"], "--fail-under", "100", "--report", str(tmp_path / "one"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "coverage map: cached" in proc.stdout
    # --resume takes the verdicts an interrupted run wrote, one JSON line per mutant, and runs only the rest
    partial = tmp_path / "earlier.partial.jsonl"
    partial.write_text(json.dumps(weak) + "\n")
    proc = _tool(root, "--id", weak["id"], "--resume", str(partial), "--report", str(tmp_path / "resumed"))
    assert "1 mutants judged by the earlier run, 0 to go" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "resumed.json").read_text())["counts"]["survived"] == 1
    # an edit that moves every line: the map is rebuilt for the tests that reached the file only, and the same
    # mutant (same id, new line) is still found and killed by the same test
    (root / "tiny" / "calc.py").write_text("def helper():\n    return 0\n\n\n" + CALC)
    proc = _tool(root, "--id", boundary["id"], "--report", str(tmp_path / "moved"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "coverage map: stale; rebuilding for 2 tests and 0 changed test files" in proc.stdout
    moved = json.loads((tmp_path / "moved.json").read_text())["mutants"]
    assert [(m["line"], m["status"], m["killer"]) for m in moved] == [(6, "killed", boundary["killer"])]


def test_changed_mutates_only_the_lines_a_change_touched(tmp_path):
    root = _project(tmp_path)
    _git(root, "checkout", "-q", "-b", "feature")
    (root / "tiny" / "calc.py").write_text(CALC.replace("return age >= 18", "return age >= 21"))
    _git(root, "commit", "-q", "-am", "raise the age")
    (root / "cli" / "loop.py").write_text(LOOP.replace("    return i\n", "    return i + 0\n"))  # uncommitted
    (root / "tiny" / "extra.py").write_text("def half(x):\n    return x / 2\n")  # untracked: wholly new
    ids = _ids(root, "--changed")  # against main: the commit, the uncommitted edit and the new file
    assert {(f, line) for f, line, _, _ in ids} == {("tiny/calc.py", 2), ("cli/loop.py", 5), ("tiny/extra.py", 2)}
    assert {(f, op) for f, _, op, _ in ids} >= {("tiny/calc.py", "comparison"), ("cli/loop.py", "arithmetic"),
                                                ("tiny/extra.py", "arithmetic")}
    ids = _ids(root, "--changed", "feature")  # against the branch itself: only the uncommitted and new lines
    assert {(f, line) for f, line, _, _ in ids} == {("cli/loop.py", 5), ("tiny/extra.py", 2)}


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    root = _project(tmp_path)
    (root / "equivalents.yaml").write_text("- id: 0123456789\n  file: tiny/calc.py\n")
    proc = _tool(root, "--list")
    assert proc.returncode == 2 and "entry 1" in proc.stderr and "reason" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (root / "equivalents.yaml").unlink()
    proc = _tool(root, "--list", "--files", "tiny/nothing.py")
    assert proc.returncode == 2 and "tiny/nothing.py" in proc.stderr
    proc = _tool(root, "--list", "--changed", "no-such-branch")
    assert proc.returncode == 2 and "no-such-branch" in proc.stderr
    proc = _tool(root, "--list", "--tests", "tests/test_nothing.py")
    assert proc.returncode == 2 and "tests/test_nothing.py" in proc.stderr


def test_a_mutant_of_the_same_size_and_mtime_never_runs_stale_bytecode(tmp_path):
    from scripts.mutation.tree import forget_bytecode, worker_env

    copy = tmp_path / "w0"
    copy.mkdir()
    src = copy / "mod.py"

    def run() -> str:
        return subprocess.run([sys.executable, "-c", "import mod; print(mod.X)"], cwd=copy, env=worker_env(copy),
                              capture_output=True, text=True).stdout.strip()

    src.write_text("X = 1\n")
    os.utime(src, (1e9, 1e9))
    assert run() == "1"  # compiled and cached
    src.write_text("X = 2\n")  # same size, same mtime: the cached bytecode looks valid to Python
    os.utime(src, (1e9, 1e9))
    forget_bytecode(copy, src)
    assert run() == "2"


def test_the_tests_run_for_a_mutant_reach_its_statement_fastest_first_killers_first_within_the_budget():
    from scripts.mutation.covmap import CoverageMap
    from scripts.mutation.execute import select_tests

    source = "def f(x):\n    y = x\n    return x + 1\n"
    (m,) = [m for m in find_mutants("pkg/mod.py", source) if m.operator == "arithmetic"]
    tests = {"t::slow": 50.0, "t::fast": 1.0, "t::mid": 10.0, "t::failing": 0.1, "t::other": 0.5}
    cmap = CoverageMap("k", "c", {}, {n: {"duration": d, "cpu": d, "outcome": "passed"} for n, d in tests.items()},
                       {"pkg/mod.py": {3: ["t::slow", "t::fast", "t::mid", "t::failing"], 2: ["t::other"]}})
    cmap.tests["t::failing"]["outcome"] = "failed"  # fails without any mutant: never judges one
    assert select_tests(cmap, m, None) == (["t::fast", "t::mid", "t::slow"], 3)
    assert select_tests(cmap, m, 12) == (["t::fast", "t::mid"], 3)
    assert select_tests(cmap, m, 0.5) == (["t::fast"], 3)  # at least one
    # a test that killed mutants of the same function goes first, then one that killed in the same file
    kills = {"pkg/mod.py": {"t::mid": 2}, ("pkg/mod.py", "f"): {"t::slow": 1}}
    assert select_tests(cmap, m, None, kills) == (["t::slow", "t::mid", "t::fast"], 3)
    assert select_tests(cmap, m, 12, {"pkg/mod.py": {"t::mid": 1}}) == (["t::mid", "t::fast"], 3)
    cmap.import_lines = {"pkg/mod.py": {3}}  # a line run at import time: every test of the file reaches it
    assert select_tests(cmap, m, None) == (["t::other", "t::fast", "t::mid", "t::slow"], 4)


def test_a_sampled_run_judges_its_mutants_in_a_seeded_random_order_so_a_stopped_run_is_a_sample_too():
    from scripts.mutation.cli import judging_order

    source = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(40))
    ms = [m for m in find_mutants("pkg/a.py", source)] + [m for m in find_mutants("pkg/b.py", source)]
    ms.sort(key=lambda m: (m.file, m.line))
    first = judging_order(ms, 0)
    assert sorted(m.id for m in first) == sorted(m.id for m in ms)  # the same mutants, each once
    assert [m.id for m in judging_order(list(reversed(ms)), 0)] == [m.id for m in first]  # whatever order given
    assert [m.id for m in judging_order(ms, 1)] != [m.id for m in first]  # the seed decides it
    half = first[: len(first) // 2]  # a run stopped half way has judged both files, not only the first one
    assert {m.file for m in half} == {"pkg/a.py", "pkg/b.py"}


def test_a_sample_is_uniform_seeded_and_stays_the_same_sample_when_code_elsewhere_changes():
    from scripts.mutation.cli import sample

    source = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(60))
    ms = find_mutants("pkg/a.py", source) + find_mutants("pkg/b.py", source)
    chosen = {m.id for m in sample(ms, 30, 0)}
    assert len(chosen) == 30 and chosen <= {m.id for m in ms}
    assert {m.id for m in sample(list(reversed(ms)), 30, 0)} == chosen  # whatever order given
    assert {m.id for m in sample(ms, 30, 1)} != chosen  # the seed decides it
    assert {m.file for m in ms if m.id in chosen} == {"pkg/a.py", "pkg/b.py"}
    # a new function in b.py: its mutants may enter the sample, but no mutant that stays is dropped for another one
    grown = find_mutants("pkg/a.py", source) + find_mutants("pkg/b.py", source + "def g(x):\n    return x * 2\n")
    again = {m.id for m in sample(grown, 30, 0)}
    new = {m.id for m in grown} - {m.id for m in ms}
    assert again - new <= chosen and len(chosen - again) == len(again & new)


def test_a_mutant_whose_tests_a_stop_killed_is_left_unjudged_for_resume_not_counted_as_killed(tmp_path):
    """Ctrl-C or `kill` kills the running tests (signal 9): that is not the mutant crashing them."""
    import queue

    from scripts.mutation.execute import KILLED, Result, Runner

    ms = [m for m in find_mutants("pkg/mod.py", "def f(x):\n    return x + 1\n\n\ndef g(x):\n    return x - 1\n")]
    runner = Runner([tmp_path], None, 3.0, 30.0, lambda msg: None, fork=False)

    def run_one(index, copy, m):  # the first mutant is judged; the stop comes while the second one runs
        if m is ms[1]:
            runner.stop.set()
        return Result(m, KILLED, killer="crash (signal 9) in t.py::t")

    runner.run_one = run_one
    work, judged = queue.Queue(), []
    for m in ms[:2]:
        work.put(m)
    runner._worker(0, tmp_path, work, judged.append)
    assert [r.mutant.id for r in judged] == [ms[0].id]


def test_the_test_server_forks_each_pytest_with_the_files_as_they_are_then(tmp_path):
    """The per-copy server imports torch and pytest once, never the project: each forked pytest imports the
    mutated file as it is when the mutant's run starts, and a run killed by its session ends with the signal."""
    import shutil
    import signal

    from scripts.mutation.execute import Server, session_cpu
    from scripts.mutation.tree import SERVER_NAME, forget_bytecode

    copy = tmp_path / "w0"
    copy.mkdir()
    shutil.copyfile(REPO / "scripts" / "mutation" / "server.py", copy / f"{SERVER_NAME}.py")
    (copy / "mod.py").write_text("X = 1\n")
    (copy / "test_m.py").write_text("import mod\n\n\ndef test_x():\n    assert mod.X == 1\n\n\n"
                                    "def test_spin():\n    while mod.X:\n        pass\n")
    args = ["-q", "-p", "no:cacheprovider", "test_m.py::test_x"]
    server = Server(copy)
    try:
        assert server.start(args, copy / "log").wait() == 0
        (copy / "mod.py").write_text("X = 2\n")
        forget_bytecode(copy, copy / "mod.py")
        assert server.start(args, copy / "log").wait() == 1  # the edit is seen: a mutant kills
        run = server.start(["-q", "-p", "no:cacheprovider", "test_m.py::test_spin"], copy / "log")
        while (session_cpu(run.pid) or 0) < 0.5 and run.poll() is None:
            time.sleep(0.1)
        os.killpg(run.pid, signal.SIGKILL)  # what a timeout does: the child leads its own session
        assert run.wait() == -signal.SIGKILL
        assert server.alive() and server.start(args, copy / "log").wait() == 1
    finally:
        server.close()
