"""CPG (Hung et al. 2019): compact, pick, grow, on one weight bank owned weight by weight.

For task t (ivclab/CPG's `CPG_cifar100_scratch_mul_1.5.sh`, decisions on validation data only):
    pick + train : a piggyback mask (straight-through) on earlier tasks' weights, every free weight trained
    grow         : while validation accuracy < target and the width cap allows, add `grow_ratio` of each
                   backbone group's width and train again
    compact      : gradual magnitude pruning of the task's own weights, 0.1 -> `max_sparsity` on a cubic
                   schedule, a short retraining after each level; keep the largest sparsity whose validation
                   accuracy still meets the criterion (the target, or the unpruned accuracy if that misses it)
    freeze       : kept weights become task t's; pruned ones stay free for later tasks
"""

from __future__ import annotations

import math
from typing import Optional

from grownfx.engine import state as net_state
from grownfx.engine.context import DENSE, SEL, MaskPolicy
from grownfx.data import Task
from grownfx.learn.records import TaskRecord
from grownfx.learn.training import Timer
from grownfx.learn.methods.base import NetMethod
from grownfx.learn.methods.packnet import prune_to
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
    return MaskPolicy(frozen_kind=SEL, released_kind=DENSE, grown_kind=DENSE, gates=False, selective_kind="ste",
                      selective_ste=PIGGYBACK_STE)


class CPGContinual(NetMethod):
    name = "cpg"

    def __init__(self, recipe, stream, device, **hooks):
        super().__init__(recipe, stream, device, **hooks)
        self.full_widths = {g.id: g.width for g in self.net.growable_groups}
        self.sparsity: list[float] = []  # the compaction level kept for each task
        self.compaction: list[list[dict]] = []  # per task: every level tried, its val accuracy, kept or not

    def learn(self, task: Task, target: Optional[float], resume=None) -> TaskRecord:
        timer, cfg, training = Timer(), self.recipe.method, self.recipe.training
        net = self.net
        t = net.add_task(task.num_classes)
        net.set_policy(cpg_policy())
        masks = self.mask_optimizer(cfg.mask_lr)
        widths = dict(net.ctx.widths)
        epochs = self.train(task, t, training.epochs, "pick", masks=masks)
        history = [self.evaluate(t, task.val)]
        rounds = 0
        while target is not None and history[-1] < target and self._grow():
            rounds += 1
            epochs += self.train(task, t, training.stage2_epochs or training.epochs, "grow", masks=masks,
                                 round=rounds)
            history.append(self.evaluate(t, task.val))
        sparsity, spent = self._compact(task, t, target, history)
        self.sparsity.append(sparsity)
        growth = {str(g): w - widths.get(g, w) for g, w in net.ctx.widths.items() if w != widths.get(g, w)}
        return self.record(task, t, target, history, timer, epochs + spent, grew=bool(growth), growth=growth,
                           growth_rounds=rounds, selective_zero_frac=net.unit_stats()["selective_zero_frac"],
                           extra={"sparsity": sparsity, "compaction": self.compaction[-1]})

    # -- grow -----------------------------------------------------------------------------------------------
    def _grow(self) -> bool:
        """Add grow_ratio x the backbone width to every growable group below max_width; False if none can."""
        cfg, net = self.recipe.method, self.net
        added = False
        for gid, full in self.full_widths.items():
            gran = net.coupling.groups[gid].granularity
            room = int(cfg.max_width * full) - net.ctx.widths[gid]
            n = min(math.ceil(cfg.grow_ratio * full / gran) * gran, room // gran * gran)
            if n > 0:
                net.grow(channels=n, groups=[gid])
                added = True
        return added

    # -- compact --------------------------------------------------------------------------------------------
    def _compact(self, task: Task, t: int, target: Optional[float], history: list[float]) -> tuple[float, int]:
        """Prune level by level; each level's last epoch event carries its sparsity, val accuracy and verdict."""
        cfg, training = self.recipe.method, self.recipe.training
        unpruned = history[-1]
        criterion = target if target is not None and unpruned >= target else unpruned
        # CPG retrains with lr 1e-3 after each pruning step (10x below its 1e-2), masks fixed
        lr = cfg.prune_lr if cfg.prune_lr is not None else training.optimizer.lr * 0.1
        weights = training.optimizer.model_copy(update={"lr": lr})
        epochs = cfg.prune_epochs if cfg.prune_epochs is not None else max(1, training.epochs // 4)
        kept, snapshot, spent, trail = 0.0, _snapshot(self.net), 0, []
        levels = (step_levels(cfg.prune_step, cfg.max_sparsity) if cfg.prune_schedule == "steps"
                  else cubic_levels(0.1, cfg.max_sparsity, cfg.prune_steps))
        for i, level in enumerate(levels):
            for layer in self.net.masked_layers():
                prune_to(layer, level)

            def verdict(level=level) -> dict:
                val = self.evaluate(t, task.val)
                trail.append({"sparsity": level, "val_acc": val, "kept": val >= criterion})
                return {**trail[-1], "criterion": criterion}

            spent += self.train(task, t, epochs, "compact", weights=weights, round=i, after=verdict)
            if not trail[-1]["kept"]:
                _restore(self.net, snapshot)
                break
            kept, snapshot = level, _snapshot(self.net)
            history.append(trail[-1]["val_acc"])
        self.compaction.append(trail)
        return kept, spent

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {**super().state(), "sparsity": list(self.sparsity), "compaction": self.compaction}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.sparsity = list(state.get("sparsity", []))
        self.compaction = list(state.get("compaction", []))


def _snapshot(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _restore(net, snapshot: dict) -> None:
    net_state.reload_state(net, snapshot)  # kinds and weights copied in place; derived tensors invalidated


