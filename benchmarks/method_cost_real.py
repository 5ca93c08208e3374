"""method_cost_real: GROWN vs CPG vs Scratch on real data (Split Fashion-MNIST), epochs, learning and wall time.

`grownfx compare lenet_fashion_split5_lowdata --methods scratch,finetune,cpg,grown --seeds 0` (the recipe's
schedule: the paper's 20 epochs per task, 300 training images per task), or an existing comparison folder
(`--from DIR`).  The scratch references that set GROWN's and CPG's targets are counted once and shared, as
`compare` does: the target rule `best(scratch, finetune) - 0.5` reads the Scratch and Fine-tune runs, so the
"with references" rows add those two runs' epochs and wall time to both GROWN and CPG (Scratch needs none).

Measured per method: epochs trained (the tasks' `epochs`), learning time (the tasks' `time_s`: training plus
in-task validation, pruning, growth set-up), wall time (compare's `wall_s` of the run: learning plus test
evaluation after every task, checkpoints, run folder) and, for GROWN and CPG, where the learning time goes:
each stage's training seconds and epochs (TaskRecord.stage_s; older folders: summed from metrics.jsonl) and
"other" (validation, pruning, snapshots, growth set-up, freezing).  The seed paper says grow-and-prune methods
such as CPG need about an order of magnitude more training time than GROWN.

One run per method, not interleaved repeats: the runs take minutes each and are timed as wholes, so the
ratios carry the shared machine's drift (see the note the report prints).  Without Fashion-MNIST (apt-get
install dataset-fashion-mnist) the benchmark is skipped with a message and an empty report.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

from . import common as C

RECIPE = "lenet_fashion_split5_lowdata"
METHODS = ("scratch", "finetune", "cpg", "grown")
TARGETED = ("grown", "cpg")


def quick_overrides() -> list[str]:
    return ["data.num_tasks=2", "data.train_per_class=12", "data.limit_per_task=40", "data.limit_test=true",
            "training.epochs=1", "training.stage2_epochs=1", "growth.max_rounds=1"]


def _epoch_events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    events = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [e for e in events if e.get("event") == "epoch"]


def load_runs(compare_dir: Path, seed: int = 0) -> tuple[dict, dict]:
    """{method: facts} for the four methods of `compare_dir` (seed `seed`), and compare.json's index."""
    index = json.loads((compare_dir / "compare.json").read_text())
    out = {}
    for entry in index["runs"]:
        if entry["seed"] != seed or entry["method"] not in METHODS or entry.get("status") != "ok":
            continue
        run_dir = compare_dir / entry["dir"]
        s = json.loads((run_dir / "summary.json").read_text())
        events = _epoch_events(run_dir)
        stage_s: dict[str, float] = defaultdict(float)
        stage_epochs: dict[str, int] = defaultdict(int)
        for e in events:
            stage_epochs[e.get("stage") or "train"] += 1
        recorded = all(t.get("stage_s") for t in s["tasks"])
        for t in s["tasks"]:
            if recorded:
                for k, v in t["stage_s"].items():
                    stage_s[k] += v
        if not recorded:  # a folder from before TaskRecord.stage_s: the epoch events' seconds
            for e in events:
                stage_s[e.get("stage") or "train"] += e["seconds"]
            stage_s["other"] = max(sum(t["time_s"] for t in s["tasks"]) - sum(stage_s.values()), 0.0)
        out[entry["method"]] = {
            "epochs": sum(t["epochs"] for t in s["tasks"]), "learn": s["total_time_s"], "wall": entry["wall_s"],
            "avg_acc": s["avg_acc"], "model_size": s["tasks"][-1].get("model_size"), "stage_s": dict(stage_s),
            "stage_epochs": dict(stage_epochs), "stage_s_recorded": recorded, "num_tasks": len(s["tasks"])}
    return out, index


def table(runs: dict, refs: tuple[str, ...]) -> str:
    """The Markdown table of docs/performance.md §5 (real data)."""
    ref_epochs = sum(runs[r]["epochs"] for r in refs if r in runs)
    ref_wall = sum(runs[r]["wall"] for r in refs if r in runs)
    lines = ["| method | epochs | + references | learning time (s) | wall time (s) | + references (s) | avg acc | "
             "final size |", "|---|---|---|---|---|---|---|---|"]
    for m in ("grown", "cpg", "scratch"):
        if m not in runs:
            continue
        v = runs[m]
        add = m in TARGETED
        lines.append(f"| {m} | {v['epochs']} | {v['epochs'] + ref_epochs if add else v['epochs']} | {v['learn']:.1f} | "
                     f"{v['wall']:.1f} | {v['wall'] + ref_wall if add else v['wall']:.1f} | {v['avg_acc']:.2f} | "
                     f"{v['model_size']:.2f}× |")
    lines += ["", "| method | stage | epochs | seconds | share of learning | s / epoch |", "|---|---|---|---|---|---|"]
    for m, stage, sec, n, share in stage_rows(runs):
        lines.append(f"| {m} | {stage} | {n or '—'} | {sec:.1f} | {share:.0f}% | {f'{sec / n:.2f}' if n else '—'} |")
    return "\n".join(lines)


