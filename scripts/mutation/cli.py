"""python -m scripts.mutation: mutation testing of grownfx (see docs/testing.md, "Mutation testing")."""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from scripts.mutation import report as rpt
from scripts.mutation.config import Config, ToolError, load_config, parse_target
from scripts.mutation.mutants import OPERATORS, Mutant, find_mutants

EXIT_FAIL_UNDER, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.mutation",
        description="Mutation testing: plant one small bug at a time in the targets and check that a test fails. "
                    "Targets, tests and defaults: [tool.grownfx.mutation] in pyproject.toml.")
    p.add_argument("--changed", nargs="?", const="main", metavar="BASE",
                   help="mutate only the lines changed since the merge-base of BASE (default main) and HEAD, "
                        "uncommitted edits and new files included; looks in the packages, not only the targets")
    p.add_argument("--files", nargs="+", metavar="PATH",
                   help="mutate these files, folders or globs (PATH::Qualified.name for one function) instead of "
                        "the configured targets")
    p.add_argument("--sample", type=int, metavar="N", help="run a deterministic sample of N mutants")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    p.add_argument("--id", action="append", metavar="ID", help="only this mutant (repeatable)")
    p.add_argument("--operators", metavar="OP,OP", help=f"only these operators ({', '.join(OPERATORS)})")
    p.add_argument("--list", action="store_true", help="show the mutants and exit without running anything")
    p.add_argument("-j", "--jobs", type=int, help="parallel workers (default: config, 2)")
    p.add_argument("--fail-under", type=float, metavar="PCT", help="exit 1 when the score is below PCT percent")
    p.add_argument("--report", metavar="PATH", help="write PATH.md and PATH.json (default .mutation/reports/...)")
    p.add_argument("--timeout-factor", type=float, help="a mutant's tests may use this many times their "
                   "normal CPU time (default 3) ...")
    p.add_argument("--timeout-base", type=float, help="... plus this many CPU seconds (default 30)")
    p.add_argument("--test-budget", type=float, metavar="SECONDS",
                   help="run only the fastest tests reaching a mutant, up to SECONDS of their normal duration "
                        "(default: none; with --changed the config's changed_test_budget, 180); 0: no limit. "
                        "A survivor that did not run every test says so")
    p.add_argument("--equivalents", metavar="FILE", help="the equivalents file (default from the config)")
    p.add_argument("--check-equivalents", action="store_true",
                   help="run the equivalent mutants too, and report any that a test kills")
    p.add_argument("--rebuild-map", action="store_true", help="rebuild the coverage map from scratch")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where coverage maps are kept (default ~/.cache/grownfx/mutation)")
    p.add_argument("--tests", nargs="+", metavar="PATH", help="a focused run: map and run only these test files or "
                   "folders instead of the configured suite (its own cached map; the report says so)")
    p.add_argument("--no-fork", action="store_true", help="start a fresh Python per mutant instead of forking "
                   "it from a per-copy process that has imported torch and pytest once")
    p.add_argument("--keep-workdirs", action="store_true", help="keep the project copies under .mutation/work")
    p.add_argument("--resume", metavar="PARTIAL", help="reuse the verdicts in PARTIAL (the .partial.jsonl an "
                   "interrupted run leaves next to its report) and run only the rest")
    p.add_argument("--root", metavar="DIR", help="the project (default: the git work tree around the current folder)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        return _main(args, argv)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _log(msg: str) -> None:
    print(msg, flush=True)


def _root(args) -> Path:
    if args.root:
        root = Path(args.root).resolve()
        if not root.is_dir():
            raise ToolError(f"--root {args.root}: no such folder")
        return root
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolError("not inside a git work tree; run from the project or pass --root")
    return Path(proc.stdout.strip())


def _configure(args) -> Config:
    cfg = load_config(_root(args))
    if args.jobs is not None:
        if args.jobs < 1:
            raise ToolError("-j must be at least 1")
        cfg.jobs = args.jobs
    for name in ("timeout_factor", "timeout_base", "equivalents", "cache_dir"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.tests:
        root = _root(args)
        missing = [t for t in args.tests if not (root / t).exists()]
        if missing:
            raise ToolError(f"--tests: no such file or folder: {', '.join(missing)}")
        cfg.tests = sorted(args.tests)
    if args.operators:
        ops = [o.strip() for o in args.operators.split(",") if o.strip()]
        bad = [o for o in ops if o not in OPERATORS]
        if bad:
            raise ToolError(f"--operators: unknown {', '.join(bad)} (known: {', '.join(OPERATORS)})")
        cfg.operators = ops
    if args.sample is not None and args.sample < 1:
        raise ToolError("--sample must be at least 1")
    return cfg


def _expand(root: Path, specs: list[str], where: str) -> list[tuple[str, Optional[str]]]:
    """[(file, qualified name or None)] of Python files named by paths, folders or globs."""
    out = []
    for spec in specs:
        path, qual = parse_target(spec)
        p = root / path
        if p.is_file():
            matches = [p]
        elif p.is_dir():
            matches = sorted(q for q in p.rglob("*.py") if "__pycache__" not in q.parts)
        else:
            matches = sorted(q for q in root.glob(path) if q.suffix == ".py")
        if not matches:
            raise ToolError(f"{where}: {spec!r} names no Python file under {root}")
        out += [(q.relative_to(root).as_posix(), qual) for q in matches]
    return out


def _in_scope(path: str, qual: Optional[str], m: Mutant) -> bool:
    return qual is None or m.function == qual or m.function.startswith(qual + ".")


def select(cfg: Config, args, source_root: Path):
    """(chosen mutants, every mutant of the scanned files, a description of the choice, changed-lines info)."""
    changed_info = None
    if args.files:
        specs = _expand(cfg.root, args.files, "--files")
    elif args.changed:
        specs = []
    else:
        if not cfg.targets:
            raise ToolError("no targets: set [tool.grownfx.mutation] targets in pyproject.toml or pass --files")
        specs = _expand(cfg.root, cfg.targets, "[tool.grownfx.mutation] targets")
    lines_filter = None
    if args.changed:
        from scripts.mutation.tree import changed_lines

        mb, lines_filter = changed_lines(cfg.root, args.changed)
        scoped = [p for p in lines_filter if p.endswith(".py") and (cfg.root / p).is_file()
                  and any(p.startswith(s.rstrip("/") + "/") or fnmatch.fnmatch(p, s) for s in cfg.changed_scope)]
        if args.files:
            specs = [(f, q) for f, q in specs if f in lines_filter]
        else:
            specs = [(p, None) for p in sorted(scoped)]
        changed_info = {"base": args.changed, "merge_base": mb, "files": sorted(f for f, _ in specs)}
    by_file: dict[str, list[Optional[str]]] = {}
    for f, q in specs:
        by_file.setdefault(f, []).append(q)
    everything: list[Mutant] = []
    chosen: list[Mutant] = []
    for f, quals in sorted(by_file.items()):
        text = (source_root / f).read_text()
        try:
            found = find_mutants(f, text, set(cfg.operators))
        except SyntaxError as exc:
            raise ToolError(f"{f}:{exc.lineno}: cannot parse ({exc.msg})") from None
        everything += found
        for m in found:
            if not any(_in_scope(f, q, m) for q in quals):
                continue
            if lines_filter is not None and not set(range(m.line, m.end_line + 1)) & lines_filter.get(f, set()):
                continue
            chosen.append(m)
    if args.id:
        wanted = set(args.id)
        chosen = [m for m in everything if m.id in wanted]
        missing = wanted - {m.id for m in chosen}
        if missing:
            raise ToolError(f"--id: no mutant {', '.join(sorted(missing))} in the scanned files "
                            "(pass --files with the mutant's file if it is outside the targets)")
    generated = len(chosen)
    what = (f"lines changed since {args.changed}" if args.changed else
            "--files " + " ".join(args.files) if args.files else "the configured targets")
    desc = f"{generated} mutants in {len({m.file for m in chosen})} files ({what})"
    if args.sample is not None and args.sample < len(chosen):
        chosen = sample(chosen, args.sample, args.seed)
        desc = f"a seeded sample (--sample {args.sample} --seed {args.seed}) of the " + desc
    chosen.sort(key=lambda m: (m.file, m.line, m.operator, m.id))
    return chosen, everything, desc, changed_info, generated


def sample(mutants: list[Mutant], n: int, seed: int) -> list[Mutant]:
    """The n mutants whose hash of (seed, id) is smallest: a uniform random sample that stays the same sample when
    code elsewhere changes (a mutant's id does not move with its line), so a run can be judged again after new
    tests or a refactoring and only the mutants of the edited statements come and go."""
    return sorted(mutants, key=lambda m: (hashlib.sha1(f"{seed}|{m.id}".encode()).digest(), m.id))[:n]


def judging_order(todo: list[Mutant], seed: int) -> list[Mutant]:
    """A sampled run judges its mutants in a seeded random order, not file by file: the verdicts of a run stopped
    early (its .partial.jsonl) are then still a random sample of the whole, not of the first files."""
    out = sorted(todo, key=lambda m: m.id)
    random.Random(f"order-{seed}").shuffle(out)
    return out


def _stale(equivalents: dict[str, dict], everything: list[Mutant], scanned: set[str], root: Path) -> list[dict]:
    ids = {m.id for m in everything}
    return [e for e in equivalents.values()
            if e["id"] not in ids and (e["file"] in scanned or not (root / e["file"]).exists())]


def _list(chosen: list[Mutant], equivalents: dict, stale: list[dict], desc: str) -> int:
    for m in chosen:
        mark = "  [equivalent]" if m.id in equivalents else ""
        print(f"{m.id}  {m.describe()}{mark}")
    if len(chosen) <= 5:
        for m in chosen:
            print(f"\n--- {m.file}:{m.line}  ({m.id}, {m.operator}, in {m.function})")
            print("".join("- " + line for line in m.original.splitlines(keepends=True)), end="")
            print("".join("+ " + line for line in m.mutated.splitlines(keepends=True)), end="")
    by_op: dict[str, int] = {}
    for m in chosen:
        by_op[m.operator] = by_op.get(m.operator, 0) + 1
    print(f"\n{desc}; by operator: " + ", ".join(f"{k} {v}" for k, v in sorted(by_op.items())))
    for e in stale:
        print(f"stale equivalent: {e['id']} ({e['file']}): matches no mutant any more")
    return 0


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def _main(args, argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _sigterm)  # kill PID stops like Ctrl-C: workers killed, report written
    cfg = _configure(args)
    equivalents = rpt.load_equivalents(cfg.root / cfg.equivalents)
    if args.list:
        chosen, everything, desc, _, _ = select(cfg, args, cfg.root)
        scanned = {m.file for m in everything}
        return _list(chosen, equivalents, _stale(equivalents, everything, scanned, cfg.root), desc)
    try:
        import coverage  # noqa: F401
    except ImportError:
        raise ToolError("coverage is not installed (it is in the dev extra): pip install 'coverage>=7.4'") from None
    from scripts.mutation import execute as ex
    from scripts.mutation import tree
    from scripts.mutation.covmap import get_map

    t_start = time.time()
    started = dt.datetime.now().astimezone()
    work = cfg.work / "work" / f"run-{os.getpid()}"
    _clean_stale_workdirs(cfg.work / "work")
    copies = [work / f"w{i}" for i in range(cfg.jobs)]
    try:
        files = tree.project_files(cfg.root)
        commit = tree.head_commit(cfg.root)
        dirty = bool(tree.git(cfg.root, "status", "--porcelain", "--untracked-files=normal").strip())
        hashes = tree.copy_project(cfg.root, files, copies[0])  # the snapshot: nothing below reads the dev tree
        tree.install_boot(copies[0], cfg.packages)
        _check_redirection(cfg, copies[0])
        chosen, everything, desc, changed_info, generated = select(cfg, args, copies[0])
        scanned = {m.file for m in everything}
        stale = _stale(equivalents, everything, scanned, cfg.root)
        _log(f"{desc}; {len(equivalents)} recorded equivalents")
        tree.normalize_pyproject(copies[0], hashes)
        key, kept = tree.content_key(hashes, cfg.hash_exclude)
        base = Path(args.report) if args.report else cfg.work / "reports" / started.strftime("%Y%m%d-%H%M%S")
        if base.suffix in (".md", ".json"):
            base = base.with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        partial = base.with_name(base.name + ".partial.jsonl")  # one line per judged mutant: --resume reads it
        results: list[ex.Result] = []
        todo = []
        earlier = _load_partial(Path(args.resume)) if args.resume else {}
        for m in chosen:
            e = equivalents.get(m.id)
            if e is not None and not args.check_equivalents:
                results.append(ex.Result(m, ex.EQUIVALENT, reason=e["reason"]))
            elif m.id in earlier:
                results.append(ex.Result.from_dict(m, earlier[m.id]))
            else:
                todo.append(m)
        if args.sample is not None:
            todo = judging_order(todo, args.seed)
        with open(partial, "w") as f:  # a fresh partial file, holding the verdicts it resumes from first
            for r in results:
                if r.status != ex.EQUIVALENT:
                    f.write(json.dumps(r.to_dict()) + "\n")
        if earlier:
            _log(f"--resume: {len(chosen) - len(todo) - sum(r.status == ex.EQUIVALENT for r in results)} mutants "
                 f"judged by the earlier run, {len(todo)} to go")
        cmap = None
        if todo:
            cmap = get_map(cfg, copies[0], key, kept, commit, cfg.jobs, args.rebuild_map, _log)
            for c in copies[1:]:
                tree.clone_copy(copies[0], c)
        meta = {"tool": "python -m scripts.mutation", "command": "python -m scripts.mutation " + shlex.join(argv),
                "root": str(cfg.root), "commit": commit, "dirty": dirty, "started": started.isoformat(),
                "jobs": cfg.jobs, "selection": desc, "sampled": args.sample is not None and args.sample < generated,
                "generated": generated, "planned": len(chosen), "changed": changed_info,
                "map": (f"{cmap.key} ({cmap.built.get('mode', '?')}, {len(cmap.tests)} tests)" if cmap
                        else "not needed"),
                "timeout": {"factor": cfg.timeout_factor, "base_s": cfg.timeout_base},
                "test_budget_s": (args.test_budget if args.test_budget is not None else
                                  cfg.changed_test_budget if args.changed and not args.id else None) or None}
        interrupted = False
        if todo:
            budget = args.test_budget if args.test_budget is not None else (
                cfg.changed_test_budget if args.changed and not args.id else None)
            runner = ex.Runner(copies, cmap, cfg.timeout_factor, cfg.timeout_base, _log, budget or None,
                               fork=not args.no_fork)
            for r in results:  # resumed kills order the tests of the mutants still to run
                if r.status == ex.KILLED and r.killer and "::" in r.killer:
                    for k in (r.mutant.file, (r.mutant.file, r.mutant.function)):
                        runner.kills.setdefault(k, {})[r.killer] = runner.kills.get(k, {}).get(r.killer, 0) + 1
            done = [0]
            t_run = time.time()

            def on_result(r: ex.Result) -> None:
                e = equivalents.get(r.mutant.id)
                if e is not None:  # --check-equivalents: a kill means it was never equivalent
                    if r.status in (ex.KILLED, ex.TIMEOUT):
                        r.detail = f"listed as equivalent but {r.status} by {r.killer}: remove its entry"
                        r.status = ex.ERROR
                    else:
                        r.status, r.reason = ex.EQUIVALENT, e["reason"]
                results.append(r)
                with open(partial, "a") as f:
                    f.write(json.dumps(r.to_dict()) + "\n")
                done[0] += 1
                eta = (time.time() - t_run) / done[0] * (len(todo) - done[0])
                by = f"  by {r.killer}" if r.killer else (f"  ({r.detail[:80]})" if r.status == ex.ERROR else "")
                _log(f"[{done[0]:>{len(str(len(todo)))}}/{len(todo)}] {r.status:<10} {r.mutant.file}:"
                     f"{r.mutant.line} {r.mutant.operator} ({r.mutant.id}) {r.seconds:.1f}s, {r.ran}/{r.tests} tests"
                     f"{by}  [eta {eta / 60:.0f} min]")

            try:
                runner.run_all(todo, on_result)
            except KeyboardInterrupt:
                interrupted = True
                _log("interrupted: writing the report of the mutants run so far")
            finally:
                runner.close()
            if not interrupted:
                ex.verify_killers(copies[0], results, _log)
        meta.update(finished=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                    seconds=time.time() - t_start, interrupted=interrupted)
        rep = rpt.build(results, meta, stale)
        md, js = rpt.write(rep, base)
        if not interrupted:
            partial.unlink(missing_ok=True)
        if not args.report:
            shutil.copyfile(md, cfg.work / "reports" / "latest.md")
            shutil.copyfile(js, cfg.work / "reports" / "latest.json")
        c = rep["counts"]
        _log(f"\nscore {rpt._pct(rep['score'])}: killed {c['killed']} + timed out {c['timeout']} of "
             f"{c['total']} mutants - {c['equivalent']} equivalent; survived {c['survived']}, no tests "
             f"{c['no-tests']}, errors {c['error']}; {(time.time() - t_start) / 60:.1f} min")
        _log(f"report: {md}  (and {js.name})")
        for e in stale:
            _log(f"stale equivalent: {e['id']} ({e['file']}): matches no mutant any more")
        if interrupted:
            _log(f"the mutants judged so far are in {partial}: continue with --resume {partial}")
            return EXIT_INTERRUPTED
        if args.fail_under is not None and rep["score"] is not None and 100 * rep["score"] < args.fail_under:
            _log(f"FAIL: score {100 * rep['score']:.1f} % is under --fail-under {args.fail_under:g} %")
            return EXIT_FAIL_UNDER
        return 0
    finally:
        if not args.keep_workdirs:
            shutil.rmtree(work, ignore_errors=True)


def _load_partial(path: Path) -> dict[str, dict]:
    if not path.exists():
        raise ToolError(f"--resume {path}: no such file")
    out = {}
    for i, row in enumerate(path.read_text().splitlines(), 1):
        try:
            d = json.loads(row)
        except ValueError:
            if i == len(path.read_text().splitlines()):
                break  # the last line of a run killed mid-write
            raise ToolError(f"--resume {path}: line {i} is not JSON") from None
        if d.get("status") not in ("equivalent", "error"):
            out[d["id"]] = d
    return out


def _check_redirection(cfg: Config, copy: Path) -> None:
    """A process started in the copy must import the project from the copy, or mutants would go unseen."""
    from scripts.mutation.tree import worker_env

    names = sorted(cfg.packages)
    code = ("import importlib, json, sys\nout = {}\nfor n in sys.argv[1:]:\n    m = importlib.import_module(n)\n"
            "    out[n] = list(getattr(m, '__path__', [])) or [m.__file__]\nprint(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd="/", env=worker_env(copy), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise ToolError(f"importing {', '.join(names)} from the project copy failed: "
                        f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    where = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {n: p for n, p in where.items() if not all(str(Path(x).resolve()).startswith(str(copy.resolve()))
                                                        for x in p)}
    if wrong:
        raise ToolError(f"the project copy's import hook does not take effect: {wrong} (set "
                        "[tool.grownfx.mutation] packages)")


def _clean_stale_workdirs(folder: Path) -> None:
    if not folder.is_dir():
        return
    for d in folder.glob("run-*"):
        try:
            pid = int(d.name.split("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass
