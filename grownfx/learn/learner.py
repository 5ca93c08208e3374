"""Step 5: the GROWN learner, a readable loop over the engine.

For each task t:
    task 1 : learnable sparse growth (LSG) from the seed: a gated candidate pool, attentive masks on it
    task t>1: stage 1 "pick and reuse": selective mask on old weights + re-train released weights
             stage 2 "expand only if needed": while val accuracy < target and budget left: an LSG round
    then   : binarise, drop pruned candidates, freeze what the task owns
The ablation switches (selective mask, LSG's attentive mask, re-training) only change the mask policy.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from grownfx.engine import masks as M
from grownfx.recipe.schema import GrowthConfig, MasksConfig, TrainingConfig
from grownfx.engine.context import ATT, DENSE, OFF, SEL, MaskPolicy
from grownfx.data import Task
from grownfx.learn.distributed import Dist
from grownfx.learn import budget
from grownfx.learn.gates import CandidateGates
from grownfx.learn.growth import round_sizes
from grownfx.engine.net import GrowableNet
from grownfx.learn.records import LearnerPosition, TaskRecord, add_epoch_time, stage_breakdown
from grownfx.learn.training import StageOptim, Timer, make_optimizer, make_scaler, train_stage


def build_policy(task: int, switches: tuple[bool, bool, bool], masks: MasksConfig) -> MaskPolicy:
    selective, lsg, retrain = switches
    sel = masks.selective
    att = masks.attentive
    return MaskPolicy(
        frozen_kind=SEL if selective else DENSE,
        # on task 1 the free units are the seed network itself: always trained
        released_kind=DENSE if (retrain or task == 0) else OFF,
        grown_kind=ATT if lsg else DENSE,
        selective=M.GumbelConfig(sel.init, sel.threshold, sel.beta, sel.temperature, sel.final_temperature),
        attentive_kind=att.kind,
        attentive=M.STEConfig(att.init, att.threshold, att.scale),
        attentive_gumbel=M.GumbelConfig(att.init, att.threshold, sel.beta, sel.temperature, sel.final_temperature),
    )


class GrownLearner:
    """Learns a stream of tasks into one GrowableNet with GROWN (or one of its ablations).

    Constructing a learner leaves the net as it is.  `install()` (which `learn` calls the first time, if you have
    not) moves the net to the learner's device and installs GROWN's candidate gates as its channel scale
    (`net.set_channel_scale`); after that the learner changes the net only through the engine's public methods
    (add_task, set_policy, set_mask_temperature, grow, keep_channels, freeze_task) and the optimisers' steps.
    The schedule (gate beta, binarised last epoch, Gumbel temperature) is the learner's: set before every epoch
    from where the task's training stands, so a resumed task gets it back from its position.
    """

    def __init__(self, net: GrowableNet, *, training: TrainingConfig, growth: GrowthConfig, masks: MasksConfig,
                 switches: tuple[bool, bool, bool] = (True, True, True), sites: Optional[list[int]] = None,
                 device: torch.device | str = "cpu", seed: int = 0,
                 on_epoch: Callable[[dict], None] | None = None,
                 checkpoint: Callable[["GrownLearner", LearnerPosition, StageOptim], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False, dist: Optional[Dist] = None):
        self.net = net
        self.gates: CandidateGates | None = None  # GROWN's grown-mask on candidate channels, once installed
        self.dist = dist if dist is not None else Dist(device)  # one process: every collective is a no-op
        self.training, self.growth, self.masks = training, growth, masks
        self.switches = switches
        self.device = torch.device(device)
        self.seed = seed
        self.sites = sites if sites is not None else net.groups_matching(growth.sites.include, growth.sites.exclude,
                                                                         growth.sites.layer_types)
        full = {g.id: g.width for g in net.coupling.groups}  # widths at analysis = the full backbone
        self.full_widths = {gid: full[gid] for gid in self.sites}
        self.on_epoch = on_epoch or (lambda info: None)
        self.checkpoint = checkpoint
        self.should_stop = should_stop

    def install(self) -> CandidateGates:
        """Make the net ready for this learner: on its device, with GROWN's candidate gates installed (before a
        checkpoint holding gates is restored into it).  Returns the gates; calling it again changes nothing."""
        if self.gates is None:
            self.net.to(self.device)
            self.gates = CandidateGates.of(self.net, M.CSConfig(self.masks.grown.init, self.masks.grown.final_beta))
        return self.gates

    # -- one task -------------------------------------------------------------------------------------------
    def learn(self, task: Task, target: Optional[float] = None, resume: Optional[tuple] = None) -> TaskRecord:
        """Learn `task`; `resume` = (position, optimizer state) from a mid-task checkpoint."""
        self.install()
        net, cfg = self.net, self.training
        timer = Timer()
        pos, optim_state = resume if resume is not None else (LearnerPosition(), None)
        if pos.stage == "start":
            t = net.add_task(task.num_classes)
            net.set_policy(build_policy(t, self.switches, self.masks))
            pos.widths_at_start = {str(g): w for g, w in net.structure.widths.items()}
            if t == 0:  # learnable sparse growth from the seed network
                pos.stage = "grow" if self._grow_round(pos) else "stage1"
            else:
                pos.stage = "stage1"
        t = net.num_tasks - 1
        while True:
            # task 1's first LSG round is the task's training from the seed: `epochs`, like every method's task;
            # later growth rounds (stage 2, task 1's extra rounds) train `stage2_epochs`.  With an epoch budget
            # (learn/budget.py) stage 1 takes half of it, rounds what is left, and a `tune` stage the rest.
            first = pos.stage == "stage1" or (t == 0 and pos.round == 1)
            before = pos.epochs_done - pos.epoch  # the task's epochs before this stage (a resume included)
            if pos.stage == "tune":
                epochs = budget.left(cfg, before)
            elif first:
                epochs = budget.first_phase(cfg, self.growth.max_rounds > 0)
            else:
                epochs = budget.capped(cfg, cfg.stage2_epochs or cfg.epochs, before)
            self._train_stage(task, t, pos, epochs, optim_state, timer)
            optim_state = None
            if pos.stage == "grow":
                pos.pruned += sum(self.gates.settle(net).values())
            val = self.evaluate(t, task.val)
            pos.val_history.append(val)
            if self.should_stop():
                raise KeyboardInterrupt
            if not self._wants_growth(pos, val, target) or not self._grow_round(pos):
                if budget.left(cfg, pos.epochs_done) == 0:
                    break
                pos.stage, pos.epoch = "tune", 0  # the budget's unspent epochs: train the task's network as is
                continue
            pos.stage, pos.epoch = "grow", 0
        return self._finish(task, t, target, pos, timer)

    def _wants_growth(self, pos: LearnerPosition, val: float, target: Optional[float]) -> bool:
        if pos.round >= self.growth.max_rounds or pos.stage == "tune":
            return False
        if not budget.has_left(self.training, pos.epochs_done):
            return False
        if self.growth.when == "always":
            return pos.round == 0
        return target is not None and val < target

    def _grow_round(self, pos: LearnerPosition) -> bool:
        """Add a gated candidate pool at every site below its width cap; False when none can grow."""
        net = self.net
        plan = round_sizes(net, self.full_widths, self.growth.pool, self.growth.max_width)
        if not plan:
            return False
        for gid, n in plan.items():
            self.gates.grow(net, channels=n, groups=[gid])
        pos.round += 1
        return True

    def _train_stage(self, task: Task, t: int, pos: LearnerPosition, epochs: int, optim_state, timer: Timer):
        net, cfg = self.net, self.training
        optim = self._optimizers()
        if optim_state is not None:
            optim.load_state_dict(optim_state)
        lsg = pos.stage == "grow"
        costs = self._gate_costs() if lsg else {}
        lam = self.masks.grown.lam
        sel_t0, sel_t1 = self.masks.selective.temperature, self.masks.selective.final_temperature

        gates = self.gates

        def before_epoch(epoch: int, epochs: int) -> None:
            # CS: beta is multiplied by final_beta^(1/(epochs-1)) each epoch, reaching final_beta at the last
            gates.beta = M.anneal(1.0, self.masks.grown.final_beta, epoch / max(epochs - 1, 1)) if lsg else 1.0
            # the last epoch of a growth round trains the network that will be kept: binarised gates
            gates.hard = lsg and epoch == epochs - 1
            net.set_mask_temperature(M.anneal(sel_t0, sel_t1, epoch / max(epochs, 1)) if sel_t1 else None)

        def epoch_done(done: int) -> dict:
            pos.epoch, pos.epochs_done = done, pos.epochs_done + 1
            return {"beta": gates.beta}

        def on_epoch(info: dict) -> None:
            add_epoch_time(pos.extra.setdefault("stage_s", {}), info)  # in the position: survives a resume
            self.on_epoch(info)

        def checkpoint(optim: StageOptim, stopping: bool) -> None:
            if self.checkpoint is None:
                return
            if stopping:
                pos.elapsed += timer.seconds
            self.checkpoint(self, pos, optim)

        # the stage's DDP wrapper covers this stage's parameter set (growth and freezing change it between stages)
        train_stage(net, lambda m, x: m(x, task=t), optim, task.train, cfg, self.device, dist=self.dist,
                    seed=(self.seed, t, pos.stage, pos.round), epochs=epochs, start_epoch=pos.epoch,
                    trainable=self._trainable(),
                    event={"task": t, "stage": pos.stage, "round": pos.round}, before_epoch=before_epoch,
                    penalty=(lambda: self._penalty(costs, lam)) if costs and lam > 0 else None,
                    epoch_done=epoch_done, on_epoch=on_epoch, should_stop=self.should_stop,
                    checkpoint=checkpoint)
        gates.hard = False
        pos.epoch = 0

    def _trainable(self) -> dict[str, list]:
        """What this task trains, by optimiser: the engine's weights and mask scores, and GROWN's gates."""
        return {**self.net.trainable_parameters(), "gates": list(self.gates.parameters())}

    def _optimizers(self) -> StageOptim:
        groups = self._trainable()
        cfg = self.training
        opts = [make_optimizer(groups["weights"], cfg.optimizer), make_optimizer(groups["masks"], cfg.mask_optimizer),
                make_optimizer(groups["gates"], cfg.gate_optimizer)]
        return StageOptim([o for o in opts if o is not None], cfg.scheduler, tuple(cfg.milestones),
                          scaler=make_scaler(cfg.precision, self.device))

    def _gate_costs(self) -> dict[int, float]:
        return self.gates.costs(self.net)

    def _penalty(self, costs: dict[int, float], lam: float) -> torch.Tensor:
        """lambda * sum over candidate channels of gate * weights it brings (the L0 relaxation of Eq. 3)."""
        total = self.gates.penalty(costs)
        return lam * total if total is not None else torch.zeros((), device=self.device)

    @torch.no_grad()
    def evaluate(self, task_index: int, data) -> float:
        self.net.eval()
        # one process: the whole split; several: a shard each, correct and total counts all-reduced
        with self.net.inference():
            return self.dist.evaluate(lambda x: self.net(x, task=task_index), data, self.training.eval_batch_size,
                                      self.device, self.training.precision, self.training.channels_last)

    def _finish(self, task: Task, t: int, target, pos: LearnerPosition, timer: Timer) -> TaskRecord:
        net = self.net
        stats = net.unit_stats()
        net.freeze_task(t)
        self.dist.check_in_sync(net, f"after task {t}", extra={"widths": dict(net.structure.widths), **{
            f"births[{g}]": b for g, b in net.structure.births.items()}})
        growth = {str(g): w - pos.widths_at_start.get(str(g), w) for g, w in net.structure.widths.items()}
        growth = {g: n for g, n in growth.items() if n}
        seconds = pos.elapsed + timer.seconds
        return TaskRecord(
            index=t, name=task.name, num_classes=task.num_classes, target=target,
            val_acc=pos.val_history[-1] if pos.val_history else 0.0, val_history=list(pos.val_history),
            grew=bool(growth), growth_rounds=pos.round, growth=growth, pruned_candidates=pos.pruned,
            params_stored=net.num_parameters(), params_task=net.num_parameters(t), mask_bytes=net.mask_bytes(t),
            time_s=seconds, epochs=pos.epochs_done,
            selective_zero_frac=stats["selective_zero_frac"], released=net.free_weights(),
            retrained=stats["retrained"] if t > 0 else 0,
            stage_s=stage_breakdown(pos.extra.get("stage_s"), seconds))


__all__ = ["GrownLearner", "LearnerPosition", "TaskRecord", "build_policy"]