def stage_rows(runs: dict):
    """(method, stage, seconds, epochs, % of the method's learning time) for GROWN and CPG, longest first."""
    for m in ("grown", "cpg"):
        if m not in runs:
            continue
        v = runs[m]
        for stage, sec in sorted(v["stage_s"].items(), key=lambda kv: -kv[1]):
            yield m, stage, sec, v["stage_epochs"].get(stage, 0), 100 * sec / v["learn"]


def report(runs: dict, index: dict, quick: bool) -> C.Report:
    from grownfx.recipe.schema import target_sources

    rep = C.Report("method_cost_real", quick=quick,
                   columns=("epochs_a", "epochs_b", "epochs", "share", "s_per_epoch"))
    refs = tuple(r for r in target_sources(index.get("target_rule")) if r in runs)
    ref = {"epochs": sum(runs[r]["epochs"] for r in refs), "wall": sum(runs[r]["wall"] for r in refs),
           "learn": sum(runs[r]["learn"] for r in refs)}

    def total(m: str, key: str) -> float:
        return runs[m][key] + (ref[key] if m in TARGETED else 0)

    for a, b, goal, check in (("cpg", "grown", "≥ 1× (paper: ≈ 10×)", lambda r: r >= 1.0),
                              ("grown", "scratch", "info", None), ("cpg", "scratch", "info", None)):
        if a not in runs or b not in runs:
            continue
        for key, label in (("epochs", "epochs learned"), ("learn", "learning time"), ("wall", "wall time")):
            r = runs[a][key] / runs[b][key]
            rep.add(f"{a.upper()} / {b.upper()} {label}", goal, r, check(r) if check else None, "x",
                    epochs_a=runs[a]["epochs"], epochs_b=runs[b]["epochs"])
        if refs and (a in TARGETED or b in TARGETED):
            for key, label in (("epochs", "epochs"), ("wall", "wall time")):
                r = total(a, key) / total(b, key)
                rep.add(f"{a.upper()} / {b.upper()} {label}, references shared", goal, r,
                        check(r) if check else None, "x", epochs_a=total(a, "epochs"), epochs_b=total(b, "epochs"))
    for m, stage, sec, n, share in stage_rows(runs):
        rep.add(f"{m.upper()} stage {stage}: seconds", "info", sec, None, "s", epochs=n, share=f"{share:.0f}%",
                s_per_epoch=round(sec / n, 3) if n else None)
    for m, v in runs.items():
        rep.add(f"{m.upper()} final average accuracy", "info", v["avg_acc"], None, "%", model_size=v["model_size"],
                epochs_a=v["epochs"])
    rep.extra["methods"] = runs
    rep.extra["references"] = list(refs)
    rep.extra["table"] = table(runs, refs)
    rep.note(f"stream: {index.get('recipe')}, target rule {index.get('target_rule')}; references {', '.join(refs)} "
             f"({ref['epochs']} epochs, {ref['wall']:.1f} s wall) are counted once and shared by GROWN and CPG, "
             "as `grownfx compare` trains them once per seed.")
    rep.note("learning time = the tasks' time_s; wall time = compare's wall_s of each run (learning, test "
             "evaluation after every task, checkpoints); stage seconds = TaskRecord.stage_s summed over the tasks "
             "(training epochs of that stage; 'other' = validation, pruning, snapshots, growth set-up, freezing).")
    rep.note("one run per method, timed as wholes on a shared machine: ratios move with its load.")
    if not all(runs[m]["stage_s_recorded"] for m in TARGETED if m in runs):
        rep.note("some runs predate TaskRecord.stage_s: their stage seconds are the epoch events' (metrics.jsonl)")
    print("\n" + rep.extra["table"])
    return rep


def run(args) -> C.Report:
    if args.from_dir is not None:
        runs, index = load_runs(Path(args.from_dir), args.seed)
        return report(runs, index, args.quick)
    from grownfx.data.errors import DatasetError
    from grownfx.data.fashion_mnist import find_idx
    from grownfx.recipe.loading import load_recipe

    root = args.root or load_recipe(RECIPE, check_data=False).data.root
    try:
        find_idx(Path(root))
    except DatasetError as exc:
        rep = C.Report("method_cost_real", quick=args.quick)
        message = (f"skipped: Fashion-MNIST is not installed at {root} (apt-get install dataset-fashion-mnist, or "
                   f"--root DIR with the four IDX files): {exc}")
        rep.add("skipped: Fashion-MNIST missing", "info", "skipped", None)
        rep.note(message)
        print(message)
        return rep
    from grownfx.run.compare import run_compare

    overrides = ["output.export_format=none", "output.tensorboard=false", f"data.root={root}"]
    overrides += quick_overrides() if args.quick else []
    overrides += args.override
    with tempfile.TemporaryDirectory(prefix="grownfx_cost_real_") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "compare"
        run_compare(RECIPE, list(METHODS), seeds=[args.seed], overrides=overrides, out_dir=out)
        runs, index = load_runs(out, args.seed)
    return report(runs, index, args.quick)


def add_args(p):
    p.add_argument("--from", dest="from_dir", default=None, help="an existing comparison folder of "
                   f"{RECIPE} with {', '.join(METHODS)} (nothing is trained)")
    p.add_argument("--out", default=None, help="keep the comparison folder here (default: a temporary folder)")
    p.add_argument("--root", default=None, help="Fashion-MNIST folder (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[], help="a recipe override, e.g. training.epochs=2")


def main(argv=None):
    return C.cli_main(run, "method_cost_real", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
