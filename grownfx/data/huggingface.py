"""A Hugging Face `datasets` folder written by `save_to_disk`, read offline with `load_from_disk` (the optional
`datasets` package): an image or array column and a label column, cut into tasks like the built-in kinds."""

from __future__ import annotations

from typing import Any

import numpy as np

from grownfx.data.config import HuggingFaceConfig
from grownfx.data.core import TaskStream
from grownfx.data.errors import DatasetError, abspath, describe_dir
from grownfx.data.factory import cut_dataset

__all__ = ["build_huggingface"]


def _load(cfg: HuggingFaceConfig) -> Any:
    try:
        import datasets
    except ImportError:
        raise DatasetError("data.name huggingface reads folders written by datasets' save_to_disk and needs the "
                           "`datasets` package: pip install datasets (or pip install \"grownfx[hf]\")") from None
    root = abspath(cfg.root)
    if not ((root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file()):
        raise DatasetError(f"{root} is not a folder written by save_to_disk (no dataset_dict.json or "
                           f"dataset_info.json); found instead: {describe_dir(root)}. {cfg.howto}")
    try:
        return datasets.load_from_disk(str(root))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DatasetError(f"datasets.load_from_disk({str(root)!r}) failed: {type(exc).__name__}: {exc}") from None


def _input_column(ds: Any, cfg: HuggingFaceConfig) -> str:
    import datasets

    features = ds.features
    if cfg.input_column is not None:
        if cfg.input_column not in features:
            raise DatasetError(f"data.input_column {cfg.input_column!r} is not a column of {cfg.root}; its columns: "
                               f"{', '.join(features)}")
        return cfg.input_column
    arrays = (datasets.Image, datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D,
              datasets.Sequence)
    found = [c for c, f in features.items() if c != cfg.label_column and (isinstance(f, arrays) or
                                                                           type(f).__name__ == "List")]
    if not found:
        raise DatasetError(f"{cfg.root} has no image or array column (columns: {', '.join(features)}); set "
                           "data.input_column")
    return found[0]


def _arrays(ds: Any, column: str, cfg: HuggingFaceConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    if cfg.label_column not in ds.features:
        raise DatasetError(f"data.label_column {cfg.label_column!r} is not a column of the {split} split of "
                           f"{cfg.root}; its columns: {', '.join(ds.features)}")
    batch = ds.select_columns([column, cfg.label_column]).with_format("numpy")[:]
    x, y = batch[column], np.asarray(batch[cfg.label_column])
    if x.dtype == object:
        shapes = sorted({np.shape(a) for a in x})[:3]
        raise DatasetError(f"the {split} split's {column!r} inputs differ in shape ({shapes}, ...): every input of a "
                           "stream needs one shape; resize them (ds.map) before save_to_disk")
    if isinstance(ds.features[column], datasets.Image):  # (N, H, W[, C]) pixels -> (N, C, H, W)
        x = x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif x.ndim == 1:
        x = x[:, None]  # one number per sample: (N, 1) tabular
    return x, y


def build_huggingface(cfg: HuggingFaceConfig, seed: int) -> TaskStream:
    loaded = _load(cfg)
    is_dict = hasattr(loaded, "keys") and not hasattr(loaded, "features")
    if is_dict:
        if cfg.train_split not in loaded:
            raise DatasetError(f"{cfg.root} has splits {', '.join(loaded)}; data.train_split {cfg.train_split!r} is "
                               "not among them")
        if cfg.test_split is not None and cfg.test_split not in loaded:
            raise DatasetError(f"{cfg.root} has splits {', '.join(loaded)}; data.test_split {cfg.test_split!r} is "
                               "not among them (null holds out test_fraction of the train split)")
        parts = {"train": loaded[cfg.train_split]}
        if cfg.test_split is not None:
            parts["test"] = loaded[cfg.test_split]
    else:
        parts = {"train": loaded}
    column = _input_column(parts["train"], cfg)
    splits = {s: _arrays(ds, column, cfg, s) for s, ds in parts.items()}
    label = parts["train"].features[cfg.label_column]
    classes = list(label.names) if hasattr(label, "names") else None
    root = abspath(cfg.root)
    return cut_dataset(cfg, seed, splits, classes, where=f"data.root {root}", name=f"huggingface:{root.name}",
                       stem=root.name,
                       meta={"root": str(root), "sources": {s: len(y) for s, (_, y) in splits.items()},
                             "columns": {"input": column, "label": cfg.label_column},
                             "id_space": "id i = row i of the train split, then len(train) + j for row j of the "
                                         "test split"})
