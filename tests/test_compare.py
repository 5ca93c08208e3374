"""`run_compare` and `write_compare_report`: folders, shared targets, the paper's tables, plots."""

import csv
import json

import pytest
import yaml

from grownfx.run.compare import method_config, run_compare, run_folder, slug
from grownfx.report.compare_report import compare_tables, load_compare, write_compare_report
from grownfx.report.paper import PAPER
from grownfx.recipe.schema import Recipe

METHODS = ["finetune", "grown[grow_only]", "grown[+selective_mask]", "scratch"]


def base(tmp_path) -> Recipe:
    return Recipe.model_validate({
        "name": "cmp", "seed": 0,
        "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 8, "hidden": 16}, "seed_width": 0.5},
        "data": {"name": "digits", "num_tasks": 3},
        "method": {"name": "packnet", "prune_ratio": 0.3},
        "growth": {"max_rounds": 1},
        "target": {"rule": "scratch - 1.0"},
        "training": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05}},
        "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False, "export_format": "none"},
    })


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    out = run_compare(base(tmp), METHODS, seeds=[0, 1], out_dir=tmp / "compare")
    return out, write_compare_report(out)


def test_one_run_folder_per_method_and_seed(compared):
    out, _ = compared
    index = json.loads((out / "compare.json").read_text())
    assert index["methods"][0] == "scratch"  # scratch first: its accuracies are the targets
    assert len(index["runs"]) == 8 and all(r["status"] == "ok" for r in index["runs"])
    # --seeds varies the training seed only: every run has the recipe's data seed (its seed, 0)
    assert index["seeds"] == [0, 1] and index["data_seeds"] == [0] and {r["data_seed"] for r in index["runs"]} == {0}
    for r in index["runs"]:
        summary = json.loads((out / r["dir"] / "summary.json").read_text())
        assert len(summary["tasks"]) == 3 and r["dir"] == f"{slug(r['method'])}/{run_folder(r['seed'], 0)}"
        assert (summary["seed"], summary["data_seed"], summary["complete"]) == (r["seed"], 0, True)
    resolved = yaml.safe_load((out / "grown-plus_selective_mask/seed1-data0/config.resolved.yaml").read_text())
    assert resolved["seed"] == 1 and resolved["method"]["ablation"] == "+selective_mask"
    assert resolved["training"]["epochs"] == 2 and resolved["data"] == {**index["recipe_config"]["data"], "seed": 0}
    # the same data for both training seeds: the streams' sample ids agree
    streams = [json.loads((out / "scratch" / run_folder(s, 0) / "stream.json").read_text()) for s in (0, 1)]
    assert streams[0]["tasks"] == streams[1]["tasks"]


def test_scratch_accuracies_are_the_targets_of_grown(compared):
    out, _ = compared
    index = json.loads((out / "compare.json").read_text())
    for seed, key in ((0, "0"), (1, "1-data0")):
        folder = run_folder(seed, 0)
        scratch = json.loads((out / f"scratch/{folder}/summary.json").read_text())
        expected = [t["val_acc"] - 1.0 for t in scratch["tasks"]]
        assert index["targets"][key] == {"values": expected, "source": "scratch run", "seed": seed, "data_seed": 0}
        grown = json.loads((out / f"grown-grow_only/{folder}/summary.json").read_text())
        assert [t["target"] for t in grown["tasks"]] == expected
        metrics = (out / f"grown-grow_only/{folder}/metrics.jsonl").read_text()
        assert "scratch_reference" not in metrics  # not trained a second time


