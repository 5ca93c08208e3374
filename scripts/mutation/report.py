"""The equivalents file and the report (markdown for people, JSON for tools)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

from scripts.mutation.config import ToolError
from scripts.mutation.execute import EQUIVALENT, ERROR, KILLED, SURVIVED, TIMEOUT, UNCOVERED, Result
from scripts.mutation.mutants import one_line

STATUSES = (KILLED, TIMEOUT, SURVIVED, UNCOVERED, EQUIVALENT, ERROR)
_ID = re.compile(r"^[0-9a-f]{10}$")


def load_equivalents(path: Path) -> dict[str, dict]:
    """{mutant id: entry}.  Each entry: id, file, reason (one line: why no test can tell the mutant from the
    code), and optionally `mutant` (what it changes, for people reading the file)."""
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ToolError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, list):
        raise ToolError(f"{path}: expected a list of entries (- id: ..., file: ..., reason: ...)")
    out = {}
    for i, e in enumerate(data, 1):
        where = f"{path}: entry {i}"
        if not isinstance(e, dict):
            raise ToolError(f"{where}: expected a mapping with id, file and reason")
        unknown = set(e) - {"id", "file", "reason", "mutant"}
        if unknown:
            raise ToolError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if not isinstance(e.get("id"), str) or not _ID.match(e["id"]):
            raise ToolError(f"{where}: 'id' must be a mutant id (10 hex digits, as the report prints it)")
        if not isinstance(e.get("file"), str) or not e["file"]:
            raise ToolError(f"{where} ({e['id']}): 'file' is missing")
        if not isinstance(e.get("reason"), str) or not e["reason"].strip():
            raise ToolError(f"{where} ({e['id']}): 'reason' is missing: say in one line why no test can tell "
                            "this mutant from the code")
        if e["id"] in out:
            raise ToolError(f"{where}: id {e['id']} is listed twice")
        out[e["id"]] = e
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def counts(results: list[Result]) -> dict[str, int]:
    c = {s: 0 for s in STATUSES}
    for r in results:
        c[r.status] += 1
    c["total"] = len(results)
    return c


def score(c: dict[str, int]) -> Optional[float]:
    judged = c["total"] - c[EQUIVALENT]
    return (c[KILLED] + c[TIMEOUT]) / judged if judged else None


def build(results: list[Result], meta: dict, stale: list[dict]) -> dict:
    results = sorted(results, key=lambda r: (r.mutant.file, r.mutant.line, r.mutant.operator, r.mutant.id))
    c = counts(results)
    s = score(c)
    by_file: dict[str, dict] = {}
    for r in results:
        by_file.setdefault(r.mutant.file, []).append(r)
    files = {}
    for f, rs in by_file.items():
        fc = counts(rs)
        files[f] = {**fc, "score": score(fc)}
    out = {**meta, "counts": c, "score": s, "files": files, "stale_equivalents": stale,
           "mutants": [r.to_dict() for r in results]}
    if meta.get("sampled") and s is not None:
        out["score_ci95"] = list(wilson(c[KILLED] + c[TIMEOUT], c["total"] - c[EQUIVALENT]))
    return out


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _code(text: str) -> str:
    t = one_line(text).replace("|", "\\|")
    if len(t) > 140:
        t = t[:137] + "..."
    return f"`{t}`" if "`" not in t else t


def markdown(rep: dict) -> str:
    c = rep["counts"]
    lines = ["# Mutation report", ""]
    lines += [f"- command: `{rep['command']}`",
              f"- commit: `{rep['commit']}`" + (" plus uncommitted changes" if rep.get("dirty") else ""),
              f"- finished: {rep['finished']} after {rep['seconds'] / 60:.1f} min with {rep['jobs']} worker(s)",
              f"- mutants: {rep['selection']}",
              f"- coverage map: {rep['map']}"]
    if rep.get("test_budget_s"):
        lines.append(f"- test budget: only the fastest tests reaching a mutant, up to {rep['test_budget_s']:g} s of "
                     "their normal duration, ran; a survivor whose *tests run* is below the tests reaching it may "
                     "be killed by a slower one (`--id ID --test-budget 0`)")
    if rep.get("interrupted"):
        lines.append(f"- **interrupted**: {c['total']} of {rep['planned']} mutants were run; the counts are theirs")
    judged = c["total"] - c[EQUIVALENT]
    lines += ["", "## Summary", ""]
    score_line = (f"**Score: {_pct(rep['score'])}** = killed {c[KILLED] + c[TIMEOUT]} (of which {c[TIMEOUT]} "
                  f"timed out) / ({c['total']} mutants − {c[EQUIVALENT]} equivalent = {judged})")
    if "score_ci95" in rep:
        lo, hi = rep["score_ci95"]
        score_line += f"; 95 % interval of the sampled estimate {100 * lo:.1f}–{100 * hi:.1f} %"
    lines += [score_line, "", "| status | mutants | meaning |", "| --- | ---: | --- |",
              f"| killed | {c[KILLED]} | a test failed |",
              f"| timed out | {c[TIMEOUT]} | the tests ran past their time limit (counted as killed) |",
              f"| survived | {c[SURVIVED]} | every test that reaches the line passed |",
              f"| no tests | {c[UNCOVERED]} | no test of the map executes the line (counted as survived) |",
              f"| equivalent | {c[EQUIVALENT]} | listed in the equivalents file: no test can tell it from the code |",
              f"| error | {c[ERROR]} | the run could not judge it (counted as not killed) |", ""]
    lines += ["## By file", "", "| file | mutants | killed | timed out | survived | no tests | equivalent | errors "
              "| score |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for f, fc in sorted(rep["files"].items()):
        lines.append(f"| {f} | {fc['total']} | {fc[KILLED]} | {fc[TIMEOUT]} | {fc[SURVIVED]} | {fc[UNCOVERED]} "
                     f"| {fc[EQUIVALENT]} | {fc[ERROR]} | {_pct(fc['score'])} |")
    muts = rep["mutants"]
    lines += _section("Survivors", "Every test that executes the line passed with the mutant in place. Write a "
                      "test of the behaviour the line decides, or record the mutant as equivalent.",
                      [m for m in muts if m["status"] == SURVIVED], show_tests=True)
    lines += _section("Not reached by any test", "No test of the fast suite executes these lines.",
                      [m for m in muts if m["status"] == UNCOVERED])
    lines += _section("Timed out (counted as killed)", "", [m for m in muts if m["status"] == TIMEOUT],
                      show_killer=True)
    lines += _section("Errors (counted as not killed)", "", [m for m in muts if m["status"] == ERROR],
                      show_detail=True)
    eq = [m for m in muts if m["status"] == EQUIVALENT]
    lines += ["", f"## Equivalent mutants ({len(eq)})", ""]
    if eq:
        lines += ["| id | where | operator | original | mutated | reason |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {m['id']} | {m['file']}:{m['line']} | {m['operator']} | {_code(m['original'])} | "
                  f"{_code(m['mutated'])} | {m['reason']} |" for m in eq]
    else:
        lines.append("None.")
    stale = rep["stale_equivalents"]
    lines += ["", f"## Stale equivalents ({len(stale)})", ""]
    if stale:
        lines += ["Entries of the equivalents file that match no mutant of a file this run scanned (the code "
                  "changed): delete them or record the new id.", "", "| id | file | reason |", "| --- | --- | --- |"]
        lines += [f"| {e['id']} | {e['file']} | {e['reason']} |" for e in stale]
    else:
        lines.append("None.")
    killed = [m for m in muts if m["status"] == KILLED]
    lines += ["", f"## Killed ({len(killed)})", "", "<details><summary>which test killed each mutant</summary>", "",
              "| id | where | operator | mutated | killed by |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {m['id']} | {m['file']}:{m['line']} | {m['operator']} | {_code(m['mutated'])} | "
              f"`{m['killer']}` |" for m in killed]
    lines += ["", "</details>", "", "Reproduce one mutant: `python -m scripts.mutation --id ID --list` shows its "
              "diff, `python -m scripts.mutation --id ID` runs it again.", ""]
    return "\n".join(lines)


def _section(title: str, intro: str, muts: list[dict], show_tests=False, show_killer=False, show_detail=False):
    out = ["", f"## {title} ({len(muts)})", ""]
    if not muts:
        return out + ["None."]
    if intro:
        out += [intro, ""]
    by_file: dict[str, list[dict]] = {}
    for m in muts:
        by_file.setdefault(m["file"], []).append(m)
    for f, ms in sorted(by_file.items()):
        out += [f"### {f} ({len(ms)})", ""]
        head = "| id | line | operator | function | original | mutated |"
        extra = (" tests run / reaching |" if show_tests else " test running |" if show_killer
                 else " detail |" if show_detail else "")
        out += [head + extra, "| --- " * (6 + bool(extra)) + "|"]
        for m in ms:
            row = (f"| {m['id']} | {m['line']} | {m['operator']} | `{m['function']}` | {_code(m['original'])} | "
                   f"{_code(m['mutated'])} |")
            if show_tests:
                row += f" {m['ran']} / {m['tests']} |"
            elif show_killer:
                row += f" `{m['killer']}` |"
            elif show_detail:
                row += f" {one_line(m['detail'])[:200].replace('|', '/')} |"
            out.append(row)
        out.append("")
    return out


def write(rep: dict, base: Path) -> tuple[Path, Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    js.write_text(json.dumps(rep, indent=1) + "\n")
    md.write_text(markdown(rep))
    return md, js
