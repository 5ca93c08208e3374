"""Fashion-MNIST (Xiao et al. 2017) read from its four IDX files, split into tasks of classes.

The files are the ones Zalando publishes (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`), gzipped or not, found in `root` itself, in
`root/FashionMNIST/raw/` (torchvision's layout) or in `root/raw/`.  On Debian/Ubuntu
`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist (the default root).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from grownfx.data.config import FashionMNISTConfig
from grownfx.data.core import TaskStream
from grownfx.data.errors import DatasetError, abspath, describe_dir
from grownfx.data.splits import Holdout, Pool, Sampling, assemble, class_order, group_classes

__all__ = ["FASHION_CLASSES", "FASHION_MEAN", "FASHION_STD", "build_fashion_mnist", "find_idx", "read_idx"]

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
# Over the 60000 training images scaled to [0, 1] (torchvision's usual FashionMNIST values).
FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)
FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
         "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
HOWTO = ("Install Debian's package with `apt-get install dataset-fashion-mnist` (files in "
         "/usr/share/datasets/fashion-mnist), or copy the four IDX files from "
         "https://github.com/zalandoresearch/fashion-mnist (data/fashion/) or a torchvision FashionMNIST root "
         "(FashionMNIST/raw/) into data.root.")
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
           0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (LeCun's format: 0, 0, dtype code, ndim, big-endian uint32 dims, data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as exc:  # a truncated or damaged .gz (gzip.BadGzipFile is an OSError)
        what = "truncated" if isinstance(exc, EOFError) else f"unreadable ({type(exc).__name__}: {exc})"
        raise DatasetError(f"cannot decode {path}: the file is {what}; replace it with the original. {HOWTO}") \
            from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: the IDX header is cut short ({len(raw)} bytes); replace the file. {HOWTO}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise DatasetError(f"{path}: header says {dims} of {dtype} ({count * dtype.itemsize} bytes), "
                           f"the file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def find_idx(root: Path) -> dict[str, Path]:
    """The four files under root, root/FashionMNIST/raw or root/raw (plain or .gz); DatasetError if missing."""
    root = abspath(root)
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        found = {}
        for key, stem in FILES.items():
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(FILES):
            return found
    raise DatasetError(f"Fashion-MNIST: expected {', '.join(s + '[.gz]' for s in FILES.values())} in {root}, "
                       f"{root / 'FashionMNIST' / 'raw'} or {root / 'raw'}; found instead: {describe_dir(root)}. "
                       f"{HOWTO} Nothing is downloaded.")


def build_fashion_mnist(cfg: FashionMNISTConfig, seed: int) -> TaskStream:
    files = find_idx(cfg.root)
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(f"Fashion-MNIST {split}: images {x.shape} and labels {y.shape} do not match "
                               f"(expected (N, 28, 28) and (N,))")
    if cfg.pad_to is not None and cfg.pad_to > 28:  # black border, as the images' own: no resampling
        lo = (cfg.pad_to - 28) // 2
        pad = ((0, 0), (lo, cfg.pad_to - 28 - lo), (lo, cfg.pad_to - 28 - lo))
        for split in ("train", "test"):
            arrays[f"{split}_x"] = np.pad(arrays[f"{split}_x"], pad)
    train_y = arrays["train_y"].astype(np.int64)
    test_y = arrays["test_y"].astype(np.int64)
    images = {split: arrays[f"{split}_x"][:, None] for split in ("train", "test")}
    if cfg.channels == 3:  # grey copied into R, G and B
        images = {split: np.repeat(x, 3, axis=1) for split, x in images.items()}
    mean, std = cfg.mean or FASHION_MEAN, cfg.std or FASHION_STD
    mean, std = tuple(mean) * (cfg.channels // len(mean)), tuple(std) * (cfg.channels // len(std))
    order_seed = seed if cfg.class_order_seed is None else cfg.class_order_seed
    order = class_order(10, cfg.class_order == "shuffled", order_seed)
    task_classes = group_classes(order, cfg.classes_per_task, cfg.num_tasks)
    return assemble(
        name="fashion_mnist",
        train=Pool(images["train"], train_y, np.arange(len(train_y))),
        test=Pool(images["test"], test_y, np.arange(len(test_y)) + len(arrays["train_y"])),
        class_names=list(FASHION_CLASSES),
        task_classes=task_classes,
        task_names=[f"fashion_mnist/task{t + 1}" for t in range(len(task_classes))],
        seed=seed,
        val=Holdout(fraction=cfg.val_fraction),
        sampling=Sampling.of(cfg),
        mean=mean,
        std=std,
        meta={
            "kind": cfg.name,
            "config": cfg.model_dump(mode="json"),
            "sources": {k: str(p) for k, p in files.items()},
            "id_space": "id i < 60000: row i of the train files; 60000 + j: row j of the t10k files",
            "class_order": [int(c) for c in order],
            "class_order_seed": order_seed,
        },
    )
