"""A run folder -> `report/`: markdown tables in the seed paper's formats, the same tables as CSV, and plots.

    write_report("runs/digits_quickstart")   # -> runs/digits_quickstart/report/{report.md, *.csv, *.png}

Reads `summary.json` and `acc_matrix.json` (written by the runner) and, when present, `config.resolved.yaml`
to print the seed paper's published numbers beside the run's own on the paper's benchmarks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from grownfx import files
from grownfx.recipe.loading import RecipeError, parse_yaml
from grownfx.report.formats import AccMatrix, Summary, read_model
from grownfx.report.metrics import stream_metrics
from grownfx.report.paper import PAPER, RUN_REPORT_ROWS, benchmark_of, published

__all__ = ["read_run", "report_tables", "write_report"]

Table = tuple[list[str], list[list[Any]]]


# --- reading ----------------------------------------------------------------------------------------------


def read_run(run_dir: str | Path) -> dict:
    """summary, accuracy matrix, task names and (if saved) the resolved recipe of a run folder."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path.absolute()} not found: {run_dir} is not a finished (or started) "
                                "run folder; `grownfx run` writes summary.json after each task")
    summary = read_model(summary_path, Summary)
    matrix_path = run_dir / "acc_matrix.json"
    acc = read_model(matrix_path, AccMatrix) if matrix_path.is_file() else {"tasks": [], "matrix": []}
    if acc.get("matrix"):  # one definition of the stream metrics for the runner and both reports
        summary.update(stream_metrics(acc["matrix"]))
    tasks = summary.get("tasks", [])
    names = acc.get("tasks") or [t.get("name", str(t.get("index", i))) for i, t in enumerate(tasks)]
    recipe = None
    resolved = run_dir / "config.resolved.yaml"
    if resolved.is_file():  # only for the benchmark's published numbers: a file that does not parse gives none
        try:
            recipe, _ = parse_yaml(files.read_bytes(resolved).decode("utf-8", errors="replace"), str(resolved))
        except RecipeError:
            recipe = None
    return {"dir": run_dir, "summary": summary, "matrix": acc.get("matrix", []), "names": names, "recipe": recipe}


# --- tables -----------------------------------------------------------------------------------------------


def report_tables(run: dict) -> dict[str, Table]:
    """All report tables as (header, rows): accuracy, model_size, acc_matrix, tasks, growth."""
    s, tasks = run["summary"], run["summary"].get("tasks", [])
    n = len(tasks)
    label = f"{s.get('method', '?')} ({s.get('name', 'this run')})"
    final_size = tasks[-1].get("model_size") if tasks else None
    bench = published(benchmark_of(run.get("recipe")), RUN_REPORT_ROWS)

    acc_rows = [[label, *[_num(t.get("acc_final")) for t in tasks], _num(s.get("avg_acc"), 2), _size(final_size)]]
    for method, (row, avg, size) in bench.get("acc", {}).items():
        acc_rows.append([f"{method} (published)", *row[:n], avg, _size(size)])
    size_rows = [[label, *[_size(t.get("model_size")) for t in tasks]]]
    for method, row in bench.get("size", {}).items():
        size_rows.append([f"{method} (published)", *[_size(v) for v in row[:n]]])
    cols = [str(i + 1) for i in range(n)]
    names = list(run["names"]) or cols
    width = max([len(names), *map(len, run["matrix"])])
    names += [str(j + 1) for j in range(len(names), width)]
    matrix_rows = [[f"after {names[i]}", *[_num(v) for v in row + [None] * (width - len(row))]]
                   for i, row in enumerate(run["matrix"])]
    return {
        "accuracy": (["Method", *cols, "Avg", "Model size"], acc_rows),
        "model_size": (["Method", *cols], size_rows),
        "acc_matrix": (["after task \\ test on", *names], matrix_rows),
        "tasks": (_TASK_HEADER, [_task_row(t) for t in tasks]),
        "growth": _growth_table(tasks),
    }


