"""Any torchvision.datasets class, always constructed with download=False, split into class groups."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from grownfx.data.config import TorchvisionConfig
from grownfx.data.core import TaskStream
from grownfx.data.errors import DatasetError, abspath, describe_dir
from grownfx.data.splits import Holdout, Pool, Sampling, assemble, class_order, group_classes

__all__ = ["KNOWN_STATS", "build_torchvision", "dataset_arrays"]

KNOWN_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "MNIST": ((0.1307,), (0.3081,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
    "KMNIST": ((0.1918,), (0.3483,)),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "SVHN": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def _construct(cfg: TorchvisionConfig, train: bool) -> Any | None:
    """The dataset object for one split; None when the class has no such split."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, cfg.dataset)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    if "train" in params:
        kwargs["train"] = train
    elif "split" in params:
        kwargs["split"] = cfg.train_split if train else cfg.test_split
    elif not train:
        return None
    if "download" in params:
        kwargs["download"] = False
    root = abspath(cfg.root)
    try:
        return cls(str(root), **kwargs)
    except (RuntimeError, FileNotFoundError, OSError, ValueError, EOFError, KeyError, IndexError) as e:
        which = "train" if train else "test"
        call_args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise DatasetError(
            f"torchvision.datasets.{cfg.dataset}(root={str(root)!r}, {call_args}) "
            f"could not read its {which} files ({type(e).__name__}: {e}); found instead: {describe_dir(root)}. "
            f"Run torchvision.datasets.{cfg.dataset}({str(root)!r}, download=True) on a machine with internet access "
            f"and copy {root} here. Nothing is downloaded."
        ) from None


def _as_numpy(a: Any) -> np.ndarray:
    return a.numpy() if hasattr(a, "numpy") else np.asarray(a)


def _to_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def dataset_arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, C, H, W) uint8 or float32, y (N,) int64), from `.data`/`.targets` when the class has them."""
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", getattr(ds, "labels", None))
    if data is not None and targets is not None and not isinstance(data, (list, str)):
        x, y = _to_nchw(_as_numpy(data)), _as_numpy(targets).astype(np.int64).reshape(-1)
        if len(x) == len(y) and x.ndim == 4:
            return x, y
    # Fallback for classes without array attributes: one pass of per-sample decoding.
    ds.transform = None
    xs, ys = [], []
    for i in range(len(ds)):
        img, label = ds[i]
        xs.append(np.asarray(img))
        ys.append(int(label))
    return _to_nchw(np.stack(xs)), np.asarray(ys, dtype=np.int64)


def _arrays(ds: Any, cfg: TorchvisionConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return dataset_arrays(ds)
    except (OSError, EOFError, ValueError, RuntimeError, KeyError, IndexError) as e:  # a sample that does not decode
        raise DatasetError(f"torchvision.datasets.{cfg.dataset} under {abspath(cfg.root)}: a {split} sample does not "
                           f"decode ({type(e).__name__}: {e}); replace the damaged files. Nothing is downloaded.") \
            from None


def build_torchvision(cfg: TorchvisionConfig, seed: int) -> TaskStream:
    train_ds = _construct(cfg, train=True)
    test_ds = _construct(cfg, train=False)
    x, y = _arrays(train_ds, cfg, "train")
    if x.dtype not in (np.uint8, np.float32):
        x = x.astype(np.float32)
    num_classes = int(y.max()) + 1
    names = [str(c) for c in getattr(train_ds, "classes", [])] or [str(c) for c in range(num_classes)]
    if len(names) < num_classes:
        names = [str(c) for c in range(num_classes)]
    train = Pool(x, y, np.arange(len(y)))
    test = None
    if test_ds is not None:
        x_te, y_te = _arrays(test_ds, cfg, "test")
        test = Pool(x_te.astype(x.dtype, copy=False), y_te, len(y) + np.arange(len(y_te)))

    order_seed = seed if cfg.class_order_seed is None else cfg.class_order_seed
    order = class_order(len(names), cfg.class_order == "shuffled", order_seed)
    task_classes = group_classes(order, cfg.classes_per_task, cfg.num_tasks)
    mean, std = cfg.mean, cfg.std
    if mean is None and cfg.dataset in KNOWN_STATS and not cfg.kwargs:
        mean, std = KNOWN_STATS[cfg.dataset]
    return assemble(
        name=f"torchvision:{cfg.dataset}",
        train=train,
        test=test,
        class_names=names,
        task_classes=task_classes,
        task_names=[f"{cfg.dataset.lower()}/task{t + 1}" for t in range(len(task_classes))],
        seed=seed,
        val=Holdout(fraction=cfg.val_fraction),
        test_holdout=Holdout(fraction=cfg.test_fraction) if test is None else None,
        sampling=Sampling.of(cfg),
        mean=mean,
        std=std,
        meta={
            "kind": cfg.name,
            "config": cfg.model_dump(mode="json"),
            "root": str(abspath(cfg.root)),
            "sources": {
                "dataset": f"torchvision.datasets.{cfg.dataset}",
                "train": len(y),
                "test": 0 if test is None else len(test.y),
            },
            "id_space": "id i = index i of the torchvision train split, then len(train) + j for test index j",
            "class_order": [int(c) for c in order],
            "class_order_seed": order_seed,
        },
    )
