"""1-D sequences held in numpy arrays, and a Conv1d model: docs/data.md's worked example (generated data)."""
import numpy as np
from torch import nn


def make_tasks(seed=0, tasks=3, per_class=60, length=32):
    """Task k: tell two sine frequencies apart in noisy 2-channel sequences (N, 2, length)."""
    rng, time = np.random.default_rng(seed), np.linspace(0, 1, length)

    def split(freqs, n):
        y = np.repeat([0, 1], n)
        wave = 2 * np.pi * np.asarray(freqs)[y, None] * time + rng.uniform(0, 2 * np.pi, (2 * n, 1))
        x = np.stack([np.sin(wave), np.cos(wave)], axis=1) + 1.2 * rng.standard_normal((2 * n, 2, length))
        return x.astype(np.float32), y

    freqs = [(2 + 2 * k, 3 + 2 * k) for k in range(tasks)]
    return [{"train": split(f, per_class), "test": split(f, per_class // 2), "classes": [f"{f[0]} Hz", f"{f[1]} Hz"]}
            for f in freqs]


def conv1d_net(num_classes, width=32):
    """Two Conv1d blocks, average pooling over time, a Linear head."""
    return nn.Sequential(
        nn.Conv1d(2, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Conv1d(width, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, num_classes))
