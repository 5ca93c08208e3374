"""MiniImageNet-20 (GPM / TRGP protocol): 100 classes of 600 84x84 images, permuted, cut into tasks of 5.

Reads either the three mini-imagenet-cache-*.pkl files (their 64/16/20 classes merged into 100) or a
folder with one image sub-folder per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from grownfx.data.config import MINIIMAGENET_HOWTO, MiniImageNetConfig
from grownfx.data.core import TaskStream
from grownfx.data.errors import DatasetError, abspath, missing_files_error
from grownfx.data.folder import files_digest, read_images, scan_class_folders
from grownfx.data.safe_pickle import safe_load
from grownfx.data.splits import Holdout, Pool, Sampling, assemble, class_order, group_classes

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PICKLES", "build_miniimagenet", "load_miniimagenet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PICKLES = ("mini-imagenet-cache-train.pkl", "mini-imagenet-cache-val.pkl", "mini-imagenet-cache-test.pkl")
_TEST_SPLIT_SEED = 0  # train/test images of a class are fixed across runs; only validation follows the run seed
_Loaded = tuple[np.ndarray, list[str], list[np.ndarray], dict[str, Any]]


def _entry(d: Any, key: str, path: Path) -> Any:
    if isinstance(d, dict):
        for k in (key, key.encode()):
            if k in d:
                return d[k]
    raise DatasetError(f"{path} has no {key!r} entry; it is not a mini-imagenet cache pickle. {MINIIMAGENET_HOWTO}")


def _read_cache(path: Path, offset: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    d = safe_load(path, MINIIMAGENET_HOWTO, encoding="latin1")
    images = np.asarray(_entry(d, "image_data", path))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise DatasetError(
            f"{path}: image_data should be uint8 (N, H, W, 3), got {images.dtype} {images.shape}. {MINIIMAGENET_HOWTO}"
        )
    class_dict = _entry(d, "class_dict", path)
    if not isinstance(class_dict, dict):
        raise DatasetError(f"{path}: class_dict should be a dict of class -> row indices. {MINIIMAGENET_HOWTO}")
    classes = {}
    for wnid, rows in class_dict.items():
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= len(images))):
            raise DatasetError(
                f"{path}: class {wnid!r} lists rows outside image_data ({len(images)} images). {MINIIMAGENET_HOWTO}"
            )
        classes[wnid.decode() if isinstance(wnid, bytes) else str(wnid)] = offset + rows
    return images, classes


def _from_pickles(root: Path, size: int) -> _Loaded:
    missing = [root / p for p in PICKLES if not (root / p).is_file()]
    if missing:
        raise missing_files_error(missing, root, MINIIMAGENET_HOWTO)
    arrays, rows_of = [], {}
    offset = 0
    for name in PICKLES:
        images, classes = _read_cache(root / name, offset)
        dup = set(classes) & set(rows_of)
        if dup:
            raise DatasetError(
                f"{root / name}: class {sorted(dup)[0]!r} also appears in another cache file. {MINIIMAGENET_HOWTO}"
            )
        rows_of.update(classes)
        arrays.append(images)
        offset += len(images)
    if len({a.shape[1:] for a in arrays}) > 1 or arrays[0].shape[1] != size or arrays[0].shape[2] != size:
        raise DatasetError(
            f"{root}: cache images are {[a.shape[1:3] for a in arrays]}, expected {size}x{size}; "
            "set image_size to match"
        )
    images = np.concatenate(arrays).transpose(0, 3, 1, 2)  # a channel-first view; rows are gathered per task later
    names = sorted(rows_of)
    sources = {"files": [{"path": str(root / p), "bytes": (root / p).stat().st_size} for p in PICKLES],
               "id_space": "id = row of image_data in the train, val, test caches concatenated in that order"}
    return images, names, [rows_of[n] for n in names], sources


def _from_folders(root: Path, size: int) -> _Loaded:
    names, files, labels = scan_class_folders(root, MINIIMAGENET_HOWTO)
    images = read_images(files, (size, size), 3)
    sources = {"root": str(root), "files": len(files), "digest": files_digest(root, files),
               "id_space": "id i = i-th image of the listing (classes sorted, files sorted by path)"}
    return images, names, [np.flatnonzero(labels == c) for c in range(len(names))], sources


def load_miniimagenet(root: str | Path, size: int = 84) -> _Loaded:
    """(images (N, 3, H, W) uint8, sorted class names, row ids of each class, source description)."""
    root = abspath(root)
    if any((root / p).exists() for p in PICKLES):
        return _from_pickles(root, size)
    if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
        return _from_folders(root, size)
    raise missing_files_error([root / p for p in PICKLES], root, MINIIMAGENET_HOWTO)


def build_miniimagenet(cfg: MiniImageNetConfig, seed: int) -> TaskStream:
    images, names, class_rows, sources = load_miniimagenet(cfg.root, cfg.image_size)
    order_seed = seed if cfg.class_order_seed is None else cfg.class_order_seed
    order = class_order(len(names), cfg.class_order == "shuffled", order_seed)
    task_classes = group_classes(order, cfg.classes_per_task, cfg.num_tasks)

    split_rng = np.random.default_rng(_TEST_SPLIT_SEED)
    train_rows, test_rows, train_y, test_y = [], [], [], []
    for c, rows in enumerate(class_rows):
        if len(rows) <= cfg.test_per_class:
            raise DatasetError(
                f"class {names[c]!r} has {len(rows)} images, need more than test_per_class={cfg.test_per_class}"
            )
        rows = split_rng.permutation(rows)
        test_rows.append(rows[: cfg.test_per_class])
        train_rows.append(rows[cfg.test_per_class : cfg.test_per_class + cfg.train_per_class])
        test_y.append(np.full(len(test_rows[-1]), c))
        train_y.append(np.full(len(train_rows[-1]), c))
    tr, te = np.concatenate(train_rows), np.concatenate(test_rows)
    train = Pool(images, np.concatenate(train_y), tr, rows=tr)
    test = Pool(images, np.concatenate(test_y), te, rows=te)
    return assemble(
        name=f"miniimagenet{cfg.num_tasks}",
        train=train,
        test=test,
        class_names=names,
        task_classes=task_classes,
        task_names=[f"miniimagenet/task{t + 1}" for t in range(cfg.num_tasks)],
        seed=seed,
        val=Holdout(fraction=cfg.val_fraction),
        sampling=Sampling.of(cfg),
        mean=cfg.mean or IMAGENET_MEAN,
        std=cfg.std or IMAGENET_STD,
        meta={
            "kind": cfg.name,
            "config": cfg.model_dump(mode="json"),
            "root": str(abspath(cfg.root)),
            "sources": sources,
            "id_space": sources["id_space"],
            "class_order": [int(c) for c in order],
            "class_order_seed": order_seed,
            "test_split_seed": _TEST_SPLIT_SEED,
        },
    )
