"""Issue 21: one target rule (grownfx/run/targets.py), the same through `grownfx run` and `grownfx compare`.

The reference trainings are replaced by known accuracies; the targets each path hands the method are checked
against the rule worked out by hand here.
"""

import json

import pytest

from grownfx.recipe.schema import Recipe
from grownfx.run import targets
from grownfx.run.compare import run_compare
from grownfx.run.runner import run

SCRATCH = [71.25, 64.5]  # the references each task would get, instead of training them
FINETUNE = [80.0, 60.0]
# worked out by hand from the rule: scratch - 1 / max(scratch, finetune) - 0.5 per task
EXPECTED = {"scratch - 1.0": [70.25, 63.5], "best(scratch, finetune) - 0.5": [79.5, 64.0]}


def recipe(tmp_path, rule) -> Recipe:
    return Recipe.model_validate({
        "name": "targets", "seed": 0,
        "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 8, "hidden": 16}},
        "data": {"name": "digits", "num_tasks": 2, "limit_per_task": 120},
        "method": {"name": "grown"}, "growth": {"max_rounds": 0},
        "target": {"rule": rule},
        "training": {"epochs": 1, "precise_bn": False},
        "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False, "export_format": "none"},
    })


@pytest.fixture
def references(monkeypatch):
    trained = []
    monkeypatch.setattr(targets, "scratch_accuracy",
                        lambda recipe, task, device, dist=None, on_epoch=None:
                        trained.append(task.index) or SCRATCH[task.index])
    # like the real one: fine-tune's validation accuracy on each task of the recipe it is given
    monkeypatch.setattr(targets, "finetune_references",
                        lambda recipe, on_epoch=None: FINETUNE[:recipe.data.num_tasks])
    return trained


@pytest.mark.parametrize("rule", list(EXPECTED))
def test_run_and_compare_give_the_rule_s_targets(tmp_path, references, rule):
    result = run(recipe(tmp_path / "run", rule), echo=lambda m: None)
    assert [t["target"] for t in result.summary["tasks"]] == EXPECTED[rule]
    assert references == [0, 1]  # one reference per task, trained once

    out = run_compare(recipe(tmp_path / "cmp", rule), ["grown"], seeds=[0], out_dir=tmp_path / "cmp" / "compare")
    index = json.loads((out / "compare.json").read_text())
    assert index["targets"]["0"]["values"] == EXPECTED[rule]
    grown = json.loads((out / "grown/seed0/summary.json").read_text())
    assert [t["target"] for t in grown["tasks"]] == EXPECTED[rule]


def test_numbers_and_lists_need_no_reference():
    assert targets.task_target(90, 1) == 90.0 and targets.task_target([50.0, 60.5], 1) == 60.5
    with pytest.raises(ValueError, match="needs the reference accuracy of task 2"):
        targets.task_target("scratch - 1", 1)
