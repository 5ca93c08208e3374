"""CPG (Hung et al. 2019): compact, pick, grow, on one weight bank owned weight by weight.

For task t (ivclab/CPG's `CPG_cifar100_scratch_mul_1.5.sh`, decisions on validation data only):
    pick + train : a piggyback mask (straight-through) on earlier tasks' weights, every free weight trained
    grow         : while validation accuracy < target and the width cap allows, add `grow_ratio` of each
                   backbone group's width and train again
    compact      : gradual magnitude pruning of the task's own weights, 0.1 -> `max_sparsity` on a cubic
                   schedule, a short retraining after each level; keep the largest sparsity whose validation
                   accuracy still meets the criterion (the target, or the unpruned accuracy if that misses it)
    freeze       : kept weights become task t's; pruned ones stay free for later tasks

From pretrained weights kept as task 0 (`model.weights`, `model.weights_task`; ivclab/CPG `experiment2/
CPG_imagenet_vgg.sh`: the ImageNet-pretrained network is its first task, then CUBS, Cars, Flowers, WikiArt,
Sketch): the loaded network releases `pretrained_prune_ratio` of each layer's weights by magnitude and is frozen as
task 0; every stream task picks from it with its piggymask, trains the released weights and grows when
necessary.  CPG compacts the ImageNet network by gradual pruning with ImageNet retraining, keeping the sparsest
level that meets its accuracy; grownfx has no task-0 training data, so the ratio is one-shot and configured.
"""

from __future__ import annotations

import math
from typing import Optional

from grownfx.engine import state as net_state
from grownfx.engine.context import DENSE, SEL, MaskPolicy
from grownfx.data import Task
from grownfx.learn import budget
from grownfx.learn.growth import round_sizes
from grownfx.learn.records import TaskRecord
from grownfx.learn.training import Timer
from grownfx.learn.methods.base import NetMethod
from grownfx.learn.methods.packnet import prune_pretrained, prune_to
from grownfx.learn.methods.piggyback import PIGGYBACK_STE


def cubic_levels(start: float, end: float, steps: int) -> list[float]:
    """Zhu & Gupta's gradual schedule s_i = end + (start - end)(1 - i/(n-1))^3, i = 0..n-1."""
    if steps == 1:
        return [end]
    return [end + (start - end) * (1 - i / (steps - 1)) ** 3 for i in range(steps)]


def step_levels(step: float, end: float) -> list[float]:
    """ivclab/CPG's levels: step, 2 step, ... while <= end (0.1, 0.2, ..., 0.9 for step 0.1, end 0.95)."""
    n = int(math.floor(end / step + 1e-9))
    return [round(step * i, 10) for i in range(1, n + 1)]


def cpg_policy() -> MaskPolicy:
    return MaskPolicy(frozen_kind=SEL, released_kind=DENSE, grown_kind=DENSE, selective_kind="ste",
                      selective_ste=PIGGYBACK_STE)


