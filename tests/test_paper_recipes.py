"""The three paper recipes start and learn on tiny datasets written in the real on-disk formats."""

import json

import pytest

from grownfx.recipe.loading import load_recipe
from grownfx.run.runner import run
from test_data import write_cifar100, write_miniimagenet

FAST = ["training.epochs=1", "training.stage2_epochs=1", "target.rule=30.0", "growth.max_rounds=1",
        "output.tensorboard=false", "output.export_format=none"]


@pytest.mark.parametrize("name,data", [
    ("lenet_cifar100_split10", ["data.num_tasks=10", "data.val_per_task=10"]),
    ("vgg16bn_cifar100_superclass20", ["data.num_tasks=2", "model.seed_width=0.125"]),
    ("resnet18_miniimagenet", ["data.num_tasks=2", "data.train_per_class=6", "data.test_per_class=2"]),
])
def test_paper_recipe_runs_on_real_format_files(tmp_path, name, data):
    if "miniimagenet" in name:
        root = tmp_path / "mini"
        root.mkdir()
        write_miniimagenet(root, classes=10, per_class=8)
    else:
        root = tmp_path
        write_cifar100(root)
    overrides = [f"data.root={root}", f"output.dir={tmp_path / 'run'}", *FAST, *data]
    recipe = load_recipe(name, overrides)
    result = run(recipe, echo=lambda m: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(result.acc_matrix) == recipe.data.num_tasks == len(summary["tasks"])
    assert summary["bwt"] == 0.0 and summary["tasks"][0]["params_stored"] > 0