def test_report_tables_match_the_runs(compared):
    out, report = compared
    for name in ("compare.md", "accuracy.csv", "model_size.csv", "summary.csv", "ablation.csv", "runs.csv",
                 "accuracy_per_task.png", "model_size.png", "accuracy_vs_size.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    runs = {m: [json.loads((out / slug(m) / run_folder(k, 0) / "summary.json").read_text()) for k in (0, 1)]
            for m in METHODS}
    acc = {r[0]: r for r in rows(report / "accuracy.csv")}
    assert acc["Method"] == ["Method", "1", "2", "3", "Avg", "Model size", "Epochs/task"]
    for m in METHODS:
        finals = [s["tasks"][1]["acc_final"] for s in runs[m]]
        mean = sum(finals) / 2
        assert acc[m][2].startswith(f"{mean:.1f} ± "), (m, acc[m], finals)
        assert acc[m][4].startswith(f"{(runs[m][0]['avg_acc'] + runs[m][1]['avg_acc']) / 2:.2f}")
    size = {r[0]: r for r in rows(report / "model_size.csv")}
    assert size["scratch"][1:] == ["1.00x ± 0.00", "2.00x ± 0.00", "3.00x ± 0.00"]
    summary = {r[0]: r for r in rows(report / "summary.csv")}
    assert summary["scratch"][1] == "2" and summary["scratch"][3] == "0.00 ± 0.00"
    bwt = [s["bwt"] for s in runs["finetune"]]
    assert summary["finetune"][3].startswith(f"{sum(bwt) / 2:.2f}")
    ablation = rows(report / "ablation.csv")
    assert [r[0] for r in ablation] == ["Method", "Grow only", "+Sel-mask"]
    delta = [(runs["grown[+selective_mask]"][k]["tasks"][2]["acc_final"]
              - runs["grown[grow_only]"][k]["tasks"][2]["acc_final"]) for k in (0, 1)]
    assert ablation[2][3] == f"{sum(delta) / 2:+.1f}"
    per_run = rows(report / "runs.csv")
    assert len(per_run) == 1 + 4 * 2 * 3
    md = (report / "compare.md").read_text()
    assert "(published)" not in md and "Table 5" in md


def test_a_second_call_reuses_finished_runs_and_keeps_the_others(compared):
    out, _ = compared
    run_compare(base(out), ["scratch", "finetune"], seeds=[0], out_dir=out)
    index = json.loads((out / "compare.json").read_text())
    again = {(r["method"], r["seed"]) for r in index["runs"] if r.get("reused")}
    assert again == {("scratch", 0), ("finetune", 0)}
    assert len(index["runs"]) == 8 and index["methods"] == ["scratch", *[m for m in METHODS if m != "scratch"]]


def test_method_names_and_the_recipes_own_settings(tmp_path):
    r = base(tmp_path)
    assert method_config(r, "packnet") == r.method.model_dump(mode="json")  # the recipe's prune_ratio kept
    assert method_config(r, "grown[+lsg]")["ablation"] == "+lsg"
    assert method_config(r, "cpg") == {"name": "cpg"}
    for bad in ("dna", "grown[everything]", "pnn[+lsg]"):
        with pytest.raises(ValueError):
            method_config(r, bad)


def test_published_numbers_appear_on_the_papers_streams(compared):
    out, _ = compared
    data = load_compare(out)
    data["benchmark"] = "cifar100_superclass20"
    n = data["num_tasks"]
    paper = PAPER["cifar100_superclass20"]
    tables = compare_tables(data)
    # every published row of the benchmark, cut to the stream's tasks, beside ours (values from the one table)
    acc = {r[0]: r[1:] for r in tables["accuracy"][1] if r[0].endswith("(published)")}
    assert set(acc) == {f"{m} (published)" for m in paper["acc"]}
    for m, (row, avg, size) in paper["acc"].items():
        assert acc[f"{m} (published)"] == [*row[:n], f"{avg:.2f}", f"{size:.1f}x", ""]
    # Table 5: the first published row absolute, the others signed deltas
    abl = {r[0]: r[1:] for r in tables["ablation"][1] if r[0].endswith("(published)")}
    assert set(abl) == {f"{label} (published)" for label, _, _ in paper["ablation"]}
    first, delta = paper["ablation"][0], paper["ablation"][2]
    assert abl[f"{first[0]} (published)"][0] == f"{first[1][0]:.1f}"
    assert abl[f"{delta[0]} (published)"][-1] == f"{delta[2]:+.1f}"
    # not the paper's stream: no published rows
    data["benchmark"] = None
    assert not [r for r in compare_tables(data)["accuracy"][1] if r[0].endswith("(published)")]
