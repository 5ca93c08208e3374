"""grownfx.recipe.loading: loading, overrides, located errors, built-in recipes, resolved dumps and diffs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from grownfx.recipe.schema import Recipe
from grownfx.recipe.loading import (RecipeError, builtin_recipes_dir, dump_resolved, list_builtin_recipes, load_recipe,
                             recipe_diff, resolve_recipe_path, validate_recipe)

REPO = Path(__file__).resolve().parents[1]
BUILTINS = ["digits_quickstart", "lenet_cifar100_split10", "resnet18_miniimagenet", "vgg16bn_cifar100_superclass20"]

GOOD = """\
name: t
model:
  builder: small_cnn
  seed_width: 0.5
data:
  name: synthetic
  num_tasks: 3
training:
  epochs: 2
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def marked_line(text: str) -> int:
    """1-based line of the `#!` marker: the line the error must point at."""
    lines = [i + 1 for i, line in enumerate(textwrap.dedent(text).splitlines()) if "#!" in line]
    assert len(lines) == 1, "a case marks exactly one line"
    return lines[0]


def errors_of(path: Path, overrides=(), **kw) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides), **kw)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# --- bad recipes: each error names the file, the line and the dotted field -----------------------------------

FILE_CASES = {
    "wrong type": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic}
        training:
          epochs: two   #!
        """, "training.epochs: Input should be a valid integer"),
    "unknown key with suggestion": ("""\
        name: t
        model:
          builder: small_cnn
          seed_widht: 0.5   #!
        data: {name: synthetic}
        """, "model.seed_widht: unknown key 'seed_widht'; did you mean 'seed_width'?"),
    "unknown top-level key": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic}
        trainig:   #!
          epochs: 3
        """, "trainig: unknown key 'trainig'; did you mean 'training'?"),
    "unknown key inside a dataset kind": ("""\
        name: t
        model: {builder: small_cnn}
        data:
          name: synthetic
          num_task: 3   #!
        """, "data.num_task: unknown key 'num_task'; did you mean 'num_tasks'?"),
    "bad model name": ("""\
        name: t
        model:
          builder: resnet19   #!
        data: {name: synthetic}
        """, "model.builder: unknown model builder 'resnet19'; did you mean 'resnet18'?"),
    "torchvision model that is not a classifier": ("""\
        name: t
        model:
          builder: fasterrcnn_resnet50_fpn   #!
        data: {name: synthetic}
        """, "model.builder: 'fasterrcnn_resnet50_fpn' is a torchvision model, but not a classification"),
    "unimportable module:callable": ("""\
        name: t
        model:
          builder: no_such_module_xyz.models:build   #!
        data: {name: synthetic}
        """, "model.builder: cannot import module 'no_such_module_xyz.models'"),
    "module:callable without that attribute": ("""\
        name: t
        model:
          builder: "os.path:no_such_function"   #!
        data: {name: synthetic}
        """, "model.builder: module 'os.path' has no attribute 'no_such_function'"),
    "module:callable that is not callable": ("""\
        name: t
        model:
          builder: "math:pi"   #!
        data: {name: synthetic}
        """, "model.builder: 'math:pi' is a float, not a callable"),
    "seed_width 0": ("""\
        name: t
        model:
          builder: small_cnn
          seed_width: 0   #!
        data: {name: synthetic}
        """, "model.seed_width: Input should be greater than 0 (got 0)"),
    "seed_width 1.5": ("""\
        name: t
        model:
          builder: small_cnn
          seed_width: 1.5   #!
        data: {name: synthetic}
        """, "model.seed_width: Input should be less than or equal to 1 (got 1.5)"),
    "bad device": ("""\
        name: t
        device: gpu   #!
        model: {builder: small_cnn}
        data: {name: synthetic}
        """, "device: device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    "bad data.name": ("""\
        name: t
        model: {builder: small_cnn}
        data:
          name: synthtic   #!
        """, "data.name: unknown dataset 'synthtic'; did you mean 'synthetic'? (valid names: cifar100_split, "),
    "data.name far from any": ("""\
        name: t
        model: {builder: small_cnn}
        data:
          name: imagenet22k   #!
        """, "data.name: unknown dataset 'imagenet22k'; did you mean 'miniimagenet'? (valid names: cifar100_split, "
             "cifar100_superclass, miniimagenet, imagefolder, imagefolders, torchvision, digits, fashion_mnist, "
             "python, huggingface, synthetic)"),
    "missing data.name": ("""\
        name: t
        model: {builder: small_cnn}
        data:   #!
          num_tasks: 3
        """, "data.name: missing; one of: cifar100_split"),
    "bad method.name": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic}
        method:
          name: packnett   #!
        """, "method.name: unknown method 'packnett'; did you mean 'packnet'? (valid names: scratch, finetune, "
             "pnn, grow, packnet, piggyback, cpg, grown, ewc, si, mas, lwf, er, den, apd)"),
    "bad ablation": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic}
        method:
          name: grown
          ablation: lsg   #!
        """, "method.ablation: Input should be 'full', 'grow_only', '+selective_mask', '+lsg' or "
             "'+retrain_released' (got 'lsg')"),
    "malformed target rule": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic}
        target:
          rule: scratch minus 2   #!
        """, "target.rule: target rule 'scratch minus 2' is not a number, 'scratch', 'best(scratch, finetune)' or "
             "one of them minus a margin ('scratch - 1.5')"),
    "target rule of the wrong type": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic}
        target:
          rule: {scratch: 1}   #!
        """, "target.rule: Input should be a valid number, or a valid list, or a valid string"),
    "bad number inside a target list": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic, num_tasks: 2}
        target:
          rule:
            - 50
            - fifty   #!
        """, "target.rule.1: Input should be a valid number, unable to parse string as a number (got 'fifty')"),
    "list of targets with the wrong length": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic, num_tasks: 3}
        target:
          rule: [50, 60]   #!
        """, "target.rule: target.rule lists 2 targets for 3 tasks"),
    "negative epochs": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic}
        training:
          epochs: -1   #!
        """, "training.epochs: Input should be greater than 0 (got -1)"),
    "download: true": ("""\
        name: t
        model: {builder: small_cnn}
        data:
          name: digits
          download: true   #!
        """, "data.download: download must be false: grownfx never downloads datasets"),
    "bad normalisation entry": ("""\
        name: t
        model: {builder: small_cnn}
        data:
          name: digits
          mean:
            - 0.5
            - bad   #!
          std: [0.2, 0.2]
        """, "data.mean.1: Input should be a valid number, unable to parse string as a number (got 'bad')"),
    "missing builder": ("""\
        name: t
        model:   #!
          seed_width: 0.5
        data: {name: synthetic}
        """, "model.builder: Field required"),
    "model is not a mapping": ("""\
        name: t
        model: resnet18   #!
        data: {name: synthetic}
        """, "model: Input should be a valid dictionary or instance of ModelConfig (got 'resnet18')"),
    "YAML syntax error": ("""\
        name: t
        model:
          builder: [small_cnn, x
        data: {name: synthetic}   #!
        """, "YAML syntax error: expected ',' or ']', but got ':', while parsing a flow sequence that "
             "starts at line 3"),
    "YAML indentation error": ("""\
        name: t
        model:
          builder: small_cnn
           seed_width: 0.5   #!
        data: {name: synthetic}
        """, "YAML syntax error: mapping values are not allowed here"),
    "duplicate key": ("""\
        name: t
        model: {builder: small_cnn}
        data: {name: synthetic}
        name: u   #!
        """, "name: duplicate key"),
    "not a mapping": ("""\
        - name: t   #!
        """, "a recipe is a mapping of sections"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_recipe_is_located(tmp_path, case):
    text, expected = FILE_CASES[case]
    path = write(tmp_path, text)
    errors = errors_of(path)
    prefix = f"{path}:{marked_line(text)}: "
    assert any(e.startswith(prefix) and expected in e for e in errors), (prefix + expected, errors)


def test_missing_dataset_root_names_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = """\
        name: t
        model: {builder: lenet5}
        data:
          name: cifar100_split
          root: cifar_here   #!
        """
    write(tmp_path, text)
    errors = errors_of(Path("r.yaml"))
    assert len(errors) == 1
    assert errors[0].startswith(f"r.yaml:{marked_line(text)}: data.root: dataset folder {tmp_path / 'cifar_here'}")
    assert "cifar-100-python" in errors[0]
    assert load_recipe("r.yaml", check_data=False).data.root == Path("cifar_here")


def test_several_errors_in_one_file_are_all_reported_in_line_order(tmp_path):
    path = write(tmp_path, """\
        name: t
        device: tpu
        model:
          builder: resnet19
          seed_widht: 0.5
          seed_width: 1.5
        data:
          name: synthetic
          noise: -1
        training:
          epochs: -2
          batch_size: big
        """)
    errors = errors_of(path)
    expected = [(2, "device:"), (4, "model.builder:"), (5, "model.seed_widht:"), (6, "model.seed_width:"),
                (9, "data.noise:"), (11, "training.epochs:"), (12, "training.batch_size:")]
    assert [e.split(": ")[0:2] for e in errors] == [[f"{path}:{line}", field.rstrip(":")] for line, field in expected]


def test_top_level_missing_sections(tmp_path):
    errors = errors_of(write(tmp_path, "description: nothing else\n"))
    assert sorted(e.split(": ")[1] for e in errors) == ["data", "model", "name"]
    assert all("Field required" in e for e in errors)


# --- overrides ------------------------------------------------------------------------------------------------


def test_overrides_set_delete_and_add(tmp_path):
    path = write(tmp_path, GOOD.replace("  seed_width: 0.5\n", "  seed_width: 0.5\n  kwargs: {width: 8}\n"))
    base = load_recipe(path)
    assert base.model.kwargs == {"width": 8} and base.training.epochs == 2
    r = load_recipe(path, ["training.epochs=3", "~model.kwargs", "training.optimizer.lr=0.1",
                           "target.rule=[50, 60, 70]"])
    assert r.training.epochs == 3 and r.model.kwargs == {} and r.training.optimizer.lr == 0.1
    assert r.target.rule == [50, 60, 70]
    r = load_recipe(path, ["model.kwargs={width: 16, hidden: 32}"])
    assert r.model.kwargs == {"width": 16, "hidden": 32}
    r = load_recipe(path, ["+model.kwargs.hidden=32", "model.kwargs.width=4"])
    assert r.model.kwargs == {"width": 4, "hidden": 32}
    r = load_recipe(path, ["data={name: digits, classes_per_task: 5}", "+model.granularity=element"])
    assert r.data.name == "digits" and r.data.classes_per_task == 5 and r.model.granularity == "element"


OVERRIDE_CASES = {
    "training.epochs=0": "training.epochs: Input should be greater than 0 (got 0)",
    "model.seed_width=2": "model.seed_width: Input should be less than or equal to 1 (got 2)",
    "training.epoch=3": "training.epoch: unknown key 'epoch'; did you mean 'epochs'?",
    "+model.seed_widht=0.3": "model.seed_widht: unknown key 'seed_widht'; did you mean 'seed_width'?",
    "training.epochs": "missing '=value'",
    "=3": "cannot parse",
    "~training.epochs=3": "~training.epochs deletes a key and takes no value",
    "~model.kwargs": "model.kwargs is not set in the recipe, nothing to delete",
    "+model.seed_width=0.3": "model.seed_width is already set; drop the '+' to change it",
    "model.kwargs.depth=3": "model.kwargs has no key 'depth'; add it with '+model.kwargs.depth=3'",
    "training.epochs=[1": "value '[1' is not valid YAML",
    "model.builder.x=1": "model.builder is a str ('small_cnn'), not a mapping",
    "data.name=cifar": "data.name: unknown dataset 'cifar'",
    "method.name=grwn": "method.name: unknown method 'grwn'; did you mean 'grown'?",
    "model.builder=resnet19": "model.builder: unknown model builder 'resnet19'",
    "~name": "name: Field required",
}


@pytest.mark.parametrize("override", list(OVERRIDE_CASES))
def test_bad_override_is_located(tmp_path, override):
    errors = errors_of(write(tmp_path, GOOD), [override])
    assert any(e.startswith(f"override {override!r}: ") and OVERRIDE_CASES[override] in e for e in errors), errors


def test_file_and_override_errors_are_reported_together(tmp_path):
    path = write(tmp_path, GOOD.replace("epochs: 2", "epochs: -2"))
    errors = errors_of(path, ["model.seed_width=3", "bogus"])
    assert errors[0].startswith(f"{path}:9: training.epochs:")
    assert errors[1].startswith("override 'model.seed_width=3': model.seed_width:")
    assert errors[2].startswith("override 'bogus': missing '=value'")


def test_a_failed_override_leaves_nothing_behind(tmp_path):
    errors = errors_of(write(tmp_path, GOOD), ["newsection.sub=[1", "model.kwargs.depth=3"])
    assert len(errors) == 2 and all(e.startswith("override ") for e in errors), errors


def test_an_override_fixes_a_file_error(tmp_path):
    path = write(tmp_path, GOOD.replace("epochs: 2", "epochs: -2"))
    assert load_recipe(path, ["training.epochs=4"]).training.epochs == 4


# --- built-in recipes, dumps and diffs --------------------------------------------------------------------------


def test_builtin_recipes_load():
    assert set(BUILTINS) <= set(list_builtin_recipes())
    assert all(list_builtin_recipes()[n] for n in BUILTINS), "every built-in recipe has a description"
    for name in BUILTINS:
        recipe = load_recipe(name, check_data=False)
        assert recipe.name == name
        assert resolve_recipe_path(name) == builtin_recipes_dir() / f"{name}.yaml"
    assert load_recipe("digits_quickstart").data.name == "digits"  # needs no files: checked for real
    assert load_recipe("digits_quickstart.yaml").name == "digits_quickstart"


def test_builtin_recipes_follow_the_seed_paper():
    lenet = load_recipe("lenet_cifar100_split10", check_data=False)
    assert (lenet.model.builder, lenet.model.seed_size, lenet.data.num_tasks, lenet.data.val_per_task) == \
        ("lenet5", 0.45, 10, 1000)
    assert (lenet.training.epochs, lenet.training.batch_size, lenet.training.optimizer.name,
            lenet.training.optimizer.lr, lenet.target.rule) == (20, 32, "adam", 1e-3, "best(scratch, finetune)")
    vgg = load_recipe("vgg16bn_cifar100_superclass20", check_data=False)
    opt = vgg.training.optimizer
    assert (vgg.model.builder, vgg.model.seed_size, vgg.data.num_tasks) == ("vgg16_bn_cifar", 0.25, 20)
    assert (opt.name, opt.lr, opt.nesterov, opt.weight_decay) == ("sgd", 1e-2, True, 4e-5)
    assert (vgg.training.scheduler, vgg.training.milestones, vgg.training.epochs) == ("step", [0.5, 0.8], 100)
    res = load_recipe("resnet18_miniimagenet", check_data=False)
    assert (res.model.builder, res.data.num_tasks, res.data.classes_per_task, res.data.image_size) == \
        ("resnet18", 20, 5, 84)
    assert str(res.data.root) == "data/miniimagenet"


def test_vgg_fashion_recipe_keeps_the_lenet_low_data_stream_and_pads_to_32():
    import torch
    from grownfx.models import build_backbone

    vgg = load_recipe("vgg16bn_fashion_split5_lowdata", check_data=False)
    lenet = load_recipe("lenet_fashion_split5_lowdata", check_data=False)
    assert vgg.data.model_dump(exclude={"pad_to"}) == lenet.data.model_dump(exclude={"pad_to"})
    assert (vgg.data.pad_to, vgg.model.builder, vgg.model.kwargs, vgg.model.seed_size) == \
        (32, "vgg16_bn_cifar", {"in_channels": 1}, 0.3)
    assert vgg.target.rule == lenet.target.rule == "best(scratch, finetune) - 0.5"
    net = build_backbone(vgg.model.builder, 2, vgg.model.kwargs)  # 1x32x32 pools to 512x1x1
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


def test_resnet_fashion_recipe_keeps_the_lenet_low_data_stream_in_rgb():
    import torch
    from grownfx.models import build_backbone

    res = load_recipe("resnet18_fashion_split5_lowdata", check_data=False)
    lenet = load_recipe("lenet_fashion_split5_lowdata", check_data=False)
    assert res.data.model_dump(exclude={"pad_to", "channels"}) == lenet.data.model_dump(exclude={"pad_to", "channels"})
    assert (res.data.pad_to, res.data.channels, res.model.builder) == (32, 3, "resnet18")
    assert res.target.rule == lenet.target.rule
    net = build_backbone(res.model.builder, 2, res.model.kwargs)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 2)


