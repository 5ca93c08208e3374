"""GROWN's one decision, grow or not, read from the validation split.

`accuracy` is the paper's rule: grow while the validation accuracy is below the target.  On a small split it fails
one way: a task's few validation samples are all classified right (100 %) long before the network matches the
reference, the rule sees the target met and never grows.  `lower_bound` asks the split to *show* the target is
met: it grows while the Wilson lower confidence bound of the accuracy is below the target.  With thousands of
samples the bound is within a fraction of a point of the accuracy (the paper's rule, up to ties: a tie grows); on
20 samples 20/20 correct bounds the accuracy at 88 % (95 %), so a 100 % target keeps the task growing until its
growth budget (`growth.max_rounds`, `growth.max_width`) is spent, and GROWN's L0 penalty still prunes the
candidates it does not need.  Wilson rather than the normal approximation: it stays inside [0, 1] and is not
degenerate at 0 or n correct, which is exactly where small splits sit.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional

__all__ = ["accuracy_lower_bound", "below_target"]


def accuracy_lower_bound(accuracy: float, n: int, confidence: float) -> float:
    """One-sided Wilson lower bound (in %) of an accuracy (%) measured on `n` samples; 0 with no sample."""
    if n <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence) if confidence > 0.5 else 0.0
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(max(100.0 * (centre - spread) / (1 + z * z / n), 0.0), 100.0)  # rounding can step outside


def below_target(accuracy: float, n: int, target: Optional[float], decision: str = "accuracy",
                 confidence: float = 0.95) -> bool:
    """Whether the task has not (shown it has) reached `target`: the condition to grow under `decision`."""
    if target is None:
        return False
    if decision == "accuracy":
        return accuracy < target
    if decision == "lower_bound":
        return accuracy_lower_bound(accuracy, n, confidence) < target
    raise ValueError(f"unknown growth decision {decision!r}")
