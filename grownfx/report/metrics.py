"""Stream metrics from an accuracy matrix, one definition for the runner's summary and both reports.

`R[i][j]` is the test accuracy (%) on task j after learning task i (j <= i).  With T tasks learned:

* average accuracy: mean over j of R[T-1][j];
* backward transfer (BWT, Lopez-Paz & Ranzato 2017): mean over j < T-1 of R[T-1][j] - R[j][j];
* forgetting (Chaudhry et al. 2018): mean over j < T-1 of max over i in [j, T-2] of R[i][j], minus R[T-1][j].

One task (or none) gives 0 for BWT and forgetting.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["avg_acc", "bwt", "forgetting", "stream_metrics"]

Matrix = Sequence[Sequence[Optional[float]]]


def avg_acc(R: Matrix) -> float:
    final = [v for v in (R[-1] if R else []) if v is not None]
    return sum(final) / len(final) if final else 0.0


def bwt(R: Matrix) -> float:
    T = len(R)
    if T < 2:
        return 0.0
    return sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(R: Matrix) -> float:
    T = len(R)
    if T < 2:
        return 0.0
    return sum(max(R[i][j] for i in range(j, T - 1)) - R[-1][j] for j in range(T - 1)) / (T - 1)


def stream_metrics(R: Matrix) -> dict[str, float]:
    """{"avg_acc", "bwt", "forgetting"} of the matrix."""
    return {"avg_acc": avg_acc(R), "bwt": bwt(R), "forgetting": forgetting(R)}