_TASK_HEADER = ["Task", "Name", "Classes", "Target", "Val acc", "Acc when learned", "Acc final", "Grew",
                "Growth rounds", "Channels added", "Params stored", "Params used", "Model size", "Mask bytes",
                "Epochs", "Time (s)", "Selective zero frac", "Released", "Retrained", "CPU (s)", "CPU s/epoch",
                "Stored samples", "Stored values", "Memory size"]


def _task_row(t: dict) -> list:
    growth = t.get("growth") or {}
    return [int(t.get("index", 0)) + 1, t.get("name", ""), t.get("num_classes", ""), _num(t.get("target")),
            _num(t.get("val_acc")), _num(t.get("acc_when_learned")), _num(t.get("acc_final")),
            "yes" if t.get("grew") else "no", t.get("growth_rounds", 0), sum(growth.values()),
            t.get("params_stored", ""), t.get("params_task", ""), _size(t.get("model_size")), t.get("mask_bytes", ""),
            t.get("epochs", ""), _num(t.get("time_s")), _num(t.get("selective_zero_frac"), 3),
            t.get("released", ""), t.get("retrained", ""), _num(t.get("cpu_s")), _num(t.get("cpu_s_per_epoch"), 2),
            t.get("stored_samples", ""), t.get("stored_values", ""), _size(t.get("memory_size"))]


def _growth_table(tasks: list[dict]) -> Table:
    """Channels added per growth site (coupling group) per task."""
    sites = sorted({str(k) for t in tasks for k in (t.get("growth") or {})}, key=_site_key)
    rows = []
    for site in sites:
        added = [int((t.get("growth") or {}).get(site, 0)) for t in tasks]
        rows.append([site, *added, sum(added)])
    return ["Growth site (group)", *[str(i + 1) for i in range(len(tasks))], "Total"], rows


def _site_key(site: str):
    return (0, int(site), "") if site.isdigit() else (1, 0, site)


def _num(v: Any, digits: int = 1) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return round(float(v), digits) if isinstance(v, (int, float)) else v


def _size(v: Any) -> str:
    return "" if v is None else f"{float(v):.2f}x"


