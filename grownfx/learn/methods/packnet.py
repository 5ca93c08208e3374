"""PackNet (Mallya & Lazebnik 2018): train the free weights, release the smallest, retrain, freeze.

From pretrained weights kept as task 0 (`model.weights`, `model.weights_task`): the paper's fine-grained setting.
The loaded network first releases `pretrained_prune_ratio` of each layer's weights by magnitude (0.5 in
arunmallya/packnet `src/scripts/run_imagenet_pruning.sh`, `--prune_perc_per_layer 0.5`), the rest is frozen as
task 0, and the stream's tasks train the released weights.  PackNet then retrains the pruned ImageNet network for
10 epochs on ImageNet; grownfx has no task-0 training data and does not.

One full-width weight bank, owned weight by weight (granularity 'element').  Task t computes with every weight
an earlier task owns, as it is (frozen), plus the free weights it trains.  After training it releases
`prune_ratio` of the weights it trained, layer by layer, by magnitude (mask kind OFF: they stay free for
later tasks), retrains the rest and freezes them.  Norms and heads are per task (the engine does that).
"""

from __future__ import annotations

from typing import Optional

import torch

from grownfx.engine.context import DENSE, OFF, MaskPolicy
from grownfx.data import Task
from grownfx.engine.banks import MaskedLayer
from grownfx.engine.layers import FREE
from grownfx.learn.budget import split_two
from grownfx.learn.records import TaskRecord
from grownfx.learn.training import Timer
from grownfx.learn.methods.base import NetMethod


def own_units(layer: MaskedLayer) -> torch.Tensor:
    """Units the learning task trains itself: free ones (the engine keeps owned ones frozen)."""
    return layer.owner == FREE


def unit_magnitude(layer: MaskedLayer) -> torch.Tensor:
    return layer.unit_sum(layer.weight.detach().abs())


def prune_to(layer: MaskedLayer, sparsity: float) -> int:
    """Switch off the smallest of the task's own units until `round(sparsity * own)` are off; returns that."""
    own = own_units(layer)
    off = own & (layer.kind == OFF)
    want = int(round(sparsity * int(own.sum())))
    extra = want - int(off.sum())
    if extra > 0:
        candidates = own & (layer.kind != OFF)
        score = unit_magnitude(layer).masked_fill(~candidates, float("inf")).reshape(-1)
        units = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        units[torch.topk(score, extra, largest=False).indices] = True
        layer.set_kind(units.view(own.shape), OFF)
    return want


def packnet_policy() -> MaskPolicy:
    # earlier tasks' weights as they are, every free weight trained; no masks (and no channel scale installed)
    return MaskPolicy(frozen_kind=DENSE, released_kind=DENSE, grown_kind=DENSE)


def prune_pretrained(net, ratio: float) -> None:
    """Release `ratio` of every masked layer's weights of the learning (pretrained) task by magnitude, before it is
    frozen: the capacity PackNet and CPG free in a pretrained network for the tasks after it."""
    if ratio > 0:
        for layer in net.masked_layers():
            prune_to(layer, ratio)


class PackNetContinual(NetMethod):
    name = "packnet"
    phases = ("train", "retrain")
    pretrained_task = True  # the paper's setting: the pruned pretrained network is task 0

    def task0_policy(self) -> MaskPolicy:
        return packnet_policy()

    def compact_pretrained(self) -> None:
        prune_pretrained(self.net, self.recipe.method.pretrained_prune_ratio)

    def learn(self, task: Task, target: Optional[float], resume=None) -> TaskRecord:
        timer, cfg = Timer(), self.recipe.method
        net = self.net
        t, _ = self.begin(task, packnet_policy(), resume)  # resumed: the net as the mid-task checkpoint left it
        training = self.recipe.training
        own_retrain = cfg.retrain_epochs if cfg.retrain_epochs is not None else max(1, training.epochs // 2)
        train, retrain = split_two(training, own_retrain)  # an epoch budget splits in this ratio
        history = self.history
        if not self.skips("train"):  # a checkpoint in retrain was taken after the pruning: its kinds are in the net
            epochs = self.train(task, t, train, "train")
            history.append(self.evaluate(t - self.offset, task.val))  # the stream's index
            for layer in net.masked_layers():
                prune_to(layer, cfg.prune_ratio)
        else:
            epochs = train
        epochs += self.train(task, t, retrain, "retrain", before=epochs) if retrain else 0
        history.append(self.evaluate(t - self.offset, task.val))  # the stream's index
        return self.record(task, t, target, history, timer, epochs)
