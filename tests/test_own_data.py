"""Your own data from Python (`data: {name: python, factory: ...}`): any input rank, arrays, tensors and Datasets,
the same splits, subsets and seeds as the built-in kinds, and the worked examples of docs/data.md end to end."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import grownfx
from grownfx.data import DatasetError, build_stream
from grownfx.run.results import UntrustedCodeError
from grownfx.recipe.loading import load_recipe
from cli_helpers import invoke

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples" / "own_data"


def write_factory(folder: Path, module: str, body: str) -> str:
    """A factory module `module`.py in `folder`; returns its 'module:make' spec."""
    (folder / f"{module}.py").write_text("import numpy as np\n\n" + textwrap.dedent(body))
    return f"{module}:make"


def blobs(rank_shape: tuple, n_per_class: int = 12, classes: int = 2, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = (rng.standard_normal((len(y), *rank_shape)) + y.reshape(-1, *[1] * len(rank_shape))).astype(dtype)
    return x, y


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _python(spec: str, **kw) -> dict:
    return {"name": "python", "factory": spec, **kw}


@pytest.mark.parametrize("shape", [(5,), (2, 9), (3, 4, 4), (2, 3, 4, 4)])
def test_any_input_rank_is_normalised_per_channel(factory_dir, shape):
    x, y = blobs(shape, n_per_class=30)
    np.save(factory_dir / "x.npy", x)
    np.save(factory_dir / "y.npy", y)
    spec = write_factory(factory_dir, f"rank{len(shape)}", """
        def make():
            x, y = np.load("x.npy"), np.load("y.npy")
            return [{"train": (x, y), "test": (x[::3], y[::3]), "classes": ["a", "b"]}] * 2
    """)
    stream = build_stream(_python(spec), seed=0)
    assert stream.input_shape == shape and len(stream) == 2
    assert stream[0].train.x.shape[1:] == shape and len(stream.mean) == shape[0]
    xb = torch.cat([next(iter(t.train.loader(len(t.train))))[0] for t in stream])
    dims = (0, *range(2, xb.ndim))
    # per channel (dimension 1) the training splits (of all tasks: the stats are the stream's) have mean 0, std 1
    assert torch.allclose(xb.mean(dim=dims), torch.zeros(shape[0]), atol=1e-4)
    assert torch.allclose(xb.std(dim=dims, unbiased=False), torch.ones(shape[0]), atol=1e-3)


def test_limit_and_per_class_subsets_touch_the_train_split_only_and_follow_the_seed(factory_dir):
    spec = write_factory(factory_dir, "subsets", """
        def make(seed=0):
            rng = np.random.default_rng(123)   # the data is fixed; grownfx's seed picks the subsets
            y = np.repeat(np.arange(4), 40)
            x = rng.standard_normal((160, 3)).astype(np.float32)
            yt = np.repeat(np.arange(4), 10)
            return {"train": (x, y), "test": (rng.standard_normal((40, 3)).astype(np.float32), yt),
                    "classes": ["a", "b", "c", "d"]}
    """)
    cfg = _python(spec, classes_per_task=2, val_fraction=0.25)
    full = build_stream(cfg, seed=0)
    assert [len(full[0].train), len(full[0].val), len(full[0].test)] == [60, 20, 20]
    small = build_stream({**cfg, "train_per_class": 8}, seed=0)
    assert torch.bincount(small[0].train.y).tolist() == [6, 6] and len(small[0].val) == 4
    assert torch.equal(small[0].test.ids, full[0].test.ids)  # never the test set
    limited = build_stream({**cfg, "limit_per_task": 10}, seed=0)
    assert len(limited[0].train) == 10 and torch.equal(limited[0].test.ids, full[0].test.ids)
    again = build_stream({**cfg, "train_per_class": 8}, seed=0)
    other = build_stream({**cfg, "train_per_class": 8}, seed=1)
    assert torch.equal(again[0].train.ids, small[0].train.ids)
    assert not torch.equal(other[0].train.ids, small[0].train.ids)
    assert small.meta["tasks"][0]["test_ids"] == full[0].test.ids.tolist()


def test_torch_datasets_tensors_and_string_labels(factory_dir):
    spec = write_factory(factory_dir, "tensor_datasets", """
        import torch
        from torch.utils.data import TensorDataset

        def make(seed):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(24, 1, 6, generator=g)
            y = torch.arange(24) % 2
            names = np.array(["cat", "dog"])[np.arange(24) % 2]
            return [{"train": TensorDataset(x, y), "test": TensorDataset(x[:8], y[:8])},
                    {"train": (x.numpy(), names), "test": (x[:8].numpy(), names[:8]), "name": "pets"}]
    """)
    stream = build_stream(_python(spec), seed=3)
    assert stream.input_shape == (1, 6) and stream[1].name == "pets"
    assert stream[0].classes == ["0", "1"] and stream[1].classes == ["cat", "dog"]
    # the factory got the seed: the same seed gives the same tensors
    assert torch.equal(build_stream(_python(spec), seed=3)[0].train.x, stream[0].train.x)
    ids = stream.meta["tasks"][1]["id_ranges"]
    assert ids["train"][1] - ids["train"][0] == 24 and ids["test"][1] - ids["test"][0] == 8


def test_uint8_inputs_scale_by_1_over_255(factory_dir):
    spec = write_factory(factory_dir, "pixels", """
        def make():
            x = np.full((20, 1, 2, 2), 255, dtype=np.uint8)
            x[10:] = 0
            y = np.repeat([0, 1], 10)
            return [{"train": (x, y), "test": (x, y)}]
    """)
    stream = build_stream(_python(spec, normalize=False), seed=0)
    assert stream.meta["pixel_scale"] == pytest.approx(1 / 255) and stream[0].train.x.dtype == torch.uint8
    xb, _ = next(iter(stream[0].test.loader(20)))
    assert sorted(set(xb.flatten().tolist())) == [0.0, 1.0]


@pytest.mark.parametrize("body, words", [
    ("def make():\n    return 3\n", ["returned a int", "list of tasks"]),
    ("def make():\n    x = np.zeros((4, 2), np.float32)\n    return [{'train': (x, np.arange(4))}, "
     "{'train': (x, np.arange(4)), 'test': (x, np.arange(4))}]\n", ["give it for every task or for none"]),
    ("def make():\n    return [{'train': (np.zeros((4, 2), np.float32), np.array([0, 1, 2, 5])),\n"
     "             'classes': ['a', 'b']}]\n",
     ["integers 0..1"]),
    ("def make():\n    return [{'train': (np.zeros((4, 2), np.float32), np.arange(3))}]\n", ["do not match"]),
    ("def make():\n    return [{'train': (np.full((4, 2), np.nan, np.float32), np.arange(4))}]\n", ["NaN"]),
    ("def make():\n    raise RuntimeError('no data here')\n", ["raised RuntimeError: no data here"]),
    ("def make():\n    return {'train': (np.zeros((4, 2), np.float32), np.arange(4))}\n", ["classes_per_task"]),
])
def test_a_bad_factory_gets_one_clear_error(factory_dir, body, words):
    (factory_dir / "bad.py").write_text("import numpy as np\n" + body)
    with pytest.raises(DatasetError) as e:
        build_stream(_python("bad:make"), seed=0)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "bad:make" in str(e.value)


def test_image_augmentation_of_non_images_is_refused(factory_dir):
    spec = write_factory(factory_dir, "seq_aug", """
        def make():
            x = np.zeros((8, 2, 16), np.float32)
            return [{"train": (x, np.arange(8) % 2), "test": (x, np.arange(8) % 2)}]
    """)
    with pytest.raises(DatasetError, match="crops and flips images"):
        build_stream(_python(spec, augment="crop_flip"), seed=0)


def test_factory_module_is_found_beside_the_recipe_and_the_error_says_where_it_looked(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    write_factory(project, "beside_recipe", """
        def make():
            x = np.zeros((8, 3), np.float32)
            return [{"train": (x, np.arange(8) % 2), "test": (x, np.arange(8) % 2)}]
    """)
    (project / "r.yaml").write_text("name: r\nmodel: {builder: small_cnn}\n"
                                    "data: {name: python, factory: 'beside_recipe:make'}\n")
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(project / "r.yaml")
    assert recipe.code_dir == str(project.resolve())  # recorded in config.resolved.yaml of its runs
    from grownfx.data import stream_for

    assert stream_for(recipe).input_shape == (3,)
    (project / "r2.yaml").write_text("name: r\nmodel: {builder: small_cnn}\n"
                                     "data: {name: python, factory: 'not_there:make'}\n")
    result = invoke("validate", str(project / "r2.yaml"))
    assert result.exit_code == 2
    assert "not_there.py" in result.output and str(project.resolve()) in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def _run_example(tmp_path: Path, recipe: str, *overrides: str) -> Path:
    out = tmp_path / "cmp"
    result = invoke("compare", str(EXAMPLES / recipe), "training.epochs=1", *overrides,
                    "--methods", "scratch,finetune,grown", "--out", str(out))
    assert result.exit_code == 0, result.output
    index = json.loads((out / "compare.json").read_text())
    assert sorted(r["method"] for r in index["runs"] if r["status"] == "ok") == ["finetune", "grown", "scratch"]
    return out


def test_conv1d_sequences_from_numpy_arrays_compare_end_to_end(tmp_path):
    out = _run_example(tmp_path, "sequences.yaml", "data.kwargs.tasks=2", "data.kwargs.per_class=16")
    run = out / "grown" / "seed0"
    meta = json.loads((run / "exports" / "task_2" / "meta.json").read_text())
    assert meta["input_shape"] == [2, 32] and meta["classes"] == ["4 Hz", "5 Hz"]
    exported = torch.export.load(str(run / "exports" / "task_2" / "model.pt2")).module()
    assert exported(torch.randn(5, 2, 32)).shape == (5, 2)
    targets = json.loads((out / "compare.json").read_text())["targets"]["0"]
    assert targets["source"] == "scratch run"  # GROWN's targets are the scratch run's validation accuracies
    for method in ("scratch", "finetune", "grown"):
        _predictions_agree_with_the_accuracy_matrix(out / method / "seed0")


def _predictions_agree_with_the_accuracy_matrix(run_dir: Path) -> None:
    """load_run's per-sample predictions give exactly the test accuracies the run recorded, ids from stream.json."""
    untrusted = grownfx.load_run(run_dir)
    assert untrusted.acc_matrix and untrusted.exports  # results are read without running any code
    with pytest.raises(UntrustedCodeError, match="trust=True"):
        untrusted.predictions(0)
    run = grownfx.load_run(run_dir, trust=True)
    for t, recorded in enumerate(run.acc_matrix[-1]):
        p = run.predictions(t)
        assert p.accuracy == pytest.approx(recorded, abs=1e-9)
        assert p.ids.tolist() == run.stream_info["tasks"][t]["test_ids"]


