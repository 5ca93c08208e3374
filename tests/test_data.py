"""grownfx.data: streams built from tiny datasets written in the real on-disk formats."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from grownfx.data import DatasetError, TaskData, build_stream, parse_data_config
from grownfx.data import config as data_config
from grownfx.data.core import crop_flip

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2


# ---------------------------------------------------------------- fixtures in the real formats


def _coarse_names() -> list[str]:
    # Coarse id c gets a name that sorts in reverse, so "alphabetical" and "coarse id" orders differ.
    return [f"super_{chr(ord('t') - c)}" for c in range(20)]


def _cifar_split(n_per_class: int, rng: np.random.Generator, row_offset: int) -> dict:
    fine = np.repeat(np.arange(100), n_per_class)
    rng.shuffle(fine)
    x = rng.integers(0, 256, size=(len(fine), 3, 32, 32), dtype=np.uint8)
    return {
        b"batch_label": b"synthetic",
        b"data": x.reshape(len(fine), 3072),  # the official rows: all R, then all G, then all B
        b"fine_labels": fine.tolist(),
        b"coarse_labels": (fine % 20).tolist(),
        b"filenames": [f"img_{row_offset + i}.png".encode() for i in range(len(fine))],
    }


def write_cifar100(root, protocol: int = pickle.HIGHEST_PROTOCOL) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(123)
    train = _cifar_split(TRAIN_PER_CLASS, rng, 0)
    test = _cifar_split(TEST_PER_CLASS, rng, len(train[b"fine_labels"]))
    image = np.zeros((3, 32, 32), dtype=np.uint8)
    image[0], image[1], image[2] = 10, 20, 30
    image[0, 1, 2] = 200  # red, row 1, column 2
    image[2, 31, 0] = 250  # blue, row 31, column 0
    train[b"data"][0] = image.reshape(-1)
    meta = {
        b"fine_label_names": [f"fine{f:02d}".encode() for f in range(100)],
        b"coarse_label_names": [n.encode() for n in _coarse_names()],
    }
    for name, obj in (("train", train), ("test", test), ("meta", meta)):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    return {"train": train, "test": test}


@pytest.fixture()
def cifar(tmp_path):
    raw = write_cifar100(tmp_path)
    fine = np.array(raw["train"][b"fine_labels"] + raw["test"][b"fine_labels"])  # fine label by id
    return tmp_path, fine


def cifar_split(root, **kw):
    return {"name": "cifar100_split", "root": str(root), "val_per_task": 10, **kw}


def write_miniimagenet(root, classes: int = 10, per_class: int = 8) -> list[str]:
    rng = np.random.default_rng(7)
    wnids = [f"n{c:08d}" for c in range(classes)]
    groups = [wnids[:6], wnids[6:8], wnids[8:]]
    for part, group in zip(("train", "val", "test"), groups):
        images = rng.integers(0, 256, size=(len(group) * per_class, 84, 84, 3), dtype=np.uint8)
        images[:, 0, 0, :] = [1, 2, 3]  # channel-last in the file
        class_dict = {w: list(range(i * per_class, (i + 1) * per_class)) for i, w in enumerate(group)}
        with open(root / f"mini-imagenet-cache-{part}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    return wnids


def write_image_folder(root, classes: int = 4, per_class: int = 5, size: int = 8) -> list[tuple[int, int, int]]:
    from PIL import Image

    colours = [(40 * c + 10, 200 - 30 * c, 7 * c) for c in range(classes)]
    for c, colour in enumerate(colours):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), colour).save(root / f"class_{c}" / f"{i}.png")
    return colours


def write_mnist(root, per_class_train: int = 5, per_class_test: int = 2) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, per in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), per).astype(np.uint8)
        images = (labels[:, None, None] * 20 + np.zeros((1, 28, 28))).astype(np.uint8)
        header = struct.pack(">iiii", 2051, len(labels), 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.tobytes())


def all_ids(task, split: str) -> set[int]:
    return set(getattr(task, split).ids.tolist())


# ---------------------------------------------------------------- CIFAR-100


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_rows_are_decoded_channel_first(tmp_path, protocol):
    write_cifar100(tmp_path, protocol)
    stream = build_stream(cifar_split(tmp_path), seed=0)
    hits = [(t, s) for t in stream for s in ("train", "val") if 0 in all_ids(t, s)]
    assert len(hits) == 1
    task, split = hits[0]
    data = getattr(task, split)
    img = data.x[data.ids.tolist().index(0)]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    assert img[0, 1, 2] == 200 and img[2, 31, 0] == 250
    assert img[0, 0, 0] == 10 and img[1, 5, 5] == 20 and img[2, 5, 5] == 30


def test_cifar_split10_task_k_holds_fine_labels_10k_to_10k_plus_9(cifar):
    root, fine = cifar
    stream = build_stream(cifar_split(root), seed=0)
    assert stream.num_tasks == 10 and stream.input_shape == (3, 32, 32)
    for k, task in enumerate(stream):
        assert task.name == f"split10/task{k + 1}" and task.num_classes == 10
        assert task.classes == [f"fine{f:02d}" for f in range(10 * k, 10 * k + 10)]
        for split, size in (("train", 50), ("val", 10), ("test", 20)):
            data = getattr(task, split)
            assert len(data) == size and data.y.dtype == torch.int64
            assert torch.equal(torch.from_numpy(fine[data.ids.numpy()]), 10 * k + data.y)
        assert torch.bincount(task.val.y, minlength=10).tolist() == [1] * 10  # stratified


def test_cifar_superclass_tasks_in_alphabetical_order(cifar):
    root, fine = cifar
    cfg = {"name": "cifar100_superclass", "root": str(root / "cifar-100-python"), "val_fraction": 0.34}
    stream = build_stream(cfg, seed=0)
    names = _coarse_names()
    assert [t.name for t in stream] == sorted(names)
    for task in stream:
        c = names.index(task.name)
        expected = [c + 20 * j for j in range(5)]
        assert task.classes == [f"fine{f:02d}" for f in expected]
        for split, size in (("train", 20), ("val", 10), ("test", 10)):
            data = getattr(task, split)
            assert len(data) == size
            assert (fine[data.ids.numpy()] == np.array(expected)[data.y.numpy()]).all()
    by_id = build_stream({**cfg, "task_order": "coarse_id"}, seed=0)
    assert [t.name for t in by_id] == names


def test_validation_split_is_disjoint_and_seeded(cifar):
    root, _ = cifar
    a, b, c = (build_stream(cifar_split(root), seed=s) for s in (0, 0, 1))
    for task in a:
        val = all_ids(task, "val")
        assert val and not val & all_ids(task, "train") and not val & all_ids(task, "test")
        assert len(val | all_ids(task, "train")) == 60
    for ta, tb in zip(a, b):
        for split in ("train", "val", "test"):
            da, db = getattr(ta, split), getattr(tb, split)
            assert torch.equal(da.x, db.x) and torch.equal(da.y, db.y) and torch.equal(da.ids, db.ids)
    assert a.meta == b.meta
    assert any(all_ids(ta, "val") != all_ids(tc, "val") for ta, tc in zip(a, c))
    assert all(all_ids(ta, "test") == all_ids(tc, "test") for ta, tc in zip(a, c))
    meta = json.loads(json.dumps(a.meta))
    assert meta["tasks"][3]["val_ids"] == sorted(all_ids(a[3], "val"))
    assert meta["class_order"] == list(range(100)) and meta["seed"] == 0


def test_shuffled_class_order_follows_the_seed(cifar):
    root, fine = cifar
    s0, s0b, s1 = (build_stream(cifar_split(root, class_order="shuffled", num_tasks=20), seed=s) for s in (0, 0, 1))
    assert s0.num_tasks == 20 and s0[0].num_classes == 5
    assert s0.meta["class_order"] == s0b.meta["class_order"] != s1.meta["class_order"]
    assert sorted(s0.meta["class_order"]) == list(range(100))
    task = s0[4]
    ids = task.train.ids.numpy()
    assert (fine[ids] == np.array(s0.meta["class_order"][20:25])[task.train.y.numpy()]).all()


def test_limit_per_task_caps_train_and_val_class_balanced_never_test_unless_asked(cifar):
    root, _ = cifar
    full = build_stream(cifar_split(root), seed=0)[2]
    task = build_stream(cifar_split(root, limit_per_task=10), seed=0)[2]
    assert (len(task.train), len(task.val)) == (10, 10) and len(full.train) > 10
    assert torch.bincount(task.train.y, minlength=10).tolist() == [1] * 10
    assert torch.equal(task.test.ids, full.test.ids)  # the test split is the whole one: results stay comparable
    capped = build_stream(cifar_split(root, limit_per_task=10, limit_test=True), seed=0)[2]
    assert len(capped.test) == 10 < len(full.test)
    assert torch.bincount(capped.test.y, minlength=10).tolist() == [1] * 10


def test_missing_root_and_missing_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        build_stream(cifar_split(missing), seed=0)
    message = str(e.value)
    assert str(missing / "cifar-100-python" / "train") in message and "does not exist" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    write_cifar100(tmp_path)
    os.remove(tmp_path / "cifar-100-python" / "meta")
    with pytest.raises(DatasetError) as e:
        build_stream(cifar_split(tmp_path), seed=0)
    assert str(tmp_path / "cifar-100-python" / "meta") in str(e.value)
    assert "train" in str(e.value).split("found instead")[1]  # says what is there


def test_truncated_and_malformed_pickles(tmp_path):
    write_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    blob = train.read_bytes()
    train.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="truncated") as e:
        build_stream(cifar_split(tmp_path), seed=0)
    assert str(train) in str(e.value)
    with open(train, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"fine_labels": [0] * 4, b"coarse_labels": [0] * 4}, f)
    with pytest.raises(DatasetError, match=r"\(N, 3072\)"):
        build_stream(cifar_split(tmp_path), seed=0)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    write_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({b"data": _Evil(marker)}, f)
    with pytest.raises(DatasetError, match="refusing") as e:
        build_stream(cifar_split(tmp_path), seed=0)
    assert "system" in str(e.value) and not marker.exists()
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump(eval, f)  # a bare reference to builtins.eval
    with pytest.raises(DatasetError, match="refusing"):
        build_stream(cifar_split(tmp_path), seed=0)


# ---------------------------------------------------------------- configuration


def test_config_rejects_download_and_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="never downloads.*cifar-100-python.tar.gz"):
        parse_data_config(cifar_split(tmp_path, download=True))
    with pytest.raises(ValueError, match="Extra inputs"):
        parse_data_config(cifar_split(tmp_path, bogus=1))
    with pytest.raises(ValueError):
        parse_data_config(cifar_split(tmp_path, num_tasks=3, classes_per_task=40))
    with pytest.raises(ValueError, match="no dataset class"):
        parse_data_config({"name": "torchvision", "dataset": "NotADataset", "root": "x", "classes_per_task": 2})
    cfg = parse_data_config(cifar_split(tmp_path))
    assert isinstance(cfg, data_config.Cifar100SplitConfig) and cfg.download is False


def test_every_config_field_is_described():
    for model in (data_config.Cifar100SplitConfig, data_config.Cifar100SuperclassConfig, data_config.MiniImageNetConfig,
                  data_config.ImageFolderConfig, data_config.TorchvisionConfig, data_config.DigitsConfig,
                  data_config.SyntheticConfig):
        assert model.model_config.get("extra") == "forbid"
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


# ---------------------------------------------------------------- MiniImageNet, folders, torchvision


def test_miniimagenet_pickles(tmp_path):
    wnids = write_miniimagenet(tmp_path)
    cfg = {"name": "miniimagenet", "root": str(tmp_path), "num_tasks": 2, "train_per_class": 6,
           "test_per_class": 2, "val_fraction": 0.2}
    a, b, c = (build_stream(cfg, seed=s) for s in (0, 0, 1))
    assert a.input_shape == (3, 84, 84) and a.mean == (0.485, 0.456, 0.406)
    assert a.meta["class_order"] == c.meta["class_order"] != list(range(10))  # fixed permutation, not the run seed
    assert sorted(sum((t.classes for t in a), [])) == wnids
    task = a[1]
    assert (len(task.train), len(task.val), len(task.test)) == (25, 5, 10)
    assert task.train.x[:, :, 0, 0].tolist() == [[1, 2, 3]] * 25  # channel-last pixels land channel-first
    for ta, tb, tc in zip(a, b, c):
        assert torch.equal(ta.val.x, tb.val.x) and all_ids(ta, "test") == all_ids(tc, "test")
        assert not all_ids(ta, "val") & (all_ids(ta, "train") | all_ids(ta, "test"))
    assert any(all_ids(ta, "val") != all_ids(tc, "val") for ta, tc in zip(a, c))
    os.remove(tmp_path / "mini-imagenet-cache-val.pkl")
    with pytest.raises(DatasetError, match="mini-imagenet-cache-val.pkl") as e:
        build_stream(cfg, seed=0)
    assert str(tmp_path / "mini-imagenet-cache-val.pkl") in str(e.value)


def test_miniimagenet_class_folders_are_resized(tmp_path):
    write_image_folder(tmp_path, classes=10, per_class=4, size=20)
    cfg = {"name": "miniimagenet", "root": str(tmp_path), "num_tasks": 2, "train_per_class": 3,
           "test_per_class": 1, "val_fraction": 0.0, "image_size": 24}
    stream = build_stream(cfg, seed=0)
    assert stream.input_shape == (3, 24, 24) and len(stream[0].train) == 15 and len(stream[0].val) == 0


def test_imagefolder_single_root_and_train_test_layout(tmp_path):
    colours = write_image_folder(tmp_path / "flat", classes=4, per_class=5)
    cfg = {"name": "imagefolder", "root": str(tmp_path / "flat"), "classes_per_task": 2,
           "val_fraction": 0.2, "test_fraction": 0.2}
    stream = build_stream(cfg, seed=0)
    assert stream.num_tasks == 2 and stream.input_shape == (3, 8, 8)
    for t, task in enumerate(stream):
        assert task.classes == [f"class_{2 * t}", f"class_{2 * t + 1}"]
        assert (len(task.train), len(task.val), len(task.test)) == (6, 2, 2)
        for split in ("train", "val", "test"):
            data = getattr(task, split)
            pixels = data.x[:, :, 3, 3].tolist()
            assert pixels == [list(colours[2 * t + int(y)]) for y in data.y]
    assert len(stream.mean) == 3 and all(s > 0 for s in stream.std)
    write_image_folder(tmp_path / "split" / "train", classes=4, per_class=3)
    write_image_folder(tmp_path / "split" / "test", classes=4, per_class=2, size=12)
    split_cfg = {**cfg, "root": str(tmp_path / "split"), "val_fraction": 0.0, "mean": [0.5] * 3, "std": [0.25] * 3}
    split = build_stream(split_cfg, seed=0)
    assert (len(split[0].train), len(split[0].test)) == (6, 4) and split[0].test.x.shape[2:] == (8, 8)
    with pytest.raises(DatasetError, match="class sub-folders"):
        build_stream({**cfg, "root": str(tmp_path / "empty")}, seed=0)


def test_torchvision_mnist_from_raw_files(tmp_path):
    write_mnist(tmp_path)
    cfg = {"name": "torchvision", "dataset": "MNIST", "root": str(tmp_path), "classes_per_task": 5, "val_fraction": 0.2}
    stream = build_stream(cfg, seed=0)
    assert stream.num_tasks == 2 and stream.input_shape == (1, 28, 28) and stream.mean == (0.1307,)
    task = stream[1]
    assert task.classes[0].startswith("5") and (len(task.train), len(task.val), len(task.test)) == (20, 5, 10)
    assert (task.train.x[:, 0, 0, 0] == (task.train.y + 5) * 20).all()
    with pytest.raises(DatasetError, match="download=True") as e:
        build_stream({**cfg, "root": str(tmp_path / "absent")}, seed=0)
    assert str(tmp_path / "absent") in str(e.value)


# ---------------------------------------------------------------- digits and synthetic


def test_digits_gives_five_real_two_class_tasks():
    from sklearn.datasets import load_digits

    stream = build_stream({"name": "digits"}, seed=0)
    assert stream.num_tasks == 5 and stream.input_shape == (1, 8, 8)
    assert sum(len(t.train) + len(t.val) + len(t.test) for t in stream) == 1797
    digits = load_digits()
    for k, task in enumerate(stream):
        assert task.num_classes == 2 and task.classes == [str(2 * k), str(2 * k + 1)]
        assert abs(len(task.train) / (len(task.train) + len(task.val) + len(task.test)) - 0.6) < 0.02
        ids = task.test.ids.numpy()
        assert (digits.target[ids] == 2 * k + task.test.y.numpy()).all()
        assert np.allclose(task.test.x[:, 0].numpy(), digits.images[ids] / 16.0)
        assert not all_ids(task, "val") & all_ids(task, "train")


def test_synthetic_interfere_reuses_inputs_with_permuted_labels():
    cfg = {"name": "synthetic", "num_tasks": 3, "classes_per_task": 3, "input_shape": [1, 6, 6],
           "samples_per_class": 10, "val_per_class": 2, "test_per_class": 4}
    plain = build_stream(cfg, seed=0)
    assert not torch.equal(plain[0].train.x, plain[1].train.x)
    stream = build_stream({**cfg, "interfere": True}, seed=0)
    assert stream.input_shape == (1, 6, 6) and len(stream[0].train) == 30
    for prev, task in zip(stream.tasks, stream.tasks[1:]):
        for split in ("train", "val", "test"):
            a, b = getattr(prev, split), getattr(task, split)
            assert torch.equal(a.x, b.x) and torch.equal(a.ids, b.ids)
            assert (a.y != b.y).all()  # every class changes label from one task to the next
            assert torch.equal(torch.bincount(b.y), torch.bincount(a.y))
    assert torch.equal(build_stream({**cfg, "interfere": True}, seed=0)[2].test.x, stream[2].test.x)


# ---------------------------------------------------------------- loaders


def _indexed(n: int, channels: int = 1) -> TaskData:
    """Every pixel of sample i equals i, so batches tell which samples they hold."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, channels, 4, 4).contiguous()
    return TaskData(x, torch.arange(n) % 3, (0.0,) * channels, (1.0,) * channels)


