"""Which tests reach which line: one instrumented run of the fast suite (coverage.py, one context per test),
cached under the content hash of the project's files and rebuilt when stale.

A stale map is rebuilt incrementally when it can be: only the tests that reached a changed source file, and the
tests in changed test files, run again; everything else keeps its lines.  A changed conftest.py, pyproject.toml or
setup file, or a change that reaches more than half the suite, rebuilds the whole map.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from scripts.mutation.config import Config, ToolError
from scripts.mutation.tree import PLUGIN_NAME, worker_env

MAP_VERSION = 2  # 2: each test's CPU seconds
GLOBAL_FILES = ("conftest.py", "pyproject.toml", "setup.py", "setup.cfg", "pytest.ini", "tox.ini")
KEEP_MAPS = 30


@dataclass
class CoverageMap:
    key: str
    commit: str
    files: dict[str, str]                           # path -> content sha1 the map was built from
    tests: dict[str, dict]                          # node id -> {"duration", "cpu", "outcome"}
    lines: dict[str, dict[int, list[str]]]          # path -> line -> node ids that executed it
    import_lines: dict[str, set[int]] = field(default_factory=dict)  # lines run outside any test (imports)
    built: dict = field(default_factory=dict)       # how it was built: full/incremental, tests run, seconds

    def usable(self, nodeid: str) -> bool:
        t = self.tests.get(nodeid)
        return t is not None and t["outcome"] == "passed"

    def file_tests(self, path: str) -> set[str]:
        return {n for ids in self.lines.get(path, {}).values() for n in ids}

    def tests_for(self, path: str, first: int, last: int) -> list[str]:
        """Passing tests that executed any of the lines, fastest first.  A line run only while modules were
        imported (a default value, a module constant) is reached by every test that uses the file."""
        per_line = self.lines.get(path, {})
        found: set[str] = set()
        for n in range(first, last + 1):
            found.update(per_line.get(n, ()))
        if any(n in self.import_lines.get(path, ()) for n in range(first, last + 1)):
            found |= self.file_tests(path)
        return sorted((n for n in found if self.usable(n)), key=lambda n: (self.tests[n]["duration"], n))

    def duration(self, nodeids: list[str]) -> float:
        return sum(self.tests[n]["duration"] for n in nodeids)

    def cpu(self, nodeids: list[str]) -> float:
        return sum(self.tests[n].get("cpu", self.tests[n]["duration"]) for n in nodeids)

    # -- storage -----------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        names = sorted(self.tests)
        index = {n: i for i, n in enumerate(names)}
        return {"version": MAP_VERSION, "key": self.key, "commit": self.commit, "files": self.files,
                "built": self.built, "tests": [[n, round(self.tests[n]["duration"], 4), self.tests[n]["outcome"],
                                                round(self.tests[n].get("cpu", self.tests[n]["duration"]), 3)]
                                               for n in names],
                "lines": {p: {str(line): sorted(index[n] for n in ids if n in index) for line, ids in per.items()}
                          for p, per in self.lines.items()},
                "import_lines": {p: sorted(v) for p, v in self.import_lines.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "CoverageMap":
        names = [t[0] for t in d["tests"]]
        return cls(key=d["key"], commit=d["commit"], files=d["files"],
                   tests={t[0]: {"duration": t[1], "outcome": t[2], "cpu": t[3]} for t in d["tests"]},
                   lines={p: {int(line): [names[i] for i in ids] for line, ids in per.items()}
                          for p, per in d["lines"].items()},
                   import_lines={p: set(v) for p, v in d["import_lines"].items()}, built=d.get("built", {}))


def project_id(cfg: Config) -> str:
    ident = json.dumps([cfg.name, cfg.tests, cfg.pytest_args, sorted(cfg.packages.items()), MAP_VERSION])
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


def _cache_dir(cfg: Config) -> Path:
    return cfg.cache / project_id(cfg)


def _save(cfg: Config, cmap: CoverageMap) -> Path:
    folder = _cache_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"map-{cmap.key}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cmap.to_json()))
    os.replace(tmp, path)
    maps = sorted(folder.glob("map-*.json"), key=lambda p: p.stat().st_mtime)
    for old in maps[:-KEEP_MAPS]:
        old.unlink(missing_ok=True)
    return path


def _load(path: Path) -> Optional[CoverageMap]:
    try:
        d = json.loads(path.read_text())
        return CoverageMap.from_json(d) if d.get("version") == MAP_VERSION else None
    except (OSError, ValueError, KeyError, IndexError):
        return None


def test_files(cfg: Config, copy: Path) -> list[str]:
    out = set()
    for t in cfg.tests:
        p = copy / t
        if p.is_file():
            out.add(t)
        for pattern in ("test_*.py", "*_test.py"):
            out.update(str(q.relative_to(copy)) for q in p.rglob(pattern) if "__pycache__" not in q.parts)
    return sorted(out)


def _in_tests(cfg: Config, path: str) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in cfg.tests)


def _in_packages(cfg: Config, path: str) -> bool:
    return any(path.startswith(folder.rstrip("/") + "/") for folder in cfg.packages.values())


def get_map(cfg: Config, copy: Path, key: str, hashes: dict[str, str], commit: str, jobs: int,
            rebuild: bool, log: Callable[[str], None]) -> CoverageMap:
    folder = _cache_dir(cfg)
    exact = folder / f"map-{key}.json"
    if not rebuild and exact.exists():
        cmap = _load(exact)
        if cmap is not None:
            log(f"coverage map: cached ({exact})")
            return cmap
    base = None if rebuild else _closest(folder, hashes)
    t0 = time.time()
    if base is not None:
        plan = _incremental_plan(cfg, copy, base, hashes)
        if plan is not None:
            rerun, modules = plan
            log(f"coverage map: stale; rebuilding for {len(rerun)} tests and {len(modules)} changed test files "
                f"(from map {base.key})")
            cmap = _incremental(cfg, copy, base, key, hashes, commit, rerun, modules, jobs, log)
            cmap.built.update(seconds=round(time.time() - t0, 1))
            log(f"coverage map: built in {time.time() - t0:.0f} s -> {_save(cfg, cmap)}")
            return cmap
    files = test_files(cfg, copy)
    log(f"coverage map: running {len(files)} test files with coverage ({jobs} processes); this is the slow step, "
        "done once per content of the project")
    tests, lines, imports, errors = run_instrumented(cfg, copy, files, None, jobs, base, log)
    cmap = CoverageMap(key, commit, hashes, tests, lines, imports,
                       {"mode": "full", "tests": len(tests), "collect_errors": errors})
    cmap.built.update(seconds=round(time.time() - t0, 1))
    log(f"coverage map: built in {time.time() - t0:.0f} s -> {_save(cfg, cmap)}")
    return cmap


def _closest(folder: Path, hashes: dict[str, str]) -> Optional[CoverageMap]:
    best, best_diff = None, None
    for path in sorted(folder.glob("map-*.json"), key=lambda p: -p.stat().st_mtime)[:10]:
        cmap = _load(path)
        if cmap is None:
            continue
        diff = sum(cmap.files.get(p) != h for p, h in hashes.items()) + sum(p not in hashes for p in cmap.files)
        if best_diff is None or diff < best_diff:
            best, best_diff = cmap, diff
    return best


def _incremental_plan(cfg: Config, copy: Path, base: CoverageMap, hashes: dict[str, str]):
    changed = {p for p, h in hashes.items() if base.files.get(p) != h} | {p for p in base.files if p not in hashes}
    if any(Path(p).name in GLOBAL_FILES for p in changed):
        return None
    modules, helpers, sources = set(), set(), set()
    for p in changed:
        if not p.endswith(".py"):
            continue
        if _in_tests(cfg, p):
            name = Path(p).name
            (modules if name.startswith("test_") or name.endswith("_test.py") else helpers).add(p)
        elif _in_packages(cfg, p):
            sources.add(p)
    all_modules = test_files(cfg, copy)
    for h in helpers:  # a changed test helper: every test file that names it runs again
        stem = Path(h).stem
        modules.update(m for m in all_modules if stem in (copy / m).read_text(errors="replace"))
    modules = {m for m in modules if (copy / m).exists()}
    rerun = set()
    for s in sources:
        rerun |= base.file_tests(s)
    rerun = {n for n in rerun if n.split("::")[0] not in modules and (copy / n.split("::")[0]).exists()}
    if len(rerun) + sum(1 for n in base.tests if n.split("::")[0] in modules) > 0.5 * max(1, len(base.tests)):
        return None
    return rerun, modules


def _incremental(cfg, copy, base, key, hashes, commit, rerun, modules, jobs, log) -> CoverageMap:
    selection = sorted(rerun, key=lambda n: -base.tests[n]["duration"])
    tests, lines, imports, errors = run_instrumented(cfg, copy, sorted(modules), selection, jobs, base, log)
    changed_src = {p for p, h in hashes.items() if base.files.get(p) != h}
    gone = set(rerun) | {n for n in base.tests if n.split("::")[0] in modules or
                         not (copy / n.split("::")[0]).exists()}
    merged_tests = {n: t for n, t in base.tests.items() if n not in gone}
    merged_tests.update(tests)
    merged_lines: dict[str, dict[int, list[str]]] = {}
    for p, per in base.lines.items():
        if p in changed_src or p not in hashes:
            continue
        merged_lines[p] = {line: [n for n in ids if n not in gone] for line, ids in per.items()}
    for p, per in lines.items():
        target = merged_lines.setdefault(p, {})
        for line, ids in per.items():
            target[line] = sorted(set(target.get(line, [])) | set(ids))
    merged_imports = {p: set(v) for p, v in base.import_lines.items() if p not in changed_src and p in hashes}
    for p, v in imports.items():
        merged_imports.setdefault(p, set()).update(v)
    return CoverageMap(key, commit, hashes, merged_tests, merged_lines, merged_imports,
                       {"mode": "incremental", "from": base.key, "tests_rerun": len(tests),
                        "collect_errors": errors})


def package_modules(cfg: Config, copy: Path) -> list[str]:
    """The import names of every module of the configured packages (`__main__` excepted: importing it runs it)."""
    names = []
    for pkg, folder in sorted(cfg.packages.items()):
        base = copy / folder
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("").parts
            if rel[-1] == "__main__":
                continue
            if rel[-1] == "__init__":
                rel = rel[:-1]
            names.append(".".join((pkg, *rel)))
    return list(dict.fromkeys(names))


def run_instrumented(cfg: Config, copy: Path, modules: list[str], selection: Optional[list[str]], jobs: int,
                     previous: Optional[CoverageMap], log: Callable[[str], None]):
    """Run test `modules` (whole) and the `selection` of node ids with coverage, in `jobs` processes.
    Returns (tests, lines, import_lines, collection errors)."""
    out_dir = copy / ".mutation-map"
    if out_dir.exists():
        for f in out_dir.iterdir():
            f.unlink()
    out_dir.mkdir(exist_ok=True)
    include = [str(copy / folder) + os.sep + "*" for folder in sorted(set(cfg.packages.values()))]
    # units of work: whole modules, and the selected tests grouped by module; balanced by expected duration
    units: list[tuple[float, list[str], list[str]]] = []
    for m in modules:
        expected = sum(t["duration"] for n, t in (previous.tests.items() if previous else []) if n.startswith(m + "::"))
        units.append((expected or (copy / m).stat().st_size / 2000, [m], []))
    by_module: dict[str, list[str]] = {}
    for n in selection or []:
        by_module.setdefault(n.split("::")[0], []).append(n)
    for m, ids in by_module.items():
        units.append((sum(previous.tests[n]["duration"] for n in ids) if previous else len(ids), [], ids))
    shards: list[list] = [[0.0, [], []] for _ in range(max(1, min(jobs, len(units))))]
    for expected, mods, ids in sorted(units, key=lambda u: -u[0]):
        s = min(shards, key=lambda s: s[0])
        s[0] += expected
        s[1] += mods
        s[2] += ids
    preimport = out_dir / "preimport.json"
    preimport.write_text(json.dumps(package_modules(cfg, copy)))
    procs = []
    env = worker_env(copy)
    for i, (_, mods, ids) in enumerate(shards):
        if not mods and not ids:
            continue
        out = out_dir / f"shard{i}.json"
        args = [sys.executable, "-m", "pytest", *cfg.pytest_args, "-q", "--no-header", "-p", "no:cacheprovider",
                "-p", PLUGIN_NAME, f"--mutation-map-out={out}", f"--mutation-preimport={preimport}",
                *(f"--mutation-cov-include={p}" for p in include)]
        if ids:  # a selection; a bare file path in it keeps every test of that file
            sel = out_dir / f"shard{i}.select.json"
            sel.write_text(json.dumps(mods + ids))
            args.append(f"--mutation-select={sel}")
        files = list(dict.fromkeys(mods + [n.split("::")[0] for n in ids]))
        log_path = out_dir / f"shard{i}.log"
        procs.append((out, log_path, subprocess.Popen(args + files, cwd=copy, env=env, stdout=open(log_path, "w"),
                                                      stderr=subprocess.STDOUT)))
    tests: dict[str, dict] = {}
    errors: list[str] = []
    for out, log_path, proc in procs:
        rc = proc.wait()
        if not out.exists():
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ToolError(f"the coverage run crashed (exit code {rc}); its output ends with:\n{tail}")
        d = json.loads(out.read_text())
        tests.update(d["tests"])
        errors += d["collect_errors"]
    failed = sorted(n for n, t in tests.items() if t["outcome"] == "failed")
    if failed:
        log(f"warning: {len(failed)} tests fail without any mutant and are never used to judge one: "
            + ", ".join(failed[:5]) + (" ..." if len(failed) > 5 else ""))
    if errors:
        log(f"warning: collection errors without any mutant (these tests are missing from the map): {errors}")
    lines, imports = _read_coverage(copy, out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)  # the copies for the other workers are cloned from this one
    return tests, lines, imports, errors


def _read_coverage(copy: Path, out_dir: Path):
    import coverage

    lines: dict[str, dict[int, set[str]]] = {}
    imports: dict[str, set[int]] = {}
    prefix = str(copy) + os.sep
    for data_file in sorted(glob.glob(str(out_dir / "*.cov*"))):
        data = coverage.CoverageData(basename=data_file)
        data.read()
        for measured in data.measured_files():
            if not measured.startswith(prefix):
                continue
            rel = Path(measured[len(prefix):]).as_posix()
            for line, contexts in data.contexts_by_lineno(measured).items():
                for ctx in contexts:
                    if ctx:
                        lines.setdefault(rel, {}).setdefault(line, set()).add(ctx)
                    else:
                        imports.setdefault(rel, set()).add(line)
    return {p: {line: sorted(ids) for line, ids in per.items()} for p, per in lines.items()}, imports
