"""scikit-learn's bundled 8x8 digits: real data that needs no files, split into tasks of a few classes."""

from __future__ import annotations

import numpy as np

from grownfx.data.config import DigitsConfig
from grownfx.data.core import TaskStream
from grownfx.data.splits import Holdout, Pool, Sampling, assemble, class_order, group_classes

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "build_digits"]

# Over all 1797 images after scaling to [0, 1].
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


def build_digits(cfg: DigitsConfig, seed: int) -> TaskStream:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    order_seed = seed if cfg.class_order_seed is None else cfg.class_order_seed
    order = class_order(10, cfg.class_order == "shuffled", order_seed)
    task_classes = group_classes(order, cfg.classes_per_task, cfg.num_tasks)
    return assemble(
        name="digits",
        train=Pool(x, y, np.arange(len(y))),
        test=None,
        class_names=[str(c) for c in range(10)],
        task_classes=task_classes,
        task_names=[f"digits/task{t + 1}" for t in range(len(task_classes))],
        seed=seed,
        # val_fraction is of the whole class, like test_fraction; the hold-out comes from what test left.
        val=Holdout(fraction=cfg.val_fraction / max(1e-9, 1.0 - cfg.test_fraction)),
        test_holdout=Holdout(fraction=cfg.test_fraction),
        sampling=Sampling.of(cfg),
        mean=cfg.mean or DIGITS_MEAN,
        std=cfg.std or DIGITS_STD,
        meta={
            "kind": cfg.name,
            "config": cfg.model_dump(mode="json"),
            "sources": {"dataset": "sklearn.datasets.load_digits", "samples": int(len(y))},
            "id_space": "id i = row i of load_digits()",
            "pixel_scale": 1 / 16,  # load_digits().images hold 0..16
            "class_order": [int(c) for c in order],
            "class_order_seed": order_seed,
        },
    )
