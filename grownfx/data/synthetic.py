"""Generated streams: smooth class-conditional Gaussian patterns plus per-sample noise.

With `interfere`, every task shows the same inputs as task 0 and only the labels change (each
task's class map differs from the previous task's at every class), so a network fine-tuned on the
new task loses the old mapping.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from grownfx.data.config import SyntheticConfig
from grownfx.data.core import TaskStream
from grownfx.data.splits import Pool, Sampling, assemble

__all__ = ["build_synthetic", "make_patterns"]


def make_patterns(rng: np.random.Generator, k: int, shape: tuple[int, int, int]) -> np.ndarray:
    """k smooth patterns (k, C, H, W), each with zero mean and unit variance."""
    c, h, w = shape
    low = torch.from_numpy(rng.standard_normal((k, c, max(1, h // 4), max(1, w // 4))).astype(np.float32))
    pat = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).numpy()
    pat -= pat.mean(axis=(1, 2, 3), keepdims=True)
    return pat / (pat.std(axis=(1, 2, 3), keepdims=True) + 1e-6)


def _next_map(rng: np.random.Generator, prev: np.ndarray) -> np.ndarray:
    while True:  # a random permutation differs everywhere from prev with probability about 1/e
        perm = rng.permutation(len(prev))
        if (perm != prev).all():
            return perm


def _samples(
    rng: np.random.Generator, patterns: np.ndarray, per_class: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(patterns)), per_class)
    x = patterns[labels] + noise * rng.standard_normal((len(labels), *patterns.shape[1:]))
    return x.astype(np.float32), labels


def build_synthetic(cfg: SyntheticConfig, seed: int) -> TaskStream:
    data_seed = seed if cfg.data_seed is None else cfg.data_seed
    k = cfg.classes_per_task
    sizes = {"train": cfg.samples_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}
    pools: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {s: [] for s in sizes}
    class_names, label_maps = [], []
    label_map = np.arange(k)
    for t in range(cfg.num_tasks):
        source = 0 if cfg.interfere else t
        if t == 0 or not cfg.interfere:
            rng = np.random.default_rng([data_seed, source])
            patterns = make_patterns(rng, k, cfg.input_shape)
            generated = {s: _samples(rng, patterns, n, cfg.noise) for s, n in sizes.items()}
            offset = sum(n * k for n in sizes.values()) * source
        if cfg.interfere and t > 0:
            label_map = _next_map(np.random.default_rng([data_seed, t, 1]), label_map)
        label_maps.append([int(v) for v in label_map])
        inverse = np.argsort(label_map)
        class_names += [f"t{t}:pattern{int(inverse[j])}" for j in range(k)]
        start = offset
        for s, (x, pattern) in generated.items():
            pools[s].append((x, t * k + label_map[pattern], start + np.arange(len(x))))
            start += len(x)

    def pool(split: str) -> Pool:
        xs, ys, ids = zip(*pools[split])
        return Pool(np.concatenate(xs), np.concatenate(ys), np.concatenate(ids))

    c = cfg.input_shape[0]
    return assemble(
        name="synthetic",
        train=pool("train"),
        test=pool("test"),
        val=pool("val"),
        class_names=class_names,
        task_classes=[list(range(t * k, (t + 1) * k)) for t in range(cfg.num_tasks)],
        task_names=[f"synthetic/task{t + 1}" for t in range(cfg.num_tasks)],
        seed=seed,
        sampling=Sampling.of(cfg),
        mean=(0.0,) * c,
        std=(1.0,) * c,
        meta={
            "kind": cfg.name,
            "config": cfg.model_dump(mode="json"),
            "data_seed": data_seed,
            "label_maps": label_maps,
            "id_space": "generated: id = row of the generating task's train, val, test samples in that order"
            + (" (all tasks reuse task 0's rows)" if cfg.interfere else ""),
        },
    )
