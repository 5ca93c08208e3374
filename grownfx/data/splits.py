"""Seeded class orders, class-stratified hold-outs, and the assembly of a TaskStream from labelled pools.

Every random choice draws from `numpy.random.default_rng([seed, task, purpose])`, so the same
seed gives identical tensors and each task's split does not depend on how many tasks came before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from grownfx.data.core import Task, TaskData, TaskStream, check_augment
from grownfx.data.errors import DatasetError

__all__ = ["Holdout", "Pool", "Sampling", "assemble", "channel_stats", "class_order", "group_classes"]

_VAL, _TEST, _LIMIT = 0, 1, 2
_PER_CLASS = 7919  # the stream (not task) level draw of `train_per_class`, as Fashion-MNIST's low-data setting had it


@dataclass
class Pool:
    """Labelled samples: y (N,) global class ids, ids (N,) source row ids, and inputs `x` (M, C, ...) of any rank
    (uint8 or float32) where sample i is x[rows[i]] (x[i] when rows is None), so pools can share one array."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    rows: np.ndarray | None = None

    def images(self, sel: np.ndarray) -> np.ndarray:
        return self.x[sel if self.rows is None else self.rows[sel]]

    def subset(self, sel: np.ndarray) -> "Pool":
        return Pool(self.x, self.y[sel], self.ids[sel], sel if self.rows is None else self.rows[sel])


@dataclass(frozen=True)
class Sampling:
    """The subsets every kind offers, from its config: `train_per_class` (at most n training samples per class,
    seeded, before the validation hold-out), `limit_per_task` (a class-balanced cap on each task's train and
    validation splits; on its test split only with `limit_test`) and the train split's `augment`."""

    limit: int | None = None
    limit_test: bool = False
    per_class: int | None = None
    augment: str | None = None

    @classmethod
    def of(cls, cfg: Any) -> "Sampling":
        augment = getattr(cfg, "augment", "none")
        return cls(getattr(cfg, "limit_per_task", None), bool(getattr(cfg, "limit_test", False)),
                   getattr(cfg, "train_per_class", None), None if augment == "none" else augment)


