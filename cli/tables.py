"""The tables the command line prints: a run's results, a recipe's summary, a comparison's methods."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.markup import escape
from rich.table import Table


def results_table(summary: dict) -> Table:
    """Per task: accuracy when learned and at the end, the target, growth, model size, time."""
    from rich import box

    # no vertical rules and short headers: ten-task streams with long task names fit 80 columns uncut
    table = Table(title=f"{escape(summary['name'])} ({escape(summary['method'])}): average {summary['avg_acc']:.2f} %, "
                        f"BWT {summary['bwt']:+.2f}", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="accuracy %; learned: test when learned; final: after the last task")
    width = max([len(str(t["name"])) for t in summary["tasks"]] + [4])
    for col in ("task", "val", "target", "learned", "final", "growth", "size", "time"):
        if col == "task":  # never cut a task name to "digits/…"
            table.add_column(col, no_wrap=True, min_width=width)
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for t in summary["tasks"]:
        target = "" if t.get("target") is None else f"{t['target']:.1f}"
        grew = f"+{sum(t['growth'].values())} ch" if t.get("growth") else "-"
        size = "" if t.get("model_size") is None else f"{t['model_size']:.2f}x"
        table.add_row(escape(str(t["name"])), f"{t['val_acc']:.1f}", target, f"{t['acc_when_learned']:.1f}",
                      f"{t['acc_final']:.1f}", grew, size, f"{t['time_s']:.1f}s")
    return table


def summary_table(rec) -> Table:
    d = rec.data
    tasks = getattr(d, "num_tasks", None)
    if tasks is None and getattr(d, "classes_per_task", None) and d.name == "digits":
        tasks = 10 // d.classes_per_task
    method = rec.method.name + (f" ({rec.method.ablation})" if hasattr(rec.method, "ablation") else "")
    kwargs = f" {rec.model.kwargs}" if rec.model.kwargs else ""
    table = Table(title=escape(rec.name), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("model", f"{rec.model.builder}{kwargs}"),
            ("data", d.name + (f" ({d.root})" if getattr(d, "root", None) else "")), ("method", method),
            ("tasks", "auto" if tasks is None else str(tasks)), ("seed width", f"{rec.model.seed_width}"),
            ("target", str(rec.target.rule)),
            ("training", f"{rec.training.epochs} epochs, batch {rec.training.batch_size}, "
                         f"{rec.training.optimizer.name} lr {rec.training.optimizer.lr:g}"
                         + (f", equal budget {rec.training.epoch_budget} epochs per task"
                            if rec.training.epoch_budget else "")),
            ("device", rec.device), ("output", rec.output.dir.format(name=rec.name))]
    for k, v in rows:
        table.add_row(k, escape(v))
    return table


def compare_table(folder: Path) -> Optional[Table]:
    """Per method, over its seeds: average accuracy, BWT, final model size and wall time, read from the runs'
    summary.json (the report's tables, in short)."""
    import statistics

    from rich import box

    from grownfx.files import CorruptFileError
    from grownfx.report.formats import CompareIndex, Summary, read_model

    try:
        index = read_model(folder / "compare.json", CompareIndex)
        rows: dict[str, list[dict]] = {}
        for entry in index["runs"]:
            path = folder / entry["dir"] / "summary.json"
            if entry.get("status") == "ok" and path.is_file():
                rows.setdefault(entry["method"], []).append(read_model(path, Summary))
    except CorruptFileError:
        return None
    if not rows:
        return None

    def stat(values: list, fmt: str, unit: str = "") -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        mean = format(statistics.fmean(values), fmt) + unit
        return mean + (f" ± {format(statistics.stdev(values), fmt)}{unit}" if len(values) > 1 else "")

    from grownfx.report.compare_report import seeds_line

    table = Table(title=f"{escape(index.get('recipe', folder.name))}: {escape(seeds_line(index))}",
                  box=box.SIMPLE_HEAD, pad_edge=False, caption="mean ± std over runs; accuracy: test, after the "
                  "last task; size: of the full backbone (memory: with the values kept between tasks); CPU: "
                  "process seconds per epoch")
    for col in ("method", "average %", "BWT", "size", "memory", "CPU/epoch", "wall time"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for method in index.get("methods", rows):
        runs = rows.get(method)
        if not runs:
            continue
        sizes = [(r.get("tasks") or [{}])[-1].get("model_size") for r in runs]
        memory = [(r.get("tasks") or [{}])[-1].get("memory_size") for r in runs]
        table.add_row(escape(method), stat([r.get("avg_acc") for r in runs], ".2f"),
                      stat([r.get("bwt") for r in runs], "+.2f"), stat(sizes, ".2f", "x"), stat(memory, ".2f", "x"),
                      stat([r.get("cpu_s_per_epoch") for r in runs], ".2f", "s"),
                      stat([r.get("wall_time_s") for r in runs], ".1f", "s"))
    return table