def test_load_run_of_a_builtin_dataset_needs_no_trust(tmp_path):
    from tests.test_reliability import quiet, tiny
    from grownfx.run.runner import run

    run(tiny(tmp_path / "r", **{"data__num_tasks": 2}), echo=quiet)
    loaded = grownfx.load_run(tmp_path / "r")
    assert loaded.user_code == [] and loaded.task_names == ["digits/task1", "digits/task2"]
    p = loaded.predictions(1, split="val")
    assert p.ids.tolist() == loaded.stream_info["tasks"][1]["val_ids"] and p.logits.shape == (len(p.ids), 5)
    assert loaded.predictions(0).accuracy == pytest.approx(loaded.acc_matrix[-1][0], abs=1e-9)
    net = loaded.method().net
    x = loaded.stream()[0].test.loader(4, augment=None)
    xb, _ = next(iter(x))
    assert torch.equal(net(xb, task=0).argmax(1), torch.from_numpy(loaded.predictions(0).predicted[:4]))


def test_tabular_mlp_from_one_dataset_compare_end_to_end(tmp_path):
    out = _run_example(tmp_path, "tabular.yaml", "data.kwargs.tasks=2", "data.kwargs.per_class=20")
    stream = json.loads((out / "grown" / "seed0" / "stream.json").read_text())
    assert stream["input_shape"] == [12] and [t["classes"] for t in stream["tasks"]] == [
        ["cluster0", "cluster1", "cluster2"], ["cluster3", "cluster4", "cluster5"]]
    # no test split given: test_fraction 0.2 of each class's 20 rows is held out
    assert stream["tasks"][0]["sizes"]["test"] == 12


