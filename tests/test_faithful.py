"""The paper's settings by construction: CPG's CIFAR VGG16-BN, Fashion-MNIST IDX reading, seed size in the
paper's unit, `best(scratch, finetune)` targets, task 1's epochs, recipes' augmentation and sources."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from grownfx.data import DatasetError, build_stream
from grownfx.data.fashion_mnist import read_idx
from grownfx.models import build_backbone
from grownfx.recipe.loading import load_recipe
from grownfx.recipe.schema import Recipe, parse_method_spec, parse_target, target_sources

# --- CPG's CIFAR VGG16-BN, from the configuration-D spec (not from the implementation) -------------------

D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def expected_vgg_params(classes: int = 0) -> int:
    total, c = 0, 3
    for v in D:
        if v != "M":
            total += c * v * 3 * 3 + 2 * v  # conv 3x3 without bias, BatchNorm weight + bias
            c = v
    total += 512 * 4096 + 4096 + 4096 * 4096 + 4096  # FC 512->4096, FC 4096->4096
    return total + (4096 * classes + classes if classes else 0)


def test_vgg16_bn_cifar_is_cpgs_network():
    model = build_backbone("vgg16_bn_cifar", 5)
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier."))
    assert body == expected_vgg_params() == 33_601_472  # "about 33.6 M before the head"
    assert sum(p.numel() for p in model.parameters()) == expected_vgg_params(5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [v for v in D if v != "M"]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    feats = list(model.features)
    kinds = [type(m).__name__ for m in feats]
    expect = []
    for v in D:
        expect += ["MaxPool2d"] if v == "M" else ["Conv2d", "BatchNorm2d", "ReLU"]
    assert kinds == expect
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 4096), (4096, 4096), (4096, 5)]
    assert not any(isinstance(m, (nn.Dropout, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((b.weight == 1).all()) and bool((b.bias == 0).all()) for b in bns)
    assert all(bool((m.bias == 0).all()) and abs(float(m.weight.detach().std()) - 0.01) < 2e-3
               for m in linears[:2])


def test_inspect_shows_the_vgg_parameter_count():
    from grownfx.cli.inspect_model import inspect_data

    data = inspect_data("vgg16_bn_cifar", seed_width=1.0)
    assert data["input_shape"] == [3, 32, 32] and data["full_params"] == expected_vgg_params(10)


def test_paper_recipes_use_the_papers_networks_augmentation_and_targets():
    vgg = load_recipe("vgg16bn_cifar100_superclass20", check_data=False)
    assert vgg.model.builder == "vgg16_bn_cifar" and vgg.data.augment == "crop_flip"
    lenet = load_recipe("lenet_cifar100_split10", check_data=False)
    assert lenet.data.augment == "crop_flip" and lenet.training.epochs == 20
    assert load_recipe("resnet18_miniimagenet", check_data=False).data.augment == "none"
    for r in (vgg, lenet):
        assert target_sources(r.target.rule) == ("scratch", "finetune")
    assert vgg.model.seed_size == pytest.approx(0.25) and lenet.model.seed_size == pytest.approx(0.45)


# --- model size in the paper's unit ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0.3, 0.5])
def test_seed_size_is_a_parameter_fraction(size):
    from grownfx.learn.methods.grown import build_net

    r = Recipe.model_validate({"name": "s", "model": {"builder": "lenet5", "seed_size": size},
                               "data": {"name": "synthetic", "input_shape": [3, 32, 32], "num_tasks": 1}})
    stream = build_stream(r.data, 0)
    net = build_net(r, stream)
    net.add_task(2)
    assert abs(net.num_parameters() / net.full_params - size) < 0.01


# --- targets ---------------------------------------------------------------------------------------------


def test_best_of_scratch_and_finetune_target_rule(tmp_path):
    assert parse_target("best(scratch, finetune) - 0.5") == 0.5 and parse_target("scratch") == 0.0
    assert target_sources("best(scratch, finetune)") == ("scratch", "finetune")
    assert parse_method_spec("finetune[forgetting]") == ("finetune", "forgetting")
    from grownfx.run import compare

    r = Recipe.model_validate({"name": "t", "model": {"builder": "small_cnn"}, "data": {"name": "digits"},
                               "target": {"rule": "best(scratch, finetune) - 1"}})
    for name, vals in (("scratch", [90.0, 80.0]), ("finetune", [85.0, 88.0])):
        d = tmp_path / name / "seed0"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"num_tasks": 2, "tasks": [{"val_acc": v} for v in vals]}))
    values, source = compare._references(r, 0, tmp_path, ["scratch", "finetune", "grown"])
    assert values == [90.0, 88.0] and "fine-tune run" in source


# --- task 1 trains training.epochs -----------------------------------------------------------------------


def test_task_one_trains_epochs_not_stage2_epochs(tmp_path):
    import grownfx.run.runner as runner

    r = Recipe.model_validate({
        "name": "e", "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 8, "hidden": 16}},
        "data": {"name": "digits", "num_tasks": 1}, "target": {"rule": 0.0},
        "training": {"epochs": 3, "stage2_epochs": 1},
        "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False, "export_format": "none"}})
    s = runner.run(r, echo=lambda m: None).summary
    assert s["tasks"][0]["epochs"] == 3


# --- Fashion-MNIST from IDX files ------------------------------------------------------------------------


def write_idx(path, array: np.ndarray, gz: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_fashion(folder, per_class=(20, 5), gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "t10k"), per_class):
        y = np.repeat(np.arange(10), n)
        x = rng.integers(0, 256, size=(len(y), 28, 28))
        x[:, 0, 0] = y  # a trace of the label, to check labels and images stay paired
        write_idx(folder / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, gz)


def test_fashion_mnist_reads_gz_idx_files(tmp_path):
    fake_fashion(tmp_path)
    assert read_idx(tmp_path / "train-labels-idx1-ubyte.gz").shape == (200,)
    s = build_stream({"name": "fashion_mnist", "root": str(tmp_path), "classes_per_task": 2, "val_fraction": 0.25},
                     0)
    assert len(s.tasks) == 5 and s.input_shape == (1, 28, 28)
    assert s.tasks[1].classes == ["Pullover", "Dress"]
    sizes = s.meta["tasks"][0]["sizes"]
    assert sizes == {"train": 30, "val": 10, "test": 10}
    t = s.tasks[2]  # classes 4, 5: the pixel trace (normalised) must follow the task label
    raw = (t.train.x[:, 0, 0, 0] * 0.3530 + 0.2860) * 255 if t.train.x.dtype.is_floating_point else t.train.x[:, 0, 0, 0]
    assert torch.equal(torch.round(raw.float()).long() - 4, t.train.y)


def test_fashion_mnist_torchvision_layout_and_low_data(tmp_path):
    fake_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    s = build_stream({"name": "fashion_mnist", "root": str(tmp_path), "classes_per_task": 5,
                      "train_per_class": 8, "val_fraction": 0.25}, 0)
    assert len(s.tasks) == 2 and s.meta["tasks"][0]["sizes"] == {"train": 30, "val": 10, "test": 25}


def test_fashion_mnist_pads_to_32_for_cifar_backbones(tmp_path):
    fake_fashion(tmp_path)
    cfg = {"name": "fashion_mnist", "root": str(tmp_path), "classes_per_task": 2, "val_fraction": 0.25}
    plain, padded = build_stream(cfg, 0), build_stream({**cfg, "pad_to": 32}, 0)
    assert padded.input_shape == (1, 32, 32)
    a, b = plain.tasks[2].train, padded.tasks[2].train
    assert torch.equal(b.y, a.y) and torch.equal(b.x[:, :, 2:30, 2:30], a.x)  # the image, centred
    border = b.x.clone()
    border[:, :, 2:30, 2:30] = 0
    black = (0 - 0.2860) / 0.3530 if b.x.dtype.is_floating_point else 0  # padded before normalisation
    assert torch.allclose(border[:, :, :2].float(), torch.full_like(border[:, :, :2].float(), black))
    with pytest.raises(Exception, match="pad_to"):
        build_stream({**cfg, "pad_to": 20}, 0)


def test_fashion_mnist_in_three_channels_copies_the_grey_one(tmp_path):
    fake_fashion(tmp_path)
    cfg = {"name": "fashion_mnist", "root": str(tmp_path), "classes_per_task": 2, "val_fraction": 0.25, "pad_to": 32}
    grey, rgb = build_stream(cfg, 0), build_stream({**cfg, "channels": 3}, 0)
    assert rgb.input_shape == (3, 32, 32)
    a, b = grey.tasks[3].train, rgb.tasks[3].train
    assert torch.equal(b.y, a.y) and all(torch.equal(b.x[:, c:c + 1], a.x) for c in range(3))
    xa, _ = next(iter(a.loader(8)))
    xb, _ = next(iter(b.loader(8)))
    assert all(torch.equal(xb[:, c:c + 1], xa) for c in range(3))  # normalised alike in each channel
    with pytest.raises(Exception, match="channels"):
        build_stream({**cfg, "channels": 3, "mean": [0.1, 0.2], "std": [0.3, 0.3]}, 0)


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        build_stream({"name": "fashion_mnist", "root": str(tmp_path)}, 0)


def test_grow_and_the_grow_only_ablation_row_are_one_experiment(tmp_path):
    import grownfx.run.runner as runner

    out = {}
    for i, method in enumerate(({"name": "grow"}, {"name": "grown", "ablation": "grow_only"})):
        r = Recipe.model_validate({
            "name": f"g{i}", "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 8, "hidden": 16}},
            "data": {"name": "digits", "num_tasks": 2}, "method": method, "target": {"rule": 0.0},
            "growth": {"max_rounds": 1}, "training": {"epochs": 1},
            "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False, "export_format": "none"}})
        out[i] = runner.run(r, echo=lambda m: None).summary
    a, b = ([(t["acc_final"], t["params_stored"], t["growth_rounds"]) for t in out[i]["tasks"]] for i in (0, 1))
    assert a == b and all(rounds == 1 for _, _, rounds in a)  # a growth round on every task, same numbers