class CPGContinual(NetMethod):
    """Mid-task checkpoints record the phase (pick; grow round r; compact level i, or the budget's last
    retraining at round len(levels)) with the widths before growth, the rounds grown, the levels tried and kept,
    and the snapshot a failing level rolls back to (in the method state)."""

    name = "cpg"
    phases = ("pick", "grow", "compact")
    pretrained_task = True  # the paper's fine-grained setting: the pretrained network is the first task

    def task0_policy(self) -> MaskPolicy:
        return cpg_policy()

    def compact_pretrained(self) -> None:
        prune_pretrained(self.net, self.recipe.method.pretrained_prune_ratio)

    def __init__(self, recipe, stream, device, **hooks):
        super().__init__(recipe, stream, device, **hooks)
        self.full_widths = {g.id: g.width for g in self.net.growable_groups}
        self.sparsity: list[float] = []  # the compaction level kept for each task
        self.compaction: list[list[dict]] = []  # per task: every level tried, its val accuracy, kept or not
        self.snapshot: Optional[dict] = None  # mid-compaction: the net of the last level kept (a rollback's)

    def learn(self, task: Task, target: Optional[float], resume=None) -> TaskRecord:
        timer, cfg, training = Timer(), self.recipe.method, self.recipe.training
        net = self.net
        t, position = self.begin(task, cpg_policy(), resume)  # resumed: the net as the checkpoint left it
        at = position.stage if position is not None else "pick"
        masks = self.mask_optimizer(cfg.mask_lr)
        phase, history = self.phase, self.history
        if at == "pick":
            phase.update(widths={str(g): w for g, w in net.structure.widths.items()}, rounds=0)
        widths = {int(g): w for g, w in phase["widths"].items()}
        rounds = phase["rounds"]
        grow_epochs = training.stage2_epochs or training.epochs
        # an epoch budget (learn/budget.py): pick takes half, grow rounds and compaction levels what is left
        if at == "pick":
            epochs = self.train(task, t, budget.first_phase(training), "pick", masks=masks)
            history.append(self.evaluate(t - self.offset, task.val))
        elif at == "grow":  # resumed in round `rounds`, the net already grown for it
            epochs = position.epochs_done - position.epoch
            epochs += self.train(task, t, budget.capped(training, grow_epochs, epochs), "grow", masks=masks,
                                 round=rounds, before=epochs)
            history.append(self.evaluate(t - self.offset, task.val))
        else:  # resumed in compaction: picking and growth are done
            epochs = phase["epochs"]
        while (at != "compact" and target is not None and history[-1] < target and budget.has_left(training, epochs)
               and self._grow()):
            rounds += 1
            phase["rounds"] = rounds
            epochs += self.train(task, t, budget.capped(training, grow_epochs, epochs), "grow", masks=masks,
                                 round=rounds, before=epochs)
            history.append(self.evaluate(t - self.offset, task.val))
        phase["epochs"] = epochs
        sparsity, spent = self._compact(task, t, target, history, epochs, position if at == "compact" else None)
        self.sparsity.append(sparsity)
        growth = {str(g): w - widths.get(g, w) for g, w in net.structure.widths.items() if w != widths.get(g, w)}
        return self.record(task, t, target, history, timer, epochs + spent, grew=bool(growth), growth=growth,
                           growth_rounds=rounds, selective_zero_frac=net.unit_stats()["selective_zero_frac"],
                           extra={"sparsity": sparsity, "compaction": self.compaction[-1]})

    # -- grow -----------------------------------------------------------------------------------------------
    def _grow(self) -> bool:
        """Add grow_ratio x the backbone width to every growable group below max_width; False if none can."""
        cfg, net = self.recipe.method, self.net
        plan = round_sizes(net, self.full_widths, cfg.grow_ratio, cfg.max_width)
        for gid, n in plan.items():
            net.grow(channels=n, groups=[gid])
        return bool(plan)

    # -- compact --------------------------------------------------------------------------------------------
    def _compact(self, task: Task, t: int, target: Optional[float], history: list[float],
                 done: int = 0, position=None) -> tuple[float, int]:
        """Prune level by level; each level's last epoch event carries its sparsity, val accuracy and verdict.
        With an epoch budget (`done` epochs of it spent), levels stop when it is, and what is left retrains the
        kept network.  `position`: a mid-task checkpoint in compaction round `position.round` to resume."""
        cfg, training, phase = self.recipe.method, self.recipe.training, self.phase
        if position is None:
            unpruned = history[-1]
            phase.update(criterion=target if target is not None and unpruned >= target else unpruned,
                         kept=0.0, spent=0, trail=[])
            self.snapshot = _snapshot(self.net)
        criterion, trail = phase["criterion"], phase["trail"]
        first = position.round if position is not None else 0  # levels before it were tried (and kept)
        # CPG retrains with lr 1e-3 after each pruning step (10x below its 1e-2), masks fixed
        lr = cfg.prune_lr if cfg.prune_lr is not None else training.optimizer.lr * 0.1
        weights = training.optimizer.model_copy(update={"lr": lr})
        epochs = cfg.prune_epochs if cfg.prune_epochs is not None else max(1, training.epochs // 4)
        kept, spent = phase["kept"], phase["spent"]
        levels = (step_levels(cfg.prune_step, cfg.max_sparsity) if cfg.prune_schedule == "steps"
                  else cubic_levels(0.1, cfg.max_sparsity, cfg.prune_steps))
        for i, level in enumerate(levels):
            if i < first:
                continue
            if not budget.has_left(training, done + spent):
                break
            if not (position is not None and i == first):  # a resumed level's pruning is in the net
                for layer in self.net.masked_layers():
                    prune_to(layer, level)

            def verdict(level=level) -> dict:
                val = self.evaluate(t - self.offset, task.val)
                trail.append({"sparsity": level, "val_acc": val, "kept": val >= criterion})
                return {**trail[-1], "criterion": criterion}

            spent += self.train(task, t, budget.capped(training, epochs, done + spent), "compact", weights=weights,
                                round=i, after=verdict, before=done + spent)
            if not trail[-1]["kept"]:
                _restore(self.net, self.snapshot)
                break
            kept, self.snapshot = level, _snapshot(self.net)
            history.append(trail[-1]["val_acc"])
            phase.update(kept=kept, spent=spent)
        rest = budget.left(training, done + spent)
        if rest:
            phase.update(kept=kept, spent=spent)
            spent += self.train(task, t, rest, "compact", weights=weights, round=len(levels), before=done + spent)
            history.append(self.evaluate(t - self.offset, task.val))
        self.compaction.append(list(trail))
        self.snapshot = None
        return kept, spent

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state(self) -> dict:
        state = {**super().state(), "sparsity": list(self.sparsity), "compaction": self.compaction}
        if self.snapshot is not None:  # a mid-task checkpoint in compaction
            state["snapshot"] = self.snapshot
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.sparsity = list(state.get("sparsity", []))
        self.compaction = list(state.get("compaction", []))
        self.snapshot = state.get("snapshot")


def _snapshot(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _restore(net, snapshot: dict) -> None:
    net_state.reload_state(net, snapshot)  # kinds and weights copied in place; derived tensors invalidated