# --- datasets already on disk: a Hugging Face `save_to_disk` folder ------------------------------------------------


def test_huggingface_save_to_disk_folders_of_images_and_of_arrays(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    pixels = rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcd"))})
    images = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": labels},
                                        features=features)
    datasets.DatasetDict({"train": images, "test": images.select(range(0, 40, 2))}).save_to_disk(tmp_path / "imgs")
    stream = build_stream({"name": "huggingface", "root": str(tmp_path / "imgs"), "classes_per_task": 2,
                           "val_fraction": 0.2}, seed=0)
    assert stream.input_shape == (3, 6, 6) and [t.classes for t in stream] == [["a", "b"], ["c", "d"]]
    task = stream[1]
    assert (len(task.train), len(task.val), len(task.test)) == (16, 4, 10)
    row = int(task.train.ids[0])  # ids are rows of the train split: the pixels are the dataset's, channels first
    assert torch.equal(task.train.x[0], torch.from_numpy(pixels[row].transpose(2, 0, 1).copy()))

    seqs = rng.standard_normal((30, 2, 7)).astype(np.float32)
    arrays = datasets.Dataset.from_dict(
        {"signal": seqs, "label": np.arange(30) % 3},
        features=datasets.Features({"signal": datasets.Array2D((2, 7), "float32"), "label": datasets.Value("int64")}))
    arrays.save_to_disk(tmp_path / "seqs")  # a plain Dataset: the test split is held out (test_fraction)
    stream = build_stream({"name": "huggingface", "root": str(tmp_path / "seqs"), "classes_per_task": 3,
                           "test_fraction": 0.2}, seed=0)
    assert stream.input_shape == (2, 7) and stream[0].classes == ["0", "1", "2"] and len(stream[0].test) == 6
    with pytest.raises(DatasetError, match="not a column"):
        build_stream({"name": "huggingface", "root": str(tmp_path / "seqs"), "classes_per_task": 3,
                      "input_column": "pixels"}, seed=0)
    with pytest.raises(DatasetError, match="not a folder written by save_to_disk"):
        build_stream({"name": "huggingface", "root": str(tmp_path), "classes_per_task": 3}, seed=0)


