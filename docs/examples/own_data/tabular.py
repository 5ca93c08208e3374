"""Tabular rows (N, F) and an MLP: docs/data.md's second worked example (generated data)."""
import numpy as np
from torch import nn


def make_tasks(seed=0, tasks=3, per_class=80, features=12):
    """One dataset of 3 * tasks classes (Gaussian clusters in `features` dimensions); grownfx cuts it into tasks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.7, (3 * tasks, features))
    y = np.repeat(np.arange(3 * tasks), per_class)
    x = (centres[y] + rng.standard_normal((len(y), features))).astype(np.float32)
    return {"train": (x, y), "classes": [f"cluster{c}" for c in range(3 * tasks)]}


def mlp(num_classes, features=12, width=64):
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, num_classes))
