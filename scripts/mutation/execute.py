"""Running mutants: each worker owns a copy of the project, writes one mutant into it, runs the tests that reach
the mutated line (fastest first, stopping at the first failure) and puts the original back."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from scripts.mutation.covmap import CoverageMap
from scripts.mutation.mutants import Mutant
from scripts.mutation.tree import PLUGIN_NAME, SERVER_NAME, forget_bytecode, worker_env

KILLED, TIMEOUT, SURVIVED, UNCOVERED, EQUIVALENT, ERROR = ("killed", "timeout", "survived", "no-tests",
                                                           "equivalent", "error")


@dataclass
class Result:
    mutant: Mutant
    status: str
    killer: Optional[str] = None       # the test that failed first (killed), or that was running (timeout)
    tests: int = 0                     # how many tests reach the mutant
    ran: int = 0                       # how many of them ran
    seconds: float = 0.0
    detail: str = ""
    reason: str = ""                   # equivalents: why
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, m: Mutant, d: dict) -> "Result":
        return cls(m, d["status"], killer=d.get("killer"), tests=d.get("tests", 0), ran=d.get("ran", 0),
                   seconds=d.get("seconds", 0.0), detail=d.get("detail", ""))

    def to_dict(self) -> dict:
        d = self.mutant.to_dict()
        d.update(status=self.status, killer=self.killer, tests=self.tests, ran=self.ran,
                 seconds=round(self.seconds, 2), detail=self.detail)
        if self.reason:
            d["reason"] = self.reason
        return d


class Runner:
    def __init__(self, copies: list[Path], cmap: CoverageMap, timeout_factor: float, timeout_base: float,
                 log: Callable[[str], None], test_budget: Optional[float] = None, fork: bool = True):
        self.copies, self.cmap, self.factor, self.base, self.log = copies, cmap, timeout_factor, timeout_base, log
        self.fork = fork  # start each mutant's pytest from a per-copy server that has imported torch once
        self.servers: dict[int, Optional[Server]] = {}
        self.budget = test_budget  # seconds of (normal) test time per mutant; None: every test that reaches it
        self.kills: dict = {}      # file, (file, function) -> {test: mutants it killed there}
        self.stop = threading.Event()
        self.procs: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def limits(self, tests: list[str]) -> tuple[float, float]:
        """(CPU seconds, wall seconds) a mutant's test run may take before it counts as timed out.  CPU time is
        the measure: an endless loop burns it, a machine loaded by others does not (its wall time can triple).
        The wall limit only catches a mutant that hangs without computing."""
        cpu = self.base + self.factor * self.cmap.cpu(tests)
        wall = max(4 * self.base, 10 * self.cmap.duration(tests) + 4 * self.base)
        return cpu, wall

    def test_limits(self, tests: list[str]) -> dict[str, float]:
        """Each test's own CPU limit: the factor times its normal CPU time plus the run's whole base: a test's
        mapped CPU can exclude lazy imports an earlier test of the map's process paid (0.16 s mapped, 10+ s when
        it runs first: a limit of base / 3 timed such tests out without any bug)."""
        return {n: round(self.base + self.factor * float(self.cmap.tests[n].get("cpu") or
                                                            self.cmap.tests[n]["duration"]), 2) for n in tests}

    def run_all(self, mutants: list[Mutant], on_result: Callable[[Result], None]) -> None:
        work: queue.Queue = queue.Queue()
        for m in mutants:
            work.put(m)
        threads = [threading.Thread(target=self._worker, args=(i, copy, work, on_result), daemon=True)
                   for i, copy in enumerate(self.copies)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            self.stop.set()
            self.kill_all()
            for t in threads:
                t.join(30)
            raise

    def kill_all(self) -> None:
        with self.lock:
            for proc in self.procs.values():
                _kill(proc)

    def close(self) -> None:
        """Stop the copies' test servers."""
        with self.lock:
            for server in self.servers.values():
                if server is not None:
                    server.close()
            self.servers.clear()

    def _server(self, index: int, copy: Path) -> Optional["Server"]:
        """The copy's test server, started on first use; None (plain subprocesses) where it cannot start."""
        if not self.fork:
            return None
        server = self.servers.get(index)
        if server is not None and not server.alive():
            server.close()
            del self.servers[index]
        if index not in self.servers:  # a copy whose server could not start keeps None: plain subprocesses
            try:
                self.servers[index] = Server(copy)
            except (OSError, RuntimeError) as exc:
                self.log(f"warning: the test server of copy {index} did not start ({exc}); starting pytest per "
                         "mutant instead")
                self.servers[index] = None
        return self.servers[index]
        return server

    def _worker(self, index: int, copy: Path, work: queue.Queue, on_result) -> None:
        while not self.stop.is_set():
            try:
                m = work.get_nowait()
            except queue.Empty:
                return
            try:
                result = self.run_one(index, copy, m)
            except Exception as exc:  # a tool failure on one mutant is reported, never silently dropped
                result = Result(m, ERROR, detail=f"{type(exc).__name__}: {exc}")
            if self.stop.is_set():  # its tests were killed by the stop (a "crash"), not by the mutant: not judged
                return
            if result.status == KILLED and result.killer and "::" in result.killer:
                with self.lock:
                    for key in (m.file, (m.file, m.function)):
                        counts = self.kills.setdefault(key, {})
                        counts[result.killer] = counts.get(result.killer, 0) + 1
            on_result(result)

    def run_one(self, index: int, copy: Path, m: Mutant) -> Result:
        with self.lock:
            kills = {k: dict(v) for k, v in self.kills.items() if k in (m.file, (m.file, m.function))}
        tests, reaching = select_tests(self.cmap, m, self.budget, kills)
        if not tests:
            return Result(m, UNCOVERED, detail="no test executes this line")
        path = copy / m.file
        original = path.read_text()
        mutated = m.apply(original)
        try:
            compile(mutated, m.file, "exec", dont_inherit=True)
        except SyntaxError as exc:
            return Result(m, ERROR, tests=len(tests), detail=f"the mutant does not compile (a bug of the tool): {exc}")
        result_file = copy / ".mutation-result.json"
        select_file = copy / ".mutation-select.json"
        select_file.write_text(json.dumps(tests))
        limits_file = copy / ".mutation-limits.json"
        limits_file.write_text(json.dumps(self.test_limits(tests)))
        result_file.unlink(missing_ok=True)
        files = list(dict.fromkeys(n.split("::")[0] for n in tests))
        args = [sys.executable, "-m", "pytest", "-x", "-q", "--no-header", "-p", "no:cacheprovider",
                "-p", PLUGIN_NAME, f"--mutation-select={select_file}", f"--mutation-result={result_file}",
                f"--mutation-limits={limits_file}", *files]
        cpu_limit, wall_limit = self.limits(tests)
        server = self._server(index, copy)  # started (imports done) before the mutant's clock starts
        t0 = time.time()
        _write(path, mutated)
        forget_bytecode(copy, path)
        log_file = copy / ".mutation-output.log"
        try:
            # output to a file, not a pipe: a grandchild that outlives a kill cannot hold the worker up
            with open(log_file, "wb") as log:
                proc = None
                if server is not None:
                    try:
                        proc = server.start(args[3:], log_file)
                    except (OSError, RuntimeError):
                        server.close()  # a server that broke is restarted for the next mutant
                        proc = None
                if proc is None:
                    proc = subprocess.Popen(args, cwd=copy, env=worker_env(copy), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                with self.lock:
                    self.procs[index] = proc
                timed_out = ""
                try:
                    while proc.poll() is None:
                        time.sleep(0.5)
                        used = session_cpu(proc.pid)
                        if used is not None and used > cpu_limit:
                            timed_out = (f"used {used:.0f} s of CPU, over its limit of {cpu_limit:.0f} s (these "
                                         f"tests use {self.cmap.cpu(tests):.1f} s without the mutant)")
                        elif time.time() - t0 > wall_limit:
                            timed_out = (f"still running after {wall_limit:.0f} s (these tests take "
                                         f"{self.cmap.duration(tests):.1f} s without the mutant)")
                        if timed_out:
                            _kill(proc)
                            proc.wait()
                            break
                finally:
                    with self.lock:
                        self.procs.pop(index, None)
        finally:
            _write(path, original)
            forget_bytecode(copy, path)
        seconds = time.time() - t0
        info = _read_json(result_file)
        tail = log_file.read_bytes()[-3000:].decode(errors="replace") if log_file.exists() else ""
        r = _judge(m, proc.returncode, timed_out, info, tests, seconds, tail)
        if len(tests) < reaching:
            r.tests = reaching
            if r.status == SURVIVED:
                r.detail = (f"only the {len(tests)} fastest of the {reaching} tests that reach it ran "
                            f"(--test-budget {self.budget:g} s): rerun with --id {m.id} --test-budget 0")
        return r


def select_tests(cmap: CoverageMap, m: Mutant, budget: Optional[float],
                 kills: Optional[dict] = None) -> tuple[list[str], int]:
    """(the tests to run; how many tests reach the mutant).  Fastest first, except that tests which already
    killed mutants of the same function, then of the same file, go first (`kills`: {function or file: {test:
    count}}): the kill comes sooner, and within a budget it comes at all.  With a budget: the longest prefix
    whose normal durations fit in it, and at least one test."""
    tests = cmap.tests_for(m.file, *m.cover_lines)
    if kills:
        in_function = kills.get((m.file, m.function), {})
        in_file = kills.get(m.file, {})
        tests.sort(key=lambda n: (-in_function.get(n, 0), -in_file.get(n, 0)))  # stable: fastest first otherwise
    if not budget:
        return tests, len(tests)
    spent, keep = 0.0, []
    for n in tests:
        spent += cmap.tests[n]["duration"]
        if keep and spent > budget:
            break
        keep.append(n)
    return keep, len(tests)


def _judge(m: Mutant, rc: int, timed_out: str, info: dict, tests: list[str], seconds: float, tail: str) -> Result:
    ran = int(info.get("ran", 0))
    r = Result(m, ERROR, tests=len(tests), ran=ran, seconds=seconds)
    if timed_out:
        r.status, r.killer, r.detail = TIMEOUT, info.get("current"), timed_out
        return r
    if rc == 124 and info.get("timed_out"):
        r.status, r.killer = TIMEOUT, info["timed_out"]
        r.detail = "the test used more than its own CPU limit (the factor times its normal CPU + the base)"
        return r
    if rc == 1 and info.get("first_failure"):
        r.status, r.killer = KILLED, info["first_failure"]
        return r
    if info.get("collect_errors") and rc in (1, 2):
        r.status, r.killer = KILLED, "collection error: " + ", ".join(info["collect_errors"])
        return r
    if rc == 0:
        r.status = SURVIVED
        if info.get("missing"):
            r.detail = f"{len(info['missing'])} of the mapped tests no longer exist: {info['missing'][:3]}"
        return r
    if rc < 0:  # the test process died (a segfault, an abort): the mutant broke something the tests ran
        r.status, r.killer = KILLED, f"crash (signal {-rc}) in {info.get('current') or 'start-up'}"
        return r
    r.detail = f"pytest exit code {rc}: {tail[-600:]}"
    return r


def verify_killers(copy: Path, results: list[Result], log: Callable[[str], None]) -> None:
    """Run every test that killed a mutant once on the unmutated copy: a test that fails there too proves nothing,
    so its mutants become errors.  Catches order-dependent and flaky tests."""
    killers = sorted({r.killer for r in results if r.status == KILLED and r.killer and "::" in r.killer
                      and not r.killer.startswith(("collection error", "crash"))})
    if not killers:
        return
    select_file, result_file = copy / ".mutation-select.json", copy / ".mutation-result.json"
    select_file.write_text(json.dumps(killers))
    result_file.unlink(missing_ok=True)
    files = list(dict.fromkeys(n.split("::")[0] for n in killers))
    args = [sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider", "-p", PLUGIN_NAME,
            f"--mutation-select={select_file}", f"--mutation-result={result_file}", *files]
    log(f"checking the {len(killers)} tests that killed mutants on the unmutated code")
    subprocess.run(args, cwd=copy, env=worker_env(copy), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    info = _read_json(result_file)
    bad = set(info.get("failures", [])) | set(info.get("missing", []))
    if not info:
        bad = set(killers)
    for r in results:
        if r.status == KILLED and r.killer in bad:
            r.status = ERROR
            r.detail = f"{r.killer} fails (or is missing) without the mutant too: the kill proves nothing"
    if bad:
        log(f"warning: {len(bad)} killing tests fail without any mutant: {sorted(bad)[:5]}")


class Server:
    """The copy's test server (server.py): a Python process that has imported torch and pytest once and forks a
    fresh pytest per mutant.  A child leads its own session, so CPU limits and kills work as for a subprocess."""

    def __init__(self, copy: Path, start_timeout: float = 600.0):
        self.proc = subprocess.Popen([sys.executable, "-m", SERVER_NAME], cwd=copy, env=worker_env(copy),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.buf = b""
        line = self.readline(start_timeout)
        if not line or not json.loads(line).get("ready"):
            self.close()
            raise RuntimeError("no ready line")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def readline(self, timeout: Optional[float]) -> Optional[str]:
        """The next line from the server; None when none came within `timeout` seconds (None: wait).
        RuntimeError when the server is gone."""
        import select

        deadline = None if timeout is None else time.time() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = None if deadline is None else max(0.0, deadline - time.time())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the test server exited")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def start(self, args: list[str], log: Path) -> "ForkedRun":
        self.proc.stdin.write((json.dumps({"args": args, "log": str(log)}) + "\n").encode())
        self.proc.stdin.flush()
        line = self.readline(120)
        if line is None:
            raise RuntimeError("the test server did not fork")
        return ForkedRun(self, int(json.loads(line)["pid"]))

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


class ForkedRun:
    """A pytest run forked by a Server, with the part of subprocess.Popen's interface run_one uses."""

    def __init__(self, server: Server, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self._read(0)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            self._read(None)
        return self.returncode

    def _read(self, timeout: Optional[float]) -> None:
        try:
            line = self.server.readline(timeout)
        except RuntimeError:
            self.returncode = -signal.SIGKILL  # the server died with the child
            return
        if line is not None:
            self.returncode = int(json.loads(line)["rc"])


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def session_cpu(sid: int) -> Optional[float]:
    """CPU seconds of every process in session `sid` (the test run and whatever it started), counting the
    children each has reaped; None where /proc is not available (then only the wall limit applies)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    total = 0
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 14 and int(fields[3]) == sid:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / _TICK


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".mutation-tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
