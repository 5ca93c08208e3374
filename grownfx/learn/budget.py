"""Equal-budget mode (`training.epoch_budget`): how many epochs a method's phases get when every method must
train exactly N epochs per task (docs/baselines.md, "Equal epoch budget").

Without a budget every method keeps its own schedule.  With one:
    one-phase methods (scratch, fine-tune, PNN, Piggyback): the N epochs
    two fixed phases (PackNet's train and retrain): N split in the ratio of the method's own schedule
    open-ended phases (GROWN's stage 1 and growth rounds, CPG's pick, grow and compaction levels): the first
    phase gets half of N (rounded up), each later phase its own epochs capped at what is left, and the epochs
    still left when the method stops early go to one last phase that uses them up (`left`).
"""

from __future__ import annotations

from grownfx.recipe.schema import TrainingConfig


def task_epochs(training: TrainingConfig) -> int:
    """Epochs of a one-phase method's task."""
    return training.epoch_budget or training.epochs


def split_two(training: TrainingConfig, second: int) -> tuple[int, int]:
    """(first, second) epochs of a two-phase method whose own schedule is (training.epochs, second)."""
    n = training.epoch_budget
    if n is None:
        return training.epochs, second
    later = min(n - 1, round(n * second / (training.epochs + second)))
    return n - later, later


def first_phase(training: TrainingConfig, more_phases: bool = True) -> int:
    """Epochs of an open-ended method's first phase (all of the budget when no later phase can follow)."""
    n = training.epoch_budget
    if n is None:
        return training.epochs
    return (n + 1) // 2 if more_phases else n


def capped(training: TrainingConfig, epochs: int, done: int) -> int:
    """A later phase's `epochs`, capped at the budget left after `done` epochs of the task."""
    return epochs if training.epoch_budget is None else max(0, min(epochs, training.epoch_budget - done))


def has_left(training: TrainingConfig, done: int) -> bool:
    """Whether another phase may start after `done` epochs of the task (always, without a budget)."""
    return training.epoch_budget is None or training.epoch_budget > done


def left(training: TrainingConfig, done: int) -> int:
    """Epochs of the task's budget still unspent after `done` (0 without a budget)."""
    return 0 if training.epoch_budget is None else max(0, training.epoch_budget - done)


__all__ = ["capped", "first_phase", "has_left", "left", "split_two", "task_epochs"]
