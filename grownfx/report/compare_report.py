"""A `grownfx compare` folder -> `report/`: the seed paper's comparison tables, as Markdown and CSV, and plots.

    write_compare_report("runs/digits_quickstart_compare")   # -> .../report/{compare.md, *.csv, *.png}

Tables (mean ± std over seeds when there are several): accuracy per task after the whole stream with the
average and final model size (paper Tables 1/3), model size after each task (Tables 2/4), the ablation rows
with per-task deltas between consecutive rows (Table 5), and average accuracy, BWT, forgetting and time per
method.  On the paper's own streams (CIFAR-100 Split-10, Superclass-20) its published rows are printed
beside ours.  `runs.csv` holds every number per method, seed and task, for further analysis.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

from grownfx import files
from grownfx.report.paper import ABLATION_ROWS, PAPER, benchmark_of
from grownfx.report.formats import CompareIndex, read_model
from grownfx.report.run_report import md_table, read_run, save_figure, write_report_folder

__all__ = ["PAPER", "compare_tables", "load_compare", "write_compare_report"]

Table = tuple[list[str], list[list[Any]]]


# --- reading ----------------------------------------------------------------------------------------------


def load_compare(compare_dir: str | Path) -> dict:
    """compare.json and, per method (in its order), the finished or partial runs of every seed."""
    compare_dir = Path(compare_dir)
    index = read_model(compare_dir / "compare.json", CompareIndex)
    by_method: dict[str, list[dict]] = {m: [] for m in index["methods"]}
    for entry in index["runs"]:
        path = compare_dir / entry["dir"]
        if entry.get("status") == "ok" and (path / "summary.json").is_file():
            run = read_run(path)
            # an entry from before data seeds were separate ran on the data of its own seed
            run.update(seed=entry["seed"], data_seed=entry.get("data_seed", entry["seed"]), wall_s=entry.get("wall_s"))
            by_method.setdefault(entry["method"], []).append(run)
    runs = [r for rs in by_method.values() for r in rs]
    num_tasks = max([r["summary"].get("num_tasks") or len(r["summary"]["tasks"]) for r in runs], default=0)
    recipe = runs[0]["recipe"] if runs else index.get("recipe_config")
    return {"index": index, "methods": {m: rs for m, rs in by_method.items() if rs}, "num_tasks": num_tasks,
            "benchmark": benchmark_of(recipe)}


def _per_task(runs: list[dict], key: str, n: int) -> list[list[Optional[float]]]:
    """values[task][seed] of a per-task field."""
    out = [[] for _ in range(n)]
    for r in runs:
        tasks = r["summary"]["tasks"]
        for i in range(n):
            v = tasks[i].get(key) if i < len(tasks) else None
            if v is not None:
                out[i].append(float(v))
    return out


def _stat(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float], digits: int = 1, suffix: str = "", signed: bool = False) -> str:
    mean, std = _stat(values)
    if mean is None:
        return ""
    sign = "+" if signed and mean >= 0 else ""
    text = f"{sign}{mean:.{digits}f}{suffix}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


# --- tables -----------------------------------------------------------------------------------------------


def compare_tables(data: dict) -> dict[str, Table]:
    n, methods, bench = data["num_tasks"], data["methods"], PAPER.get(data["benchmark"] or "", {})
    cols = [str(i + 1) for i in range(n)]
    acc, size, summary = {}, {}, []
    for m, runs in methods.items():
        s = [r["summary"] for r in runs]
        final = [x["tasks"][-1]["model_size"] for x in s if x["tasks"] and x["tasks"][-1].get("model_size")]
        memory = [_last(x, "memory_size", "model_size") for x in s if x["tasks"]]
        stored = [x["tasks"][-1].get("stored_samples") or 0 for x in s if x["tasks"]]
        epochs = [sum(t.get("epochs") or 0 for t in x["tasks"]) / len(x["tasks"]) for x in s if x["tasks"]]
        acc[m] = [m, *[_cell(v) for v in _per_task(runs, "acc_final", n)],
                  _cell([x["avg_acc"] for x in s], 2), _cell(final, 2, "x"), _cell(epochs, 1)]
        size[m] = [m, *[_cell(v, 2, "x") for v in _per_task(runs, "model_size", n)]]
        summary.append([m, len(runs), _cell([x["avg_acc"] for x in s], 2), _cell([x["bwt"] for x in s], 2),
                        _cell([x["forgetting"] for x in s], 2), _cell(final, 2, "x"), _cell(memory, 2, "x"),
                        _cell(stored, 0), _cell([x["total_time_s"] for x in s], 1),
                        _cell([x["total_cpu_s"] for x in s if x.get("total_cpu_s") is not None], 1),
                        _cell([x["cpu_s_per_epoch"] for x in s if x.get("cpu_s_per_epoch") is not None], 2),
                        _cell([r["wall_s"] for r in runs if r["wall_s"]], 1)])
    published_acc = {f"{name} (published)": [f"{name} (published)", *row[:n], f"{avg:.2f}", f"{final:.1f}x", ""]
                     for name, (row, avg, final) in bench.get("acc", {}).items()}
    published_size = {f"{name} (published)": [f"{name} (published)", *[f"{v:.2f}x" for v in row[:n]]]
                      for name, row in bench.get("size", {}).items()}
    tables = {
        "accuracy": (["Method", *cols, "Avg", "Model size", "Epochs/task"], beside_published(acc, published_acc)),
        "model_size": (["Method", *cols], beside_published(size, published_size)),
        "summary": (["Method", "Runs", "Avg acc (%)", "BWT", "Forgetting", "Final size", "Memory", "Stored samples",
                     "Train time (s)", "CPU time (s)", "CPU s/epoch", "Wall time (s)"], summary),
    }
    ablation = _ablation(methods, n, bench)
    if ablation:
        tables["ablation"] = (["Method", *cols, "Avg"], ablation)
    return tables


def _last(summary: dict, key: str, fallback: str) -> Optional[float]:
    last = summary["tasks"][-1]
    return last.get(key) if last.get(key) is not None else last.get(fallback)


def _row_key(name: str) -> str:
    """A method's name as the paper's rows spell it, reduced: 'Fine-tune' and 'finetune' -> 'finetune'."""
    return "".join(c for c in name.split("[", 1)[0].split(" (", 1)[0].lower() if c.isalnum())


def beside_published(own: dict[str, list], published: dict[str, list]) -> list[list]:
    """Our rows in their order, each method's published row (same name: 'den' and 'DEN (published)',
    'finetune' and 'Fine-tune (published)') right after its last own row; published rows of methods we did not
    run at the end.  By name only, so a method added later needs nothing here."""
    keys = {label: _row_key(label) for label in published}
    last = {}
    for m in own:
        last[_row_key(m)] = m
    rows, placed = [], set()
    for m, row in own.items():
        rows.append(row)
        key = _row_key(m)
        if last[key] == m:
            for label, k in keys.items():
                if k == key and label not in placed:
                    rows.append(published[label])
                    placed.add(label)
    return rows + [row for label, row in published.items() if label not in placed]


def _ablation(methods: dict, n: int, bench: dict) -> list[list]:
    """Table 5: the first present row absolute, then per-task deltas to the row above, GROWN absolute last."""
    rows, prev = [], None
    for spec, label in ABLATION_ROWS:
        if spec not in methods:
            continue
        runs = methods[spec]
        means = [_stat(v)[0] for v in _per_task(runs, "acc_final", n)]
        avg = _stat([r["summary"]["avg_acc"] for r in runs])[0]
        if prev is None:
            rows.append([label, *[_fmt(v) for v in means], _fmt(avg, 2)])
        else:
            delta = [None if a is None or b is None else a - b for a, b in zip(means, prev[0])]
            rows.append([label, *[_fmt(d, signed=True) for d in delta], _fmt(avg - prev[1], 2, True)])
        prev = (means, avg)
    if rows and "grown" in methods:
        runs = methods["grown"]
        rows.append(["GROWN", *[_cell(v) for v in _per_task(runs, "acc_final", n)],
                     _cell([r["summary"]["avg_acc"] for r in runs], 2)])
    for label, row, avg in bench.get("ablation", []) if rows else []:
        signed = label not in ("Grow only", "Ours")
        rows.append([f"{label} (published)", *[_fmt(v, signed=signed) for v in row[:n]], _fmt(avg, 1, signed)])
    return rows


def _fmt(v: Optional[float], digits: int = 1, signed: bool = False) -> str:
    if v is None:
        return ""
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


# --- writing ----------------------------------------------------------------------------------------------


_TITLES = {
    "summary": "Per method: average accuracy after the last task, backward transfer, forgetting, final model size, "
               "memory kept between tasks and time",
    "accuracy": "Accuracy per task after the whole stream (%), average and final model size (paper Tables 1 and 3)",
    "model_size": "Model size after each task, relative to the full backbone (paper Tables 2 and 4)",
    "ablation": "Ablation: the first row's accuracy, then per-task changes from the row above (paper Table 5)",
}


def write_compare_report(compare_dir: str | Path) -> Path:
    """Write `compare_dir/report/` (compare.md, one CSV per table, runs.csv, PNG plots); returns that folder."""
    return write_report_folder(compare_dir, "compare.md", load_compare(compare_dir), compare_tables, _plots, _markdown,
                               extra=lambda data, out: _write_runs_csv(data, out / "runs.csv"))


def _write_runs_csv(data: dict, path: Path) -> None:
    header = ["method", "seed", "data_seed", "task", "acc_final", "acc_when_learned", "val_acc", "target",
              "model_size", "memory_size", "params_stored", "params_task", "stored_samples", "stored_values", "time_s",
              "cpu_s", "cpu_s_per_epoch", "epochs"]
    rows = []
    for m, runs in data["methods"].items():
        for r in runs:
            for t in r["summary"]["tasks"]:
                rows.append([m, r["seed"], r.get("data_seed"), t["index"] + 1, *[t.get(k) for k in header[4:]]])
    files.atomic_write_csv([header, *rows], path)


def _markdown(data: dict, tables: dict[str, Table], plots: list[str]) -> str:
    index = data["index"]
    lines = [f"# Comparison: {index['recipe']}", "",
             f"- methods: {', '.join(index['methods'])}; {seeds_line(index)} "
             "(cells are mean ± std over the runs when there are several)",
             f"- {data['num_tasks']} tasks; every method ran the same stream, schedule and validation split",
             f"- target rule: {index.get('target_rule')}"]
    budget = (index.get("recipe_config") or {}).get("training", {}).get("epoch_budget")
    if budget:
        lines.append(f"- equal budget: every method trained {budget} epochs per task, all its phases together")
    for key, t in index.get("targets", {}).items():
        which = f"seed {key}" if "data_seed" not in t or t["seed"] == t["data_seed"] else \
            f"seed {t['seed']}, data seed {t['data_seed']}"
        lines.append(f"- targets for {which} ({t['source']}): " + ", ".join(f"{v:.1f}" for v in t["values"]))
    failed = [f"{r['method']} seed {r['seed']}" for r in index["runs"] if r.get("status") != "ok"]
    if failed:
        lines.append(f"- failed or missing runs (left out): {', '.join(failed)}")
    if any(r["summary"].get("complete") is False for runs in data["methods"].values() for r in runs):
        lines.append("- some runs are not complete (summary.json `complete: false`): their rows read the tasks "
                     "learned so far")
    lines.append("- Final size: parameters of the networks kept, relative to the full backbone; Memory: that plus "
                 "the values a method keeps between tasks (replay's stored samples, one value per input value and "
                 "label; EWC/SI/MAS's importance and anchor); CPU time: process CPU seconds (all threads) while "
                 "learning, comparable across runs where wall time swings with the machine's load")
    if data["benchmark"]:
        lines.append(f"- rows marked (published) are the seed paper's own numbers ({PAPER[data['benchmark']]['source']}"
                     "), not runs of ours")
    for key in ("summary", "accuracy", "model_size", "ablation"):
        if key in tables:
            header, rows = tables[key]
            lines += ["", f"## {_TITLES[key]}", "", md_table(header, rows), "", f"CSV: [{key}.csv]({key}.csv)"]
    lines += ["", "Every number per method, seed and task: [runs.csv](runs.csv)"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# --- plots ------------------------------------------------------------------------------------------------


def seeds_line(index: dict) -> str:
    """Which seeds a comparison varied: training seeds (initialisation, batches, masks), data seeds (class
    order, hold-outs, subsets), or both."""
    seeds = [str(s) for s in index.get("seeds", [])]
    data = [str(d) for d in index.get("data_seeds", index.get("seeds", []))]
    if "data_seeds" not in index:  # written before data seeds were separate: each seed chose its data too
        return f"seeds: {', '.join(seeds)} (each seed also chose the data: training and data varied together)"
    varied = []
    varied.append(f"training seeds {', '.join(seeds)}" if len(seeds) > 1 else f"training seed {seeds[0]} (fixed)")
    varied.append(f"data seeds {', '.join(data)}" if len(data) > 1 else f"data seed {data[0]} (fixed)")
    what = [w for w, v in (("training", len(seeds) > 1), ("data", len(data) > 1)) if v]
    return f"{'; '.join(varied)}: varied {' and '.join(what) if what else 'nothing'}"


def _plots(data: dict, out: Path) -> list[str]:
    if not data["methods"]:
        return []
    from matplotlib.figure import Figure

    made = []
    for name, draw in (("accuracy_per_task.png", _plot_accuracy), ("model_size.png", _plot_size),
                       ("accuracy_vs_size.png", _plot_tradeoff)):
        zoom = _accuracy_zoom(data) if draw is _plot_accuracy else None
        fig = Figure(figsize=(8, 8.5 if zoom else 4.5), layout="constrained")
        if zoom:  # the whole range above, the close race at the top below
            top, bottom = fig.subplots(2, 1)
            draw(top, data)
            draw(bottom, data, zoom=zoom)
            bottom.get_legend().remove()
        else:
            draw(fig.add_subplot(), data)
        save_figure(fig, out / name, dpi=150)
        made.append(name)
    return made


def _series(runs: list[dict], key: str, n: int):
    stats = [_stat(v) for v in _per_task(runs, key, n)]
    xs = [i + 1 for i, (m, _) in enumerate(stats) if m is not None]
    return xs, [m for m, _ in stats if m is not None], [s or 0.0 for m, s in stats if m is not None]


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p", "d", "H", "8", "1", "2", "3", "4", "+")
_LINES = ("-", "--", "-.", ":")


def _family(method: str) -> str:
    return method.split("[", 1)[0]


def _ordered(methods) -> list[str]:
    """Methods in their order, but each family's rows together (grown, then its ablation rows)."""
    families: dict[str, list[str]] = {}
    for m in methods:
        families.setdefault(_family(m), []).append(m)
    return [m for rows in families.values() for m in rows]


