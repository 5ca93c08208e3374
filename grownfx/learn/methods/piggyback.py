"""Piggyback (Mallya, Davis & Lazebnik 2018): one backbone trained on task 1, a binary mask per later task.

From pretrained weights (`model.weights`, `model.weights_task`) the loaded network is a frozen task 0 and every
task of the stream learns a mask over it: the paper's own setting (ImageNet-pretrained VGG-16 / ResNet-50).

Task 1 trains the full backbone (granularity 'element': every weight becomes task 1's).  Every later task
learns only a real-valued score per weight, binarised by a threshold in the forward pass with a
straight-through gradient, plus its own norms and head.  Defaults from arunmallya/piggyback: score init 1e-2,
threshold 5e-3, Adam 1e-4 for the scores.
"""

from __future__ import annotations

from typing import Optional

from grownfx.engine import masks as M
from grownfx.engine.context import DENSE, SEL, MaskPolicy
from grownfx.data import Task
from grownfx.learn.budget import task_epochs
from grownfx.learn.records import TaskRecord
from grownfx.learn.training import Timer
from grownfx.learn.methods.base import NetMethod

# Piggyback's Binarizer passes the gradient through unchanged.  Our surrogate is sigmoid((s - thr) * scale),
# whose slope at the scores Piggyback uses (|s - thr| ~ 1e-2) is scale / 4: scale 4 gives that unit gradient.
PIGGYBACK_STE = M.STEConfig(init=1e-2, threshold=5e-3, scale=4.0)


def piggyback_policy(ste: M.STEConfig = PIGGYBACK_STE) -> MaskPolicy:
    return MaskPolicy(frozen_kind=SEL, released_kind=DENSE, grown_kind=DENSE, selective_kind="ste",
                      selective_ste=ste)


class PiggybackContinual(NetMethod):
    name = "piggyback"
    pretrained_task = True  # Piggyback's own setting: masks over a frozen pretrained network

    def task0_policy(self) -> MaskPolicy:
        return piggyback_policy()

    def learn(self, task: Task, target: Optional[float], resume=None) -> TaskRecord:
        timer, cfg = Timer(), self.recipe.method
        net = self.net
        # resumed: the part-learned task (its scores) as the mid-task checkpoint left it
        t, _ = self.begin(task, piggyback_policy(M.STEConfig(cfg.mask_init, cfg.mask_threshold, PIGGYBACK_STE.scale)),
                          resume)
        # task 1: every weight is free, so this trains the backbone; later tasks: scores, norms and head only
        epochs = self.train(task, t, task_epochs(self.recipe.training), "train", masks=self.mask_optimizer(cfg.mask_lr))
        history = self.history
        history.append(self.evaluate(t - self.offset, task.val))  # evaluate takes the stream's index
        stats = net.unit_stats()
        return self.record(task, t, target, history, timer, epochs, selective_zero_frac=stats["selective_zero_frac"])
