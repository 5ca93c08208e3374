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
    # learned by sparse growth from the seed (GROWN's net task 0; not a stream's first task after a pretrained
    # task 0): its first growth round is its stage 1
    from_seed: bool = False
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
    # what a method keeps between tasks besides the network's parameters, counted in values (one value = one
    # parameter-equivalent): replay's stored samples (their input values and labels), the quadratic penalties'
    # importance and anchor (EWC, SI, MAS); `stored_samples`: the samples among them
    stored_samples: int = 0
    stored_values: int = 0
    # this process's CPU seconds while learning the task (all threads; the runner measures it around `learn`,
    # resumed parts included) and per epoch of the task: comparable where wall time (time_s) swings with load
    cpu_s: float = 0.0
    cpu_s_per_epoch: Optional[float] = None
    # where time_s went: training seconds per stage (the epoch events' `seconds`, summed by their `stage`) and
    # "other" = time_s minus those (validation, pruning, snapshots, growth set-up, freezing); empty for methods
    # that do not record it (one-stage baselines: their time_s is their one stage)
    stage_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LearnerPosition:
    """Where a task's training stands; saved in mid-task checkpoints (GROWN and the baselines alike).

    `stage`/`round`/`epoch`: the stage being trained and the epochs of it already done; `epochs_done`: epochs
    of the whole task so far; `elapsed`: training seconds before the interruption.
    """

    stage: str = "start"  # GROWN: a learner.Phase value (start, stage1, grow, tune, done); a baseline: its stage
    round: int = 0
    epoch: int = 0
    val_history: list[float] = field(default_factory=list)
    widths_at_start: dict[str, int] = field(default_factory=dict)
    epochs_done: int = 0
    pruned: int = 0
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)  # a method's own facts about its phases so far (e.g. CPG's levels)


def add_epoch_time(times: dict, info: dict) -> None:
    """Add one epoch event's training seconds to `times[stage]` (a task's running per-stage breakdown)."""
    stage = str(info.get("stage") or "train")
    times[stage] = times.get(stage, 0.0) + float(info.get("seconds") or 0.0)


def stage_breakdown(times: Optional[dict], time_s: float) -> dict[str, float]:
    """TaskRecord.stage_s: the per-stage training seconds plus "other", the rest of the task's `time_s`."""
    out = {str(k): float(v) for k, v in (times or {}).items()}
    out["other"] = max(float(time_s) - sum(out.values()), 0.0)
    return out


__all__ = ["LearnerPosition", "TaskRecord", "add_epoch_time", "stage_breakdown"]