def method_styles(methods) -> dict[str, dict]:
    """A colour per method family, and within it a marker and line style per row, so that 12 methods (grown
    and its four ablation rows among them) stay apart in print and in grey scale."""
    from matplotlib import colormaps

    ordered = _ordered(methods)
    families = [f for f in dict.fromkeys(_family(m) for m in ordered) if f != "grown"]
    tab10 = colormaps["tab10"].colors
    palette = [c for i, c in enumerate(tab10) if i != 7]  # no grey: GROWN's own rows are black and greys
    if len(families) > len(palette):  # more families than tab10 tells apart: tab20 (its greys left out too)
        palette = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (14, 15)]
    base = {f: palette[i % len(palette)] for i, f in enumerate(families)}
    base["grown"] = (0.0, 0.0, 0.0)
    styles, rank = {}, {}
    for i, m in enumerate(ordered):
        fam = _family(m)
        k = rank[fam] = rank.get(fam, -1) + 1
        light = min(0.6, 0.15 * k)  # a family's later rows (ablations) in lighter shades of its colour
        color = tuple(c + (1.0 - c) * light for c in base[fam][:3])
        styles[m] = {"color": color, "marker": _MARKERS[i % len(_MARKERS)], "linestyle": _LINES[k % len(_LINES)]}
    return styles


