"""Markdown table rows for docs/results from `grownfx compare` folders: one row per (label, folder, method).

    python scripts/results_rows.py "20: GROWN, paper rule=runs/scarce_10_paper:grown" \
        "20: Scratch=runs/scarce_10_paper:scratch" --per-seed

A row: average test accuracy after the last task (mean ± sd over the folder's runs of that method), final model
size relative to one backbone, growth rounds summed over the tasks, epochs summed over the tasks (both means over
the runs), the number of runs; `--per-seed` adds each run's average accuracy.  Read from each run's summary.json,
the numbers `grownfx report` tabulates.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def method_runs(folder: Path, method: str) -> list[dict]:
    """The summaries of `method`'s complete runs in a compare folder, in seed order."""
    runs = json.loads((folder / "compare.json").read_text())["runs"]
    out = []
    for r in runs:
        if r["method"] == method and r["status"] == "ok":
            out.append(json.loads((folder / r["dir"] / "summary.json").read_text()))
    if not out:
        raise SystemExit(f"{folder}: no complete run of {method!r}")
    return sorted(out, key=lambda s: s["seed"])


def row(label: str, summaries: list[dict], per_seed: bool) -> str:
    acc = [s["avg_acc"] for s in summaries]
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    size = statistics.mean(s["tasks"][-1]["model_size"] for s in summaries)
    rounds = statistics.mean(sum(t["growth_rounds"] for t in s["tasks"]) for s in summaries)
    epochs = statistics.mean(sum(t["epochs"] for t in s["tasks"]) for s in summaries)
    cells = [label, f"{statistics.mean(acc):.2f} ± {sd:.2f}", f"{size:.2f}", f"{rounds:.1f}", f"{epochs:.0f}",
             str(len(acc))]
    if per_seed:
        cells.append(" / ".join(f"{a:.2f}" for a in acc))
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", help="LABEL=FOLDER:METHOD")
    ap.add_argument("--per-seed", action="store_true", help="add each run's average accuracy")
    args = ap.parse_args()
    for spec in args.rows:
        label, _, where = spec.rpartition("=")
        folder, _, method = where.rpartition(":")
        print(row(label, method_runs(Path(folder), method), args.per_seed))


if __name__ == "__main__":
    main()
