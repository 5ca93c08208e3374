"""Issue 27: the fine-grained benchmark's data (`imagefolders`: one ImageFolder per task) and its recipes."""

from pathlib import Path

import pytest

from grownfx.recipe.loading import RecipeError, load_recipe


def _image_folder(root: Path, classes: int, per_class: int = 3, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class + (4 if split == "train" else 0)):
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolders_is_one_task_per_root_with_its_own_classes(tmp_path):
    from grownfx.data import build_stream

    _image_folder(tmp_path / "birds", 3)
    _image_folder(tmp_path / "cars", 2, seed=1)
    cfg = {"name": "imagefolders", "roots": [str(tmp_path / "birds"), str(tmp_path / "cars")], "image_size": 8,
           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "val_fraction": 0.25}
    stream = build_stream(cfg, 0)
    assert [(t.name, t.num_classes, len(t.test)) for t in stream.tasks] == [("birds", 3, 9), ("cars", 2, 6)]
    assert stream.input_shape == (3, 8, 8) and [t["root"] for t in stream.meta["tasks"]] == [
        str(tmp_path / "birds"), str(tmp_path / "cars")]
    assert stream.tasks[1].train.x.shape[1:] == (3, 8, 8) and stream.tasks[1].index == 1


@pytest.mark.parametrize("name", ["vgg16bn_finegrained", "resnet50_finegrained"])
def test_finegrained_recipes_validate_with_their_data_and_refuse_in_one_line_without(tmp_path, monkeypatch, name):
    import grownfx.recipe.loading as loading

    recipe = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml"
    monkeypatch.setattr(loading, "resolve_weights", lambda raw, where, verify: [])  # tested above; 100+ MB here
    monkeypatch.chdir(tmp_path)  # the recipe's data/finegrained/... roots are relative to the working folder
    errors = pytest.raises(RecipeError, load_recipe, recipe).value.lines()
    assert len(errors) == 1 and "data.roots[0]" in errors[0] and "cubs_cropped" in errors[0], errors
    for i, folder in enumerate(["cubs_cropped", "stanford_cars_cropped", "flowers", "wikiart", "sketches"]):
        _image_folder(tmp_path / "data" / "finegrained" / folder, 2, per_class=1, seed=i)
    rec = load_recipe(recipe)
    assert rec.model.weights_task and rec.data.name == "imagefolders" and len(rec.data.roots) == 5