def test_builtin_recipes_that_need_data_say_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in BUILTINS[1:]:
        with pytest.raises(RecipeError) as info:
            load_recipe(name)
        assert any("data.root: dataset folder " + str(tmp_path / "data") in e for e in info.value.errors)


def test_unknown_recipe_lists_builtins():
    with pytest.raises(RecipeError, match="digits_quickstart"):
        load_recipe("no_such_recipe_anywhere")


def test_dump_resolved_round_trips(tmp_path):
    recipe = load_recipe("vgg16bn_cifar100_superclass20", check_data=False)
    text = dump_resolved(recipe)
    assert "eval_batch_size: 256" in text  # defaults filled in
    again = load_recipe(write(tmp_path, text), check_data=False)
    assert again == recipe and recipe_diff(recipe, again) == []


def test_recipe_diff():
    a = load_recipe("digits_quickstart")
    b = load_recipe("digits_quickstart", ["training.epochs=3", "+model.kwargs.width=8", "training.milestones=[0.3]"])
    assert recipe_diff(a, b) == ["model.kwargs.width", "training.epochs", "training.milestones"]
    c = load_recipe("digits_quickstart", ["data={name: synthetic, num_tasks: 5}"])
    diff = recipe_diff(a, c)
    assert "data.name" in diff and "data.noise" in diff and "data.test_fraction" in diff
    assert recipe_diff(a.model_dump(mode="json"), a) == []