# --- writing ----------------------------------------------------------------------------------------------


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report/` (report.md, one CSV per table, PNG plots); returns that folder."""
    return write_report_folder(run_dir, "report.md", read_run(run_dir), report_tables, _plots, _markdown)


def write_report_folder(folder: str | Path, md_name: str, data, tables_of, plots_of, markdown_of,
                        extra=None) -> Path:
    """Write `folder/report/`: one CSV per table of `tables_of(data)`, then `extra(data, out)` when given, the PNG
    plots of `plots_of(data, out)` and `md_name` from `markdown_of(data, tables, plots)`; returns that folder."""
    out = files.ensure_dir(Path(folder) / "report")
    tables = tables_of(data)
    write_csv_tables(tables, out)
    if extra is not None:
        extra(data, out)
    plots = plots_of(data, out)
    files.atomic_write_text(markdown_of(data, tables, plots), out / md_name)
    return out


def write_csv_tables(tables: dict[str, Table], out: Path) -> None:
    """One CSV per table, named after it."""
    for name, (header, rows) in tables.items():
        files.atomic_write_csv([header, *rows], out / f"{name}.csv")


def _markdown(run: dict, tables: dict[str, Table], plots: list[str]) -> str:
    s, tasks = run["summary"], run["summary"].get("tasks", [])
    full = s.get("full_params")
    bench = benchmark_of(run.get("recipe"))
    of = f" of {s['num_tasks']}" if s.get("num_tasks") not in (None, len(tasks)) else ""
    complete = s.get("complete", len(tasks) == s.get("num_tasks", len(tasks)))
    status = "" if complete else " (**not complete**: a partial run, the numbers below read the tasks learned so far)"
    lines = [f"# {s.get('name', 'run')}: {s.get('method', '?')}", "", f"- tasks: {len(tasks)}{of}{status}",
             f"- average accuracy (after the last task): {_fmt(s.get('avg_acc'), 2)} %",
             f"- backward transfer (BWT): {_fmt(s.get('bwt'), 2)}; forgetting: {_fmt(s.get('forgetting'), 2)}",
             f"- full backbone: {full:,} parameters" if isinstance(full, int) else "- full backbone: unknown",
             f"- final model size: {_size(tasks[-1].get('model_size')) if tasks else '-'} of the full backbone",
             f"- training time: {_fmt(s.get('total_time_s'), 1)} s (the tasks' own time); CPU time "
             f"{_fmt(s.get('total_cpu_s'), 1)} s, {_fmt(s.get('cpu_s_per_epoch'), 2)} s per epoch (this process, all "
             "its threads: comparable across runs on a loaded machine)",
             f"- wall time: {_fmt(s.get('wall_time_s'), 1)} s (start to end: data, tracing, targets' reference "
             "runs, training, evaluation, checkpoints and exports; a resumed run counts its earlier parts)"]
    if s.get("seed") is not None:
        lines.append(f"- seeds: training {s['seed']}, data {s.get('data_seed', s['seed'])}")
    if tasks and tasks[-1].get("stored_values"):
        last = tasks[-1]
        lines.append(f"- kept between tasks besides the parameters: {last.get('stored_samples', 0):,} samples, "
                     f"{last['stored_values']:,} values in all (memory size {_size(last.get('memory_size'))})")
    if bench:
        lines.append(f"- published numbers: {PAPER[bench]['source']} (same benchmark, their own runs)")
    sections = [
        ("accuracy", "Accuracy per task after the whole stream (%), as in the paper's Tables 1 and 3"),
        ("model_size", "Model size after each task, relative to the full backbone, as in Tables 2 and 4"),
        ("acc_matrix", "Accuracy matrix: test accuracy (%) on each task (columns) after learning each task (rows)"),
        ("tasks", "Per task: growth, parameters, masks and time"),
        ("growth", "Channels added per growth site (coupling group id) and task"),
    ]
    for key, title in sections:
        header, rows = tables[key]
        lines += ["", f"## {title}", "", md_table(header, rows) if rows else "_nothing recorded_",
                  "", f"CSV: [{key}.csv]({key}.csv)"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(out)


def _fmt(v: Any, digits: int) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


# --- plots ------------------------------------------------------------------------------------------------


def _plots(run: dict, out: Path) -> list[str]:
    """acc_matrix.png, model_size.png, final_accuracy.png; drawn on Agg figures (no display needed)."""
    tasks = run["summary"].get("tasks", [])
    if not tasks:
        return []
    made = []
    for name, draw in (("acc_matrix.png", _plot_matrix), ("model_size.png", _plot_size),
                       ("final_accuracy.png", _plot_final)):
        fig = _figure()
        draw(fig, run)
        save_figure(fig, out / name, dpi=120)
        made.append(name)
    return made


def save_figure(fig, path: Path, dpi: int) -> None:
    """A PNG written atomically (rendered in memory, then temp file and rename), like every file grownfx writes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    files.atomic_write_bytes(buf.getvalue(), path)


def _figure():
    from matplotlib.figure import Figure

    return Figure(figsize=(7, 4.5))


MATRIX_SCALE = (0.0, 100.0)


def _plot_matrix(fig, run: dict) -> None:
    import numpy as np

    names = list(run["names"])
    rows = run["matrix"]
    n = max([len(names), len(rows), *map(len, rows)])
    m = np.full((len(rows), n), np.nan)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            m[i, j] = np.nan if v is None else float(v)
    ax = fig.add_subplot()
    # one fixed scale, 0-100 %: a colour means the same accuracy in every report (a scale spanning the data's range
    # painted 97.8 as dark as 10); the cells print their values for the small differences
    lo, hi = MATRIX_SCALE
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    if n <= 20:
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7 if n <= 10 else 5,
                        color="white" if v < lo + 0.55 * (hi - lo) else "black")
    ticks = range(n)
    ax.set_xticks(ticks, [str(j + 1) for j in ticks])
    ax.set_yticks(range(len(rows)), [str(i + 1) for i in range(len(rows))])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    ax.set_title("Accuracy matrix")


def _plot_size(fig, run: dict) -> None:
    tasks = run["summary"]["tasks"]
    x = [i + 1 for i in range(len(tasks))]
    y = [t.get("model_size") or 0.0 for t in tasks]
    ax = fig.add_subplot()
    ax.plot(x, y, marker="o", label="this run")
    grew = [(xi, yi) for xi, yi, t in zip(x, y, tasks) if t.get("grew")]
    if grew:
        ax.scatter(*zip(*grew), marker="*", s=160, color="tab:red", zorder=3, label="grew")
        for xi, yi in grew:
            added = sum((tasks[xi - 1].get("growth") or {}).values())
            ax.annotate(f"+{added} ch", (xi, yi), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    shown = list(y)
    for method, row in published(benchmark_of(run.get("recipe")), RUN_REPORT_ROWS).get("size", {}).items():
        ax.plot(x, row[: len(x)], linestyle="--", color="gray", label=f"{method} (published)")
        shown += [v for v in row[: len(x)] if v is not None]
    if len(x) <= 20:  # two decimals: growth of a few channels moves the size by hundredths
        for xi, yi in zip(x, y):
            ax.annotate(f"{yi:.2f}x", (xi, yi), textcoords="offset points", xytext=(0, -13), ha="center", fontsize=7)
    title = "Model size per task"
    if shown and max(shown) >= 0.6:
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="full backbone")
    elif shown:  # the full backbone's 1.0 far above would flatten the differences: say it, do not draw it
        title += " (full backbone = 1.00x)"
    if shown:
        lo, hi = min(shown + ([1.0] if max(shown) >= 0.6 else [])), max(shown + ([1.0] if max(shown) >= 0.6 else []))
        pad = max(0.01, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(x)
    ax.set_xlabel("after task")
    ax.set_ylabel("parameters stored / full backbone")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _plot_final(fig, run: dict) -> None:
    """Test accuracy per task (after the last task, when learned); beside it, when the run had targets, the
    validation accuracy each task reached against its target: a target is a validation accuracy, so it is drawn
    only against validation accuracies."""
    tasks = run["summary"]["tasks"]
    x = [i + 1 for i in range(len(tasks))]
    targets = [(xi, t["target"]) for xi, t in zip(x, tasks) if t.get("target") is not None]
    if targets:
        fig.set_size_inches(11, 4.5)
    ax = fig.add_subplot(1, 2 if targets else 1, 1)
    final = [t.get("acc_final") or 0.0 for t in tasks]
    learned = [t.get("acc_when_learned") or 0.0 for t in tasks]
    ax.plot(x, final, marker="o", color="tab:blue", linewidth=1.5, label="test, after the last task")
    ax.scatter(x, learned, marker="D", s=22, facecolors="none", edgecolors="tab:orange", zorder=3,
               label="test, when learned")
    _label_points(ax, x, final)
    _finish_axis(ax, x, final + learned, "test accuracy (%)",
                 f"Test accuracy per task (average {_fmt(run['summary'].get('avg_acc'), 2)} %)")
    if targets:
        val = [t.get("val_acc") or 0.0 for t in tasks]
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.plot(x, val, marker="s", color="tab:green", linewidth=1.5, label="validation, when learned")
        ax2.scatter(*zip(*targets), marker="_", s=300, color="black", zorder=3, label="target (validation)")
        _label_points(ax2, x, val)
        _finish_axis(ax2, x, val + [v for _, v in targets], "validation accuracy (%)",
                     "Validation accuracy and target")


def _label_points(ax, x: list[int], values: list[float]) -> None:
    if len(x) <= 20:  # one decimal: the differences that matter are often below a point
        for xi, v in zip(x, values):
            ax.annotate(f"{v:.1f}", (xi, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)


def _finish_axis(ax, x: list[int], values: list[float], ylabel: str, title: str) -> None:
    lo, hi = min(values), max(values)
    pad = max(0.5, 0.12 * (hi - lo))  # the data's range, not 0-100
    ax.set_ylim(max(0.0, lo - pad), min(100.0 + pad, hi + 1.6 * pad))
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(x)
    ax.set_xlabel("task")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)  # never over a point
