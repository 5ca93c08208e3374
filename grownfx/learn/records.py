"""What a method reports about a task (`TaskRecord`) and where a task's training stands (`LearnerPosition`).

Shared by the GROWN learner, the baselines and the runner, so that none of them imports another to get them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class TaskRecord:
    """What happened while learning one task (the runner adds test accuracies)."""

    index: int
    name: str
    num_classes: int
    target: Optional[float] = None
    val_acc: float = 0.0
    val_history: list[float] = field(default_factory=list)
    grew: bool = False
    growth_rounds: int = 0
    growth: dict[str, int] = field(default_factory=dict)
    pruned_candidates: int = 0
    params_stored: int = 0
    params_task: int = 0
    mask_bytes: int = 0
    time_s: float = 0.0
    epochs: int = 0
    selective_zero_frac: Optional[float] = None
    released: int = 0
    retrained: int = 0
    extra: dict = field(default_factory=dict)  # method-specific facts (e.g. CPG's chosen sparsity)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LearnerPosition:
    """Where a task's training stands; saved in mid-task checkpoints (GROWN and the baselines alike).

    `stage`/`round`/`epoch`: the stage being trained and the epochs of it already done; `epochs_done`: epochs
    of the whole task so far; `elapsed`: training seconds before the interruption.
    """

    stage: str = "start"  # GROWN: start | stage1 | grow | tune | done; a baseline: the name of its stage
    round: int = 0
    epoch: int = 0
    val_history: list[float] = field(default_factory=list)
    widths_at_start: dict[str, int] = field(default_factory=dict)
    epochs_done: int = 0
    pruned: int = 0
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)  # a method's own facts about its phases so far (e.g. CPG's levels)


__all__ = ["LearnerPosition", "TaskRecord"]