def test_validate_recipe_on_a_dict():
    raw = yaml.safe_load(GOOD)
    assert isinstance(validate_recipe(raw), Recipe)
    with pytest.raises(RecipeError, match=r"^<recipe>: training.epochs: Input should be greater than 0"):
        validate_recipe({**raw, "training": {"epochs": 0}})
    assert raw["training"] == {"epochs": 2}, "the caller's dict is not modified"


def test_pyproject_lists_every_package():
    """`packages` is an explicit list (find cannot map recipes/ to grownfx.builtin_recipes): keep it complete."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    # cli/ installs as grownfx.cli (package-dir), so it is listed under that name
    on_disk = {".".join(p.parent.relative_to(REPO).parts).replace("cli", "grownfx.cli", top == "cli")
               for top in ("grownfx", "cli") for p in (REPO / top).rglob("__init__.py")}
    assert on_disk - listed == set(), f"add to pyproject's packages: {sorted(on_disk - listed)}"
    assert config["package-dir"]["grownfx.builtin_recipes"] == "recipes"
    assert config["package-dir"]["grownfx.cli"] == "cli", "the CLI installs inside grownfx, never as a top-level `cli`"
    assert "cli" not in listed
    assert "*.yaml" in config["package-data"]["grownfx.builtin_recipes"]
    assert (REPO / "recipes" / "__init__.py").is_file()
