"""all: run every benchmark (each in its own process), then write benchmarks/results/summary.md.

    python -m benchmarks.all            # full sizes (tens of minutes on one CPU thread)
    python -m benchmarks.all --quick    # tiny sizes, seconds each
    python -m benchmarks.all --only train_step inference

Each benchmark runs as `python -m benchmarks.<name> --json <dir>/<name>.json` with OMP_NUM_THREADS=1 and
OMP_WAIT_POLICY=passive, one after another (never two at once: they would time each other).  JSON files found
in <dir>/gpu/ (runs made on a GPU machine, e.g. `python -m benchmarks.compile_amp --json
benchmarks/results/gpu/compile_amp_cuda.json`) are appended to the summary as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import RESULTS, fmt_value, verdict

BENCHMARKS = ("train_step", "inference", "storage", "scale_tasks", "method_cost", "method_cost_real", "data_pipeline",
              "compile_amp", "profile_step", "mask_arith")  # method_cost_real: skipped without Fashion-MNIST


def run_one(name: str, out: Path, quick: bool, extra: list[str]) -> tuple[int, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json", str(out)] + (["--quick"] if quick else []) + extra
    t0 = time.perf_counter()
    root = Path(__file__).resolve().parent.parent
    rc = subprocess.call(cmd, env=env, cwd=root)
    return rc, time.perf_counter() - t0


def summary(results: dict[str, dict | None], quick: bool, gpu: dict[str, dict] | None = None) -> str:
    lines = [f"# grownfx benchmark summary{' (quick)' if quick else ''}", ""]
    env = next((r["environment"] for r in results.values() if r), None)
    if env:
        where = env["device_name"] if env.get("cuda") else (f"CPU ({env['processor']}), {env['torch_threads']} "
                                                              f"thread(s) of {env['cpu_count']}")
        lines += [f"{where}; torch {env['torch']}; Python {env['python']}.  CPU figures are ratios of medians of "
                  "interleaved measurements (never absolute CPU times).", ""]
    lines += ["| benchmark | rows with a goal | pass | fail |", "|---|---|---|---|"]
    for name, r in results.items():
        if r is None:
            lines.append(f"| {name} | (failed to run) | | |")
            continue
        goals = [row for row in r["rows"] if row["pass"] is not None]
        lines.append(f"| {name} | {len(goals)} | {sum(row['pass'] for row in goals)} | "
                     f"{sum(not row['pass'] for row in goals)} |")
    for name, r in results.items():
        lines += ["", f"## {name}", ""]
        if r is None:
            lines.append("The benchmark failed to run; see its output.")
            continue
        lines.append(r.get("markdown") or "")
        for n in r.get("notes", []):
            lines.append(f"\n- {n}")
        lines.append(f"\n({r['created']}; {'quick' if r['quick'] else 'full'} run)")
    for name, r in (gpu or {}).items():
        env = r["environment"]
        lines += ["", f"## {r['benchmark']} on {env['device_name']} (gpu/{name}.json; torch {env['torch']})", "",
                  r.get("markdown") or ""]
        for n in r.get("notes", []):
            lines.append(f"\n- {n}")
        lines.append(f"\n({r['created']}; absolute times are GPU times)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.all", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", default=None, choices=BENCHMARKS)
    p.add_argument("--out", type=Path, default=None, help="folder of the JSON files and summary.md (default: "
                   "benchmarks/results, with --quick benchmarks/results/quick)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(BENCHMARKS)
    results: dict[str, dict | None] = {}
    failed = []
    for name in BENCHMARKS:
        path = args.out / f"{name}.json"
        if name in names:
            print(f"\n=== {name} ===", flush=True)
            rc, secs = run_one(name, path, args.quick, [])
            print(f"=== {name}: exit {rc} after {secs:.0f} s ===", flush=True)
            if rc != 0:
                failed.append(name)
                results[name] = None
                continue
        if path.exists():
            results[name] = json.loads(path.read_text())
    gpu = {f.stem: json.loads(f.read_text()) for f in sorted((args.out / "gpu").glob("*.json"))}
    text = summary(results, args.quick, gpu)
    (args.out / "summary.md").write_text(text)
    total = [row for r in results.values() if r for row in r["rows"] if row["pass"] is not None]
    print(f"\nsummary: {sum(r['pass'] for r in total)} of {len(total)} goals hold"
          f"{'; failed to run: ' + ', '.join(failed) if failed else ''}; written to {args.out / 'summary.md'}")
    for r in results.values():
        for row in (r or {}).get("rows", []):
            if row["pass"] is False:
                measured = fmt_value(row["measured"], row.get("unit", ""))  # as the tables show it, not a raw float
                print(f"  {verdict(False)}: {row['name']} (goal {row['goal']}, measured {measured})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