def test_inspect_takes_any_input_rank_and_a_python_recipe_gives_its_own():
    result = invoke("inspect", str(EXAMPLES / "tabular.yaml"))  # the factory says: (12,) rows, 3 classes per task
    assert result.exit_code == 0, result.output
    assert "input 12, seed width 0.5, 3-way head" in result.output
    result = invoke("inspect", str(EXAMPLES / "sequences.yaml"), "--input-shape", "2,64")
    assert result.exit_code == 0 and "input 2x64" in result.output, result.output


def test_classes_left_out_of_every_task_are_recorded(factory_dir):
    spec = write_factory(factory_dir, "nine", """
        def make():
            y = np.repeat(np.arange(9), 10)
            return {"train": (np.random.default_rng(0).standard_normal((90, 4)).astype(np.float32), y)}
    """)
    stream = build_stream(_python(spec, classes_per_task=4), seed=0)
    assert len(stream) == 2 and stream.meta["unused_classes"] == ["8"]


def test_resume_refuses_a_factory_that_now_makes_other_data(factory_dir):
    from grownfx.recipe.schema import Recipe
    from grownfx.run.folder import RunError
    from grownfx.run.runner import run

    body = """
        def make():
            rng = np.random.default_rng(0)
            y = np.repeat([0, 1], 20)
            return [{"train": ((rng.standard_normal((40, 3)) + y[:, None]).astype(np.float32) * SCALE, y)}]
    """
    write_factory(factory_dir, "drifting", "SCALE = 1.0\n" + textwrap.dedent(body))
    recipe = Recipe.model_validate({
        "name": "drift", "device": "cpu", "model": {"builder": "tabular:mlp", "kwargs": {"features": 3}},
        "code_dir": str(EXAMPLES), "data": {"name": "python", "factory": "drifting:make", "val_fraction": 0.25},
        "method": {"name": "scratch"}, "training": {"epochs": 1, "num_threads": 1},
        "output": {"tensorboard": False, "export_format": "none"}})
    run(recipe, out_dir=factory_dir / "run", echo=lambda msg: None)
    run(recipe, out_dir=factory_dir / "run", resume=True, echo=lambda msg: None)  # the same data: fine
    # another size too: a file rewritten within the same second with the same size would be read from its stale .pyc
    write_factory(factory_dir, "drifting", "SCALE = 2.0  # edited\n" + textwrap.dedent(body))
    import sys

    sys.modules.pop("drifting", None)  # a new process would import the edited file
    with pytest.raises(RunError, match="task 1's data differs"):
        run(recipe, out_dir=factory_dir / "run", resume=True, echo=lambda msg: None)
