"""CIFAR-100 from the python pickles of cifar-100-python/, as Split-N or as 20 superclass tasks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grownfx.data.config import CIFAR100_HOWTO, Cifar100SplitConfig, Cifar100SuperclassConfig
from grownfx.data.core import TaskStream
from grownfx.data.errors import DatasetError, abspath, missing_files_error
from grownfx.data.safe_pickle import safe_load
from grownfx.data.splits import Holdout, Pool, Sampling, assemble, class_order, group_classes

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "Cifar100",
    "build_cifar100_split",
    "build_cifar100_superclass",
    "find_cifar100",
    "load_cifar100",
]

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_FILES = ("train", "test", "meta")


@dataclass
class Cifar100:
    train: Pool
    test: Pool
    fine_names: list[str]
    coarse_names: list[str]
    fine_to_coarse: np.ndarray
    folder: Path

    def sources(self) -> list[dict[str, Any]]:
        return [{"path": str(self.folder / f), "bytes": (self.folder / f).stat().st_size} for f in _FILES]


def find_cifar100(root: str | Path) -> Path:
    """The cifar-100-python folder: `root/cifar-100-python` or `root` itself."""
    root = abspath(root)
    for folder in (root / "cifar-100-python", root):
        if all((folder / f).is_file() for f in _FILES):
            return folder
    folder = root / "cifar-100-python"
    missing = [folder / f for f in _FILES if not (folder / f).is_file()]
    raise missing_files_error(missing, folder if folder.is_dir() else root, CIFAR100_HOWTO)


def _field(d: dict, key: str, path: Path) -> Any:
    # The official files have bytes keys; re-pickled copies often have str keys.
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetError(
        f"{path} has no {key!r} entry (keys: {sorted(map(str, d))[:8]}); it is not a CIFAR-100 python file. "
        f"{CIFAR100_HOWTO}"
    )


def _labels(d: dict, key: str, path: Path, n: int, num: int) -> np.ndarray:
    y = np.asarray(_field(d, key, path))
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() >= num)):
        raise DatasetError(
            f"{path}: {key} should be {n} integers in [0, {num}), got shape {y.shape}, dtype {y.dtype}. "
            f"{CIFAR100_HOWTO}"
        )
    return y.astype(np.int64)


def read_cifar100_split(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x uint8 (N, 3, 32, 32), fine (N,), coarse (N,)) from one of the `train` / `test` pickles."""
    d = safe_load(path, CIFAR100_HOWTO)
    if not isinstance(d, dict):
        raise DatasetError(f"{path} holds a {type(d).__name__}, expected a dict. {CIFAR100_HOWTO}")
    data = np.asarray(_field(d, "data", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: data should be uint8 (N, 3072), got {data.dtype} {data.shape}. {CIFAR100_HOWTO}")
    n = data.shape[0]
    if n == 0:
        raise DatasetError(f"{path} holds no images (an empty split). {CIFAR100_HOWTO}")
    # Each row is the 1024 red values, then green, then blue, each plane row-major: channel-first.
    x = data.reshape(n, 3, 32, 32)
    return x, _labels(d, "fine_labels", path, n, 100), _labels(d, "coarse_labels", path, n, 20)


def _names(d: Any, key: str, path: Path, num: int) -> list[str]:
    names = _field(d, key, path) if isinstance(d, dict) else None
    if not isinstance(names, list) or len(names) != num:
        raise DatasetError(f"{path}: {key} should list {num} names. {CIFAR100_HOWTO}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar100(root: str | Path) -> Cifar100:
    folder = find_cifar100(root)
    x_tr, fine_tr, coarse_tr = read_cifar100_split(folder / "train")
    x_te, fine_te, coarse_te = read_cifar100_split(folder / "test")
    meta = safe_load(folder / "meta", CIFAR100_HOWTO)
    fine_names = _names(meta, "fine_label_names", folder / "meta", 100)
    coarse_names = _names(meta, "coarse_label_names", folder / "meta", 20)

    fine_to_coarse = np.full(100, -1, dtype=np.int64)
    fine = np.concatenate([fine_tr, fine_te])
    coarse = np.concatenate([coarse_tr, coarse_te])
    fine_to_coarse[fine] = coarse
    if (fine_to_coarse[fine] != coarse).any():
        raise DatasetError(
            f"{folder}: a fine label appears under two coarse labels; the files are inconsistent. {CIFAR100_HOWTO}"
        )
    train = Pool(x_tr, fine_tr, np.arange(len(fine_tr)))
    test = Pool(x_te, fine_te, len(fine_tr) + np.arange(len(fine_te)))
    return Cifar100(train, test, fine_names, coarse_names, fine_to_coarse, folder)


def _meta(cfg: Any, data: Cifar100, **extra: Any) -> dict[str, Any]:
    return {
        "kind": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "root": str(abspath(cfg.root)),
        "sources": data.sources(),
        "id_space": f"row i of {data.folder / 'train'} is id i; "
        f"row j of {data.folder / 'test'} is id {len(data.train.y)} + j",
        **extra,
    }


def build_cifar100_split(cfg: Cifar100SplitConfig, seed: int) -> TaskStream:
    data = load_cifar100(cfg.root)
    cpt = cfg.classes_per_task or 100 // cfg.num_tasks
    order_seed = seed if cfg.class_order_seed is None else cfg.class_order_seed
    order = class_order(100, cfg.class_order == "shuffled", order_seed)
    task_classes = group_classes(order, cpt, cfg.num_tasks)
    return assemble(
        name=f"cifar100_split{cfg.num_tasks}",
        train=data.train,
        test=data.test,
        class_names=data.fine_names,
        task_classes=task_classes,
        task_names=[f"split{cfg.num_tasks}/task{t + 1}" for t in range(cfg.num_tasks)],
        seed=seed,
        val=Holdout(per_task=cfg.val_per_task),
        val_option="val_per_task",
        sampling=Sampling.of(cfg),
        mean=cfg.mean or CIFAR100_MEAN,
        std=cfg.std or CIFAR100_STD,
        meta=_meta(cfg, data, class_order=[int(c) for c in order], class_order_seed=order_seed),
    )


def build_cifar100_superclass(cfg: Cifar100SuperclassConfig, seed: int) -> TaskStream:
    data = load_cifar100(cfg.root)
    if cfg.task_order == "alphabetical":
        coarse_order = sorted(range(20), key=lambda c: data.coarse_names[c])
    elif cfg.task_order == "coarse_id":
        coarse_order = list(range(20))
    else:
        coarse_order = [int(c) for c in np.random.default_rng(seed).permutation(20)]
    coarse_order = coarse_order[: cfg.num_tasks]
    task_classes = []
    for c in coarse_order:
        fine = sorted(np.flatnonzero(data.fine_to_coarse == c).tolist(), key=lambda f: data.fine_names[f])
        if len(fine) != 5:
            raise DatasetError(
                f"{data.folder}: superclass {data.coarse_names[c]!r} has {len(fine)} fine classes, CIFAR-100 has 5. "
                f"{CIFAR100_HOWTO}"
            )
        task_classes.append(fine)
    return assemble(
        name="cifar100_superclass",
        train=data.train,
        test=data.test,
        class_names=data.fine_names,
        task_classes=task_classes,
        task_names=[data.coarse_names[c] for c in coarse_order],
        seed=seed,
        val=Holdout(fraction=cfg.val_fraction),
        sampling=Sampling.of(cfg),
        mean=cfg.mean or CIFAR100_MEAN,
        std=cfg.std or CIFAR100_STD,
        meta=_meta(cfg, data, coarse_order=coarse_order, coarse_names=data.coarse_names),
    )
