"""The target rule (`target.rule` of a recipe): the validation accuracy GROWN and CPG aim at on each task.

    a number                         that accuracy on every task
    a list                           one accuracy per task
    "scratch - m"                    the validation accuracy of the full backbone trained from scratch on the
                                     task (the seed paper's reference), minus m
    "best(scratch, finetune) - m"    the larger of that and fine-tune's accuracy when it learned the task, minus m

`grownfx run` (run/runner.py) and `grownfx compare` (run/compare.py) both take targets from here: the same
reference training (`scratch_accuracy`, fine-tune's `finetune_references`) and the same rule (`reference_accuracy`,
`task_target`), whether the reference is trained for the run or read from a comparison's own scratch run.
"""

from __future__ import annotations

from typing import Optional

import torch

from grownfx.data import Task
from grownfx.learn.methods.base import Trainer
from grownfx.learn.methods.finetune import finetune_references
from grownfx.learn.methods.scratch import fresh_backbone, train_plain
from grownfx.recipe.schema import Recipe, parse_target, target_sources

TARGETED = ("grown", "cpg")  # the methods that decide on a target

__all__ = ["TARGETED", "finetune_references", "reference_accuracy", "scratch_accuracy", "scratch_epochs",
           "task_target", "wants_target"]


def wants_target(recipe: Recipe) -> bool:
    return recipe.method.name in TARGETED


def scratch_epochs(recipe: Recipe) -> int:
    return recipe.target.scratch_epochs or recipe.training.epochs


def scratch_accuracy(recipe: Recipe, task: Task, device: torch.device, dist=None, on_epoch=None) -> float:
    """Validation accuracy of the full backbone trained from scratch on `task`: seed (recipe seed, "scratch",
    task index), the recipe's schedule for `scratch_epochs` epochs.  The `scratch` method trains the same network
    the same way, so a comparison reads its run instead when the epochs match.  `on_epoch`: each epoch's event
    (progress displays)."""
    seed = (recipe.seed, "scratch", task.index)
    trainer = Trainer(recipe.training, device, dist, on_epoch=on_epoch)
    return train_plain(fresh_backbone(recipe, task, seed), task, trainer, seed, scratch_epochs(recipe))


def reference_accuracy(rule, scratch: float, finetune: Optional[float]) -> float:
    """The accuracy a string rule subtracts its margin from: scratch's, or the best of scratch's and fine-tune's."""
    if "finetune" in target_sources(rule):
        if finetune is None:
            raise ValueError(f"target rule {rule!r} needs fine-tune's accuracy")
        return max(scratch, finetune)
    return scratch


def task_target(rule, t: int, reference: Optional[float] = None) -> float:
    """Task t's target under `rule`; `reference`: `reference_accuracy` of task t (needed by a string rule only)."""
    if isinstance(rule, (int, float)):
        return float(rule)
    if isinstance(rule, list):
        return float(rule[t])
    margin = parse_target(rule)
    if margin is None:
        raise ValueError(f"malformed target rule {rule!r}")
    if reference is None:
        raise ValueError(f"target rule {rule!r} needs the reference accuracy of task {t + 1}")
    return reference - margin