def test_loader_normalises_and_covers_each_sample_once(cifar):
    root, _ = cifar
    data = build_stream(cifar_split(root), seed=0)[0].train
    g = torch.Generator().manual_seed(0)
    batches = list(data.loader(16, shuffle=True, generator=g))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2] and len(data.loader(16)) == 4
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    first = data.loader(50)
    xs, _ = next(iter(first))
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    assert torch.allclose(xs, (data.x.float() / 255 - mean) / std, atol=1e-5)
    assert len(list(data.loader(16, drop_last=True))) == 3

    data = _indexed(37)
    seen = torch.cat([x[:, 0, 0, 0] for x, _ in data.loader(5, shuffle=True, generator=g)]).long()
    assert sorted(seen.tolist()) == list(range(37))
    again = torch.cat([x[:, 0, 0, 0] for x, _ in data.loader(5, shuffle=True, generator=g)]).long()
    assert sorted(again.tolist()) == list(range(37)) and not torch.equal(seen, again)


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.rand(6, 3, 8, 8)
    out = crop_flip(x, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        windows = [w for dy in range(9) for dx in range(9) for w in (padded[i, :, dy:dy + 8, dx:dx + 8],)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    data = build_stream({"name": "synthetic", "augment": "crop_flip", "input_shape": [3, 8, 8]}, seed=0)[0]
    assert data.train.augment == "crop_flip" and data.test.augment is None
    plain = next(iter(data.train.loader(200, augment=None)))[0]
    augmented = next(iter(data.train.loader(200)))[0]
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)


def test_dataset_view_matches_the_loader_item_by_item():
    cfg = {"name": "synthetic", "num_tasks": 1, "input_shape": [3, 8, 8], "samples_per_class": 20}
    stream = build_stream(cfg, seed=0)
    data = stream[0].train
    data.x = (data.x.clamp(-2, 2) * 60 + 128).to(torch.uint8)  # image-like uint8 storage
    ds = data.dataset()
    xs, ys = map(torch.cat, zip(*data.loader(16)))  # unshuffled, no augmentation on a synthetic train split
    assert len(ds) == len(xs) == len(data)
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.allclose(x, xs[i], atol=1e-6) and int(y) == int(ys[i]), i
    assert not torch.equal(xs[0], xs[1])  # (the items differ, so a wrong index would show)
    raw, _ = data.dataset(normalize=False)[3]
    assert torch.equal(raw, data.x[3])


def test_stream_meta_is_json_and_to_device(cifar):
    root, _ = cifar
    stream = build_stream({"name": "cifar100_superclass", "root": str(root), "limit_per_task": 5}, seed=2)
    meta = json.loads(json.dumps(stream.meta))
    assert meta["kind"] == "cifar100_superclass" and meta["seed"] == 2 and len(meta["tasks"]) == 20
    assert meta["sources"][0]["path"] == str(root / "cifar-100-python" / "train")
    # `to` moves every split of every task ("meta": a device other than the CPU, on any machine)
    moved = stream.to("meta")
    for a, b in zip(stream, moved):
        for split in ("train", "val", "test"):
            src, dst = getattr(a, split), getattr(b, split)
            assert dst.x.device.type == "meta" and dst.y.device.type == "meta"
            assert dst.x.shape == src.x.shape and torch.equal(dst.ids, src.ids) and src.x.device.type == "cpu"
    assert moved.meta == stream.meta and [t.name for t in moved] == [t.name for t in stream]
