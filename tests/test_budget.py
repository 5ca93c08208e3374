"""Equal-budget mode (`training.epoch_budget`, `grownfx compare --equal-budget N`): every method's recorded epochs
per task are exactly N; without it each method keeps its own schedule."""

import json

import pytest

from grownfx.learn.budget import split_two
from grownfx.recipe.schema import Recipe, TrainingConfig
from grownfx.report.compare_report import write_compare_report
from grownfx.run.compare import run_compare, slug

ALL = ["scratch", "finetune", "finetune[forgetting]", "pnn", "grow", "packnet", "piggyback", "cpg", "grown",
       "grown[+lsg]", "ewc", "si", "mas", "lwf", "er", "apd"]


def recipe(tmp_path) -> Recipe:
    return Recipe.model_validate({
        "name": "budget", "seed": 0, "device": "cpu",
        "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 8, "hidden": 16}, "seed_width": 0.5},
        "data": {"name": "digits", "num_tasks": 2, "limit_per_task": 24},
        "growth": {"max_rounds": 1},
        "target": {"rule": 100.0},  # never met: GROWN and CPG grow (and GROWN's task 1 tunes what is left)
        "training": {"epochs": 4, "batch_size": 16, "num_threads": 1},
        "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False, "export_format": "none"},
    })


def epochs_per_task(out, spec: str) -> list[int]:
    summary = json.loads((out / slug(spec) / "seed0" / "summary.json").read_text())
    return [t["epochs"] for t in summary["tasks"]]


@pytest.mark.parametrize("budget", [3])
def test_equal_budget_gives_every_method_the_same_epochs(tmp_path, budget):
    out = run_compare(recipe(tmp_path), ALL, seeds=[0], out_dir=tmp_path / "eq", equal_budget=budget)
    got = {spec: epochs_per_task(out, spec) for spec in ALL}
    assert got == {spec: [budget, budget] for spec in ALL}
    report = write_compare_report(out)
    assert f"every method trained {budget} epochs per task" in (report / "compare.md").read_text()
    accuracy = (report / "accuracy.csv").read_text().splitlines()
    assert accuracy[0].endswith("Epochs/task") and all(row.endswith(f"{budget}.0") for row in accuracy[1:])


def test_without_a_budget_methods_keep_their_own_schedules(tmp_path):
    specs = ["scratch", "packnet", "grown", "cpg"]
    out = run_compare(recipe(tmp_path), specs, seeds=[0], out_dir=tmp_path / "own")
    got = {spec: epochs_per_task(out, spec) for spec in specs}
    assert got["scratch"] == [4, 4]
    assert got["packnet"] == [6, 6]  # 4 train + 2 retrain (half the epochs)
    assert got["grown"][1] == 8  # stage 1 + one growth round of `epochs`
    assert got["cpg"][0] > 4  # pick, a widening round, compaction levels


def test_a_two_phase_split_keeps_the_methods_ratio():
    assert split_two(TrainingConfig(epochs=20), 10) == (20, 10)
    assert split_two(TrainingConfig(epochs=20, epoch_budget=9), 10) == (6, 3)
    assert split_two(TrainingConfig(epochs=20, epoch_budget=1), 10) == (1, 0)