@dataclass(frozen=True)
class Holdout:
    """How much of each task's train pool to hold out: `per_task` samples in all, or a `fraction` of each class."""

    per_task: int | None = None
    fraction: float | None = None

    def counts(self, class_sizes: np.ndarray) -> np.ndarray:
        if self.per_task is not None:
            k = len(class_sizes)
            counts = np.full(k, self.per_task // k)
            counts[: self.per_task % k] += 1
            return counts
        return np.round(class_sizes * (self.fraction or 0.0)).astype(np.int64)


def class_order(num_classes: int, shuffled: bool, seed: int | None) -> np.ndarray:
    return np.random.default_rng(seed).permutation(num_classes) if shuffled else np.arange(num_classes)


def group_classes(order: Sequence[int], classes_per_task: int, num_tasks: int | None) -> list[list[int]]:
    available = len(order) // classes_per_task
    num_tasks = available if num_tasks is None else num_tasks
    if classes_per_task < 1 or num_tasks < 1 or num_tasks > available:
        raise ValueError(
            f"cannot cut {len(order)} classes into {num_tasks} tasks of {classes_per_task} classes "
            f"(at most {available})"
        )
    return [[int(c) for c in order[t * classes_per_task : (t + 1) * classes_per_task]] for t in range(num_tasks)]


def _class_ranks(labels: np.ndarray) -> np.ndarray:
    """rank[i] = how many earlier entries share labels[i]."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    ranks = np.empty(len(labels), dtype=np.int64)
    ranks[order] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return ranks


def _pick(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask choosing `counts[c]` random entries of each class c."""
    perm = rng.permutation(len(labels))
    mask = np.zeros(len(labels), dtype=bool)
    mask[perm] = _class_ranks(labels[perm]) < counts[labels[perm]]
    return mask


def _balanced_limit(labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of at most `limit` entries, taken round-robin over classes in random order."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    perm = rng.permutation(len(labels))
    ranks = _class_ranks(labels[perm])
    return np.sort(perm[np.argsort(ranks, kind="stable")[:limit]])


def _holdout(labels: np.ndarray, holdout: Holdout, rng: np.random.Generator, what: str, task: str,
             class_names: list[str], option: str) -> np.ndarray:
    sizes = np.bincount(labels, minlength=len(class_names))
    counts = holdout.counts(sizes)
    short = np.flatnonzero((counts >= sizes) & (counts > 0))
    if len(short):
        c = int(short[0])
        raise DatasetError(
            f"{task}: class {class_names[c]!r} has {sizes[c]} training samples, too few to hold out "
            f"{counts[c]} for {what} and keep some for training; lower {option}"
        )
    return _pick(labels, counts, rng)


def _digest(ids: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def _per_class(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices keeping (at most) n random samples of every class, in ascending row order."""
    keep = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def channel_stats(xs: Sequence[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (dimension 1) mean/std in [0, 1] scale over (N, C, ...) arrays of any rank, in float64."""
    total, s1, s2 = 0, 0.0, 0.0
    for x in xs:
        axes = (0, *range(2, x.ndim))
        for start in range(0, len(x), 4096):
            chunk = x[start : start + 4096].astype(np.float64)
            if x.dtype == np.uint8:
                chunk /= 255.0
            s1 = s1 + chunk.sum(axis=axes)
            s2 = s2 + (chunk**2).sum(axis=axes)
            total += chunk.size // max(chunk.shape[1], 1)
    if total == 0:
        raise DatasetError("cannot compute mean/std: no training samples")
    mean = s1 / total
    std = np.sqrt(np.maximum(s2 / total - mean**2, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def assemble(
    *,
    name: str,
    train: Pool,
    test: Pool | None,
    class_names: list[str],
    task_classes: list[list[int]],
    task_names: list[str],
    seed: int,
    val: Holdout | Pool,
    test_holdout: Holdout | None = None,
    sampling: Sampling = Sampling(),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    meta: dict[str, Any] | None = None,
    val_option: str = "val_fraction",
) -> TaskStream:
    """Cut pools into tasks: keep `sampling.per_class` training samples per class, select each task's classes,
    relabel them 0..k-1 in `task_classes` order, carve test (when `test` is None) and then validation (unless
    `val` is a Pool) out of train, and cap the train and validation splits (and the test split with
    `sampling.limit_test`) at `sampling.limit`."""
    augment = sampling.augment
    input_shape = tuple(int(d) for d in train.x.shape[1:])
    if augment is not None:
        try:
            check_augment(augment, input_shape)
        except ValueError as exc:
            raise DatasetError(f"data.augment: {exc}") from None
    if sampling.per_class is not None:  # the low-data setting: a seeded, class-balanced subset of the train pool
        train = train.subset(_per_class(train.y, sampling.per_class, np.random.default_rng([seed, _PER_CLASS])))
    limited = ("train", "val", "test") if sampling.limit_test else ("train", "val")
    splits: list[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    task_meta = []
    for t, classes in enumerate(task_classes):
        lut = np.full(len(class_names), -1, dtype=np.int64)
        lut[classes] = np.arange(len(classes))
        names = [class_names[c] for c in classes]

        def take(pool: Pool, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return pool.images(rows), lut[pool.y[rows]], pool.ids[rows]

        rows = np.flatnonzero(lut[train.y] >= 0)
        if test is None:
            assert test_holdout is not None
            is_test = _holdout(lut[train.y[rows]], test_holdout, np.random.default_rng([seed, t, _TEST]),
                               "testing", task_names[t], names, "test_fraction")
            test_rows, rows = rows[is_test], rows[~is_test]
            test_part = take(train, test_rows)
        else:
            test_part = take(test, np.flatnonzero(lut[test.y] >= 0))
        if isinstance(val, Pool):
            parts = {"train": take(train, rows), "val": take(val, np.flatnonzero(lut[val.y] >= 0)), "test": test_part}
        else:
            is_val = _holdout(lut[train.y[rows]], val, np.random.default_rng([seed, t, _VAL]),
                              "validation", task_names[t], names, val_option)
            parts = {"train": take(train, rows[~is_val]), "val": take(train, rows[is_val]), "test": test_part}
        for i, split in enumerate(("train", "val", "test")):
            if split in limited:
                x, y, ids = parts[split]
                keep = _balanced_limit(y, sampling.limit, np.random.default_rng([seed, t, _LIMIT, i]))
                parts[split] = (x[keep], y[keep], ids[keep])
        for split in ("train", "test"):  # an empty validation split is allowed: val_per_task=0 asks for it
            if len(parts[split][1]) == 0:
                raise DatasetError(f"{task_names[t]}: no {split} samples for classes {names}")
        splits.append(parts)
        task_meta.append({
            "index": t,
            "name": task_names[t],
            "classes": names,
            "class_ids": [int(c) for c in classes],
            "sizes": {s: int(len(p[1])) for s, p in parts.items()},
            "val_ids": [int(i) for i in parts["val"][2]],
            "test_ids": [int(i) for i in parts["test"][2]],
            "digests": {s: _digest(p[2]) for s, p in parts.items()},
        })

    if mean is None or std is None:
        mean, std = channel_stats([p["train"][0] for p in splits])
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    tasks = []
    for t, parts in enumerate(splits):
        data = {
            s: TaskData(_tensor(x), _tensor(y), mean, std, _tensor(ids), augment if s == "train" else None)
            for s, (x, y, ids) in parts.items()
        }
        classes = task_meta[t]["classes"]
        tasks.append(Task(t, task_names[t], classes, len(classes), data["train"], data["val"], data["test"]))
    used = {c for classes in task_classes for c in classes}
    full_meta = dict(meta or {})
    full_meta.update({
        "stream": name,
        "seed": int(seed),
        "input_shape": list(input_shape),
        "mean": list(mean),
        "std": list(std),
        # what a raw input is multiplied by before (x - mean) / std: 1/255 for uint8 images, a kind's own value
        # (digits: 1/16) or 1 for data already in [0, 1]; exports record it in meta.json
        "pixel_scale": full_meta.get("pixel_scale", 1 / 255 if train.x.dtype == np.uint8 else 1.0),
        "augment": augment,
        "limit_per_task": sampling.limit,
        "limit_test": sampling.limit_test,
        "train_per_class": sampling.per_class,
        "class_names": list(class_names),
        # classes of the source no task holds (e.g. 10 classes cut into tasks of 3): said, never silently dropped
        "unused_classes": [name for c, name in enumerate(class_names) if c not in used],
        "tasks": task_meta,
    })
    return TaskStream(name, tasks, input_shape, mean, std, full_meta)  # type: ignore[arg-type]
