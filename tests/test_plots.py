"""Report and comparison plots show differences (issue 15): axes scaled to the data, whole task ticks, one
distinct style per method with a colour per method family."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from grownfx.report import compare_report as cr
from grownfx.report import run_report as rr

METHODS = ["scratch", "finetune", "pnn", "grow", "packnet", "piggyback", "cpg", "grown", "grown[grow_only]",
           "grown[+selective_mask]", "grown[+lsg]", "grown[+retrain_released]"]


def _compare_data(spread: float = 1.0) -> dict:
    """12 methods close to each other; `finetune` falls by `spread` points over the stream (forgetting)."""
    def run(base: float, size: float, fall: float) -> dict:
        tasks = [{"acc_final": base - fall * (4 - k) / 4, "model_size": size * (1 + k / 10)} for k in range(5)]
        return {"summary": {"tasks": tasks, "avg_acc": sum(t["acc_final"] for t in tasks) / 5}}

    return {"methods": {m: [run(99.0 - i * 0.1, 0.3 + i * 0.4, spread if m == "finetune" else 1.0),
                            run(98.8 - i * 0.1, 0.3 + i * 0.4, spread if m == "finetune" else 1.0)]
                        for i, m in enumerate(METHODS)}, "num_tasks": 5, "benchmark": None}


def test_every_method_has_its_own_style_and_families_share_a_colour():
    styles = cr.method_styles(METHODS)
    triples = {(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(triples) == len(METHODS)
    assert len({s["marker"] for s in styles.values()}) == len(METHODS)  # apart in grey scale too
    grown = [styles[m] for m in METHODS if m.startswith("grown")]
    assert grown[0]["color"] == (0.0, 0.0, 0.0) and all(max(s["color"]) == min(s["color"]) for s in grown)
    others = [styles[m]["color"] for m in METHODS if not m.startswith("grown")]
    assert len(set(others)) == len(others)
    # the ablation rows follow grown in the legend, whatever order they were given in
    assert cr._ordered(["grown[+lsg]", "scratch", "grown", "pnn"]) == ["grown[+lsg]", "grown", "scratch", "pnn"]


def test_compare_accuracy_axis_fits_the_data_and_ticks_are_whole_tasks():
    fig = Figure()
    ax = fig.add_subplot()
    cr._plot_accuracy(ax, _compare_data())
    lo, hi = ax.get_ylim()
    assert 95 < lo < 97.5 and 99 < hi <= 100.5, (lo, hi)  # not 0-100
    assert list(ax.get_xticks()) == [1, 2, 3, 4, 5]
    assert cr._accuracy_zoom(_compare_data()) is None  # a close race already fills the axis
    lo, hi = cr._accuracy_zoom(_compare_data(spread=40))  # finetune's 40-point fall would flatten the others
    assert 96 < lo < 98 and abs(hi - 98.9) < 1e-9  # the best mean
    fig = Figure()
    ax = fig.add_subplot()
    cr._plot_accuracy(ax, _compare_data(spread=40), zoom=(lo, hi))
    assert "finetune" not in [t.get_label() for t in ax.containers] and ax.get_ylim()[0] > 95


def test_compare_plots_are_written(tmp_path):
    made = cr._plots(_compare_data(spread=40), tmp_path)
    assert made == ["accuracy_per_task.png", "model_size.png", "accuracy_vs_size.png"]
    assert all((tmp_path / m).stat().st_size > 10_000 for m in made)


def test_run_accuracy_plots_fit_the_data_with_one_decimal(tmp_path):
    from tests.test_report import make_run

    run = rr.read_run(make_run(Path(tmp_path) / "run"))
    fig = Figure()
    rr._plot_final(fig, run)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo > 40 and hi < 75, (lo, hi)  # final accuracies 51.5-64.2: the axis shows them, not 0-100
    assert {t.get_text() for t in ax.texts} == {"59.0", "51.5", "64.2"}
    fig = Figure()
    rr._plot_matrix(fig, run)
    assert "59.5" in {t.get_text() for t in fig.axes[0].texts}
    # the matrix's colours: one fixed 0-100 scale (issue 26), the values printed in the cells for the details
    assert fig.axes[0].images[0].get_clim() == (0.0, 100.0)


def test_run_model_size_plot_fits_small_sizes(tmp_path):
    from tests.test_report import make_run

    run = rr.read_run(make_run(Path(tmp_path) / "run"))
    sizes = [t["model_size"] for t in run["summary"]["tasks"]]
    fig = Figure()
    rr._plot_size(fig, run)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= min(sizes) and max(sizes) <= hi
    labels = {t.get_text() for t in ax.texts}
    assert {f"{s:.2f}x" for s in sizes} <= labels
    if max(sizes) < 0.6:  # the full backbone's 1.0 would flatten them: named in the title instead
        assert hi < 1.0 and "full backbone = 1.00x" in ax.get_title()