def _dodge(n_methods: int, i: int, width: float = 0.36) -> float:
    """Horizontal offset of method i, so that equal values at one task do not hide each other."""
    return 0.0 if n_methods < 2 else -width / 2 + width * i / (n_methods - 1)


def _per_task_lines(ax, data: dict, key: str, only=None) -> list[float]:
    methods = _ordered(data["methods"])
    styles = method_styles(methods)
    values: list[float] = []
    for i, m in enumerate(methods):
        if only is not None and m not in only:
            continue
        xs, ys, errs = _series(data["methods"][m], key, data["num_tasks"])
        xs = [x + _dodge(len(methods), i) for x in xs]
        st = styles[m]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, capsize=2, markersize=5, linewidth=1.3,
                    elinewidth=0.8, label=m, **st)
        values += [y - e for y, e in zip(ys, errs)] + [y + e for y, e in zip(ys, errs)]
    n = data["num_tasks"]
    ax.set_xticks(range(1, n + 1))  # whole tasks only
    ax.set_xlim(0.5, n + 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return values


def _plot_accuracy(ax, data: dict, zoom: Optional[tuple[float, float]] = None) -> None:
    n = data["num_tasks"]
    means = {m: _series(runs, "acc_final", n)[1] for m, runs in data["methods"].items()}
    # the zoom shows only the methods that stay within it on every task: no lines falling through the panel
    only = None if zoom is None else {m for m, ys in means.items() if ys and min(ys) >= zoom[0]}
    _per_task_lines(ax, data, "acc_final", only=only)
    flat = [y for m, ys in means.items() if only is None or m in only for y in ys]
    lo, hi = zoom or (min(flat, default=0.0), max(flat, default=100.0))
    pad = max(0.4, 0.06 * (hi - lo))  # the data's range, not 0-100: a point's difference must show
    ax.set_ylim(max(0.0, lo - pad), min(100.0 + pad / 2, hi + pad))
    ax.set(xlabel="task", ylabel="test accuracy after the last task (%)",
           title="Accuracy per task (mean ± std over seeds)" if zoom is None else
           f"Zoom: the {len(only)} methods within {lo:.1f}–{hi:.1f} % on every task")


def _accuracy_zoom(data: dict) -> Optional[tuple[float, float]]:
    """The range of the best methods' per-task means when outliers stretch the axis past 10 points."""
    per_method = [ys for runs in data["methods"].values() if (ys := _series(runs, "acc_final", data["num_tasks"])[1])]
    flat = [y for ys in per_method for y in ys]
    if not flat or max(flat) - min(flat) <= 10:
        return None
    top = [ys for ys in per_method if min(ys) >= max(flat) - 5]  # methods within 5 points of the best throughout
    if len(top) < 2:
        return None
    return (min(min(ys) for ys in top), max(max(ys) for ys in top))


def _plot_size(ax, data: dict) -> None:
    values = [v for v in _per_task_lines(ax, data, "model_size") if v > 0]
    if values and max(values) / min(values) > 4:  # 0.3x beside 5x: a log axis keeps both readable
        ax.set_yscale("log")
        nice = [0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50, 100]
        ticks = [t for t in nice if min(values) / 1.3 <= t <= max(values) * 1.3]
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_ylabel("parameters stored / full backbone (log scale)")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.annotate("full backbone", (0.55, 1.0), xytext=(0, 3), textcoords="offset points", fontsize=7)
    ax.set(xlabel="after task", title="Model size per task")
    if ax.get_yscale() != "log":
        ax.set_ylabel("parameters stored / full backbone")


def _plot_tradeoff(ax, data: dict) -> None:
    methods = _ordered(data["methods"])
    styles = method_styles(methods)
    accs, sizes = [], []
    for m in methods:
        runs = data["methods"][m]
        acc = _stat([r["summary"]["avg_acc"] for r in runs])
        # what a method keeps: the networks, and replay's samples or a penalty's importance beside them
        size = _stat([_last(r["summary"], "memory_size", "model_size") for r in runs if r["summary"]["tasks"]])
        if acc[0] is None or size[0] is None:
            continue
        st = {k: v for k, v in styles[m].items() if k != "linestyle"}
        ax.errorbar(size[0], acc[0], xerr=size[1] or 0, yerr=acc[1] or 0, capsize=2, markersize=7, linestyle="none",
                    label=f"{m}: {acc[0]:.1f} %, {size[0]:.2f}x", **st)
        accs += [acc[0] - (acc[1] or 0), acc[0] + (acc[1] or 0)]
        sizes.append(size[0])
    if sizes and min(sizes) > 0 and max(sizes) / min(sizes) > 4:  # 0.3x beside 5x
        ax.set_xscale("log")
        nice = [0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50, 100]
        ticks = [t for t in nice if min(sizes) / 1.5 <= t <= max(sizes) * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title="average accuracy, final size", title_fontsize=7)
    for name, (_, avg, final) in PAPER.get(data["benchmark"] or "", {}).get("acc", {}).items():
        ax.scatter(final, avg, marker="s", facecolors="none", edgecolors="gray")
        ax.annotate(f"{name} (published)", (final, avg), textcoords="offset points", xytext=(4, -8), fontsize=6,
                    color="gray")
    ax.set(xlabel="final size: parameters + values kept between tasks (x full backbone)", ylabel="average accuracy (%)",
           title="Accuracy vs model size")
