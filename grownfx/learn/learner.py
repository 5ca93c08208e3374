"""Step 5: the GROWN learner, a readable loop over the engine.

For each task t:
    task 1 : learnable sparse growth (LSG) from the seed: a gated candidate pool, attentive masks on it
    task t>1: stage 1 "pick and reuse": selective mask on old weights + re-train released weights
             stage 2 "expand only if needed": while val accuracy < target and budget left: an LSG round
    then   : binarise, drop pruned candidates, freeze what the task owns
The ablation switches (selective mask, LSG's attentive mask, re-training) only change the mask policy.

The phases of a task (`Phase`, `TRANSITIONS`): start -> grow (task 1) or stage1 -> grow ... -> [tune] -> done;
`GrownLearner._next_phase` decides after each trained and evaluated stage, `_enter` makes the move (a growth
round's candidates are added there, nowhere else).
"""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Callable, Optional

import torch

from grownfx.engine import masks as M
from grownfx.recipe.schema import GrowthConfig, MasksConfig, TrainingConfig
from grownfx.engine.context import ATT, DENSE, OFF, SEL, MaskPolicy
from grownfx.data import Task
from grownfx.learn.distributed import Dist
from grownfx.learn import budget
from grownfx.learn.decision import below_target
from grownfx.learn.gates import CandidateGates
from grownfx.learn.growth import round_sizes
from grownfx.engine.net import GrowableNet
from grownfx.learn.records import LearnerPosition, TaskRecord, add_epoch_time, stage_breakdown
from grownfx.learn.training import Stage, StageHooks, StageOptim, Timer, make_optimizer, make_scaler, train_stage


class Phase(str, Enum):
    """Where a task's training stands; `LearnerPosition.stage` holds its value (mid-task checkpoints too)."""

    START = "start"  # the task not added yet
    STAGE1 = "stage1"  # pick and reuse: selective masks on old weights, released weights re-trained
    GROW = "grow"  # a learnable sparse growth round (task 1's first one is its training from the seed)
    TUNE = "tune"  # an epoch budget's unspent epochs: the task's network trained as it is
    DONE = "done"  # nothing left to train: the task is frozen next


# the phases each phase may be followed by (GrownLearner._enter refuses any other move)
TRANSITIONS = {
    Phase.START: (Phase.GROW, Phase.STAGE1),
    Phase.STAGE1: (Phase.GROW, Phase.TUNE, Phase.DONE),
    Phase.GROW: (Phase.GROW, Phase.TUNE, Phase.DONE),
    Phase.TUNE: (Phase.DONE,),
    Phase.DONE: (),
}


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


def noise_free_epochs(fraction: float, epochs: int) -> int:
    """How many of a stage's last epochs train the masks without their noise: ceil(fraction x epochs), so at
    least one when the fraction is above 0 (rounded first: 0.3 x 10 is 3, not 4)."""
    return math.ceil(round(fraction * epochs, 9))


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
                 should_stop: Callable[[], bool] = lambda: False, dist: Optional[Dist] = None,
                 task_offset: int = 0):
        self.net = net
        # the net's index of the stream's first task (1 after a pretrained task 0): epoch events and errors name
        # the stream's task, as every task number a person reads does
        self.task_offset = task_offset
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
        self._val_size = 0  # validation samples of the task being learned

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
        net, timer = self.net, Timer()
        pos, optim_state = resume if resume is not None else (LearnerPosition(), None)
        phase = Phase(pos.stage)  # a checkpoint's position names its phase by value
        if phase is Phase.START:
            t = net.add_task(task.num_classes)
            net.set_policy(build_policy(t, self.switches, self.masks))
            pos.widths_at_start = {str(g): w for g, w in net.structure.widths.items()}
            # task 1 learns by learnable sparse growth from the seed network (when any site can grow)
            phase = self._enter(pos, Phase.GROW if t == 0 and self._growth_plan() else Phase.STAGE1)
        t = net.num_tasks - 1
        self._val_size = len(task.val)  # what the growth decision's bound reads
        while phase is not Phase.DONE:
            self._train_stage(task, t, pos, self._stage_epochs(pos, phase, t), optim_state, timer)
            optim_state = None
            if phase is Phase.GROW:
                pos.pruned += sum(self.gates.settle(net).values())
            val = self.evaluate(t, task.val)
            pos.val_history.append(val)
            if self.should_stop():
                raise KeyboardInterrupt
            phase = self._enter(pos, self._next_phase(pos, phase, val, target))
        return self._finish(task, t, target, pos, timer)

    def _stage_epochs(self, pos: LearnerPosition, phase: "Phase", t: int) -> int:
        """Task 1's first LSG round is the task's training from the seed: `epochs`, like every method's task;
        later growth rounds (stage 2, task 1's extra rounds) train `stage2_epochs`.  With an epoch budget
        (learn/budget.py) stage 1 takes half of it, rounds what is left, and a `tune` stage the rest."""
        cfg = self.training
        before = pos.epochs_done - pos.epoch  # the task's epochs before this stage (a resume included)
        if phase is Phase.TUNE:
            return budget.left(cfg, before)
        if phase is Phase.STAGE1 or (t == 0 and pos.round == 1):
            return budget.first_phase(cfg, self.growth.max_rounds > 0)
        return budget.capped(cfg, cfg.stage2_epochs or cfg.epochs, before)

    def _next_phase(self, pos: LearnerPosition, phase: "Phase", val: float, target: Optional[float]) -> "Phase":
        """After a trained and evaluated stage: another growth round while the task wants one and a site can grow;
        else the budget's unspent epochs (`tune`), else done."""
        if self._wants_growth(pos, phase, val, target) and self._growth_plan():
            return Phase.GROW
        return Phase.TUNE if budget.left(self.training, pos.epochs_done) > 0 else Phase.DONE

    def _enter(self, pos: LearnerPosition, phase: "Phase") -> "Phase":
        """Move the task to `phase` (one of TRANSITIONS' for the phase it is in); a growth round adds its
        candidate pools."""
        current = Phase(pos.stage)
        if phase not in TRANSITIONS[current]:
            raise RuntimeError(f"the learner cannot go from phase {current.value!r} to {phase.value!r}")
        if phase is Phase.GROW:
            for gid, n in self._growth_plan().items():
                self.gates.grow(self.net, channels=n, groups=[gid])
            pos.round += 1
        pos.stage, pos.epoch = phase.value, 0
        return phase

    def _wants_growth(self, pos: LearnerPosition, phase: "Phase", val: float, target: Optional[float]) -> bool:
        if pos.round >= self.growth.max_rounds or phase is Phase.TUNE:
            return False
        if not budget.has_left(self.training, pos.epochs_done):
            return False
        if self.growth.when == "always":
            return pos.round == 0
        return below_target(val, self._val_size, target, self.growth.decision, self.growth.confidence)

    def _growth_plan(self) -> dict[int, int]:
        """Channels a growth round would add at each site below its width cap (empty: none can grow)."""
        return round_sizes(self.net, self.full_widths, self.growth.pool, self.growth.max_width)

    def _train_stage(self, task: Task, t: int, pos: LearnerPosition, epochs: int, optim_state, timer: Timer):
        net, gates = self.net, self.gates
        optim = self._optimizers()
        if optim_state is not None:
            optim.load_state_dict(optim_state)
        lsg = pos.stage == Phase.GROW.value
        costs = self.gates.costs(net) if lsg else {}
        lam = self.masks.grown.lam
        sel_t0, sel_t1 = self.masks.selective.temperature, self.masks.selective.final_temperature

        def before_epoch(epoch: int, epochs: int) -> None:  # the schedule, from where the stage stands
            # CS: beta is multiplied by final_beta^(1/(epochs-1)) each epoch, reaching final_beta at the last
            gates.beta = M.anneal(1.0, self.masks.grown.final_beta, epoch / max(epochs - 1, 1)) if lsg else 1.0
            # the last epoch of a growth round trains the network that will be kept: binarised gates
            gates.hard = lsg and epoch == epochs - 1
            net.set_mask_temperature(M.anneal(sel_t0, sel_t1, epoch / max(epochs, 1)) if sel_t1 else None)
            # the stage's last epochs train in the masks' evaluation form (masks.selective.noise_free_fraction)
            net.set_mask_noise(epoch < epochs - noise_free_epochs(self.masks.selective.noise_free_fraction, epochs))

        def after_epoch(done: int) -> dict:
            pos.epoch, pos.epochs_done = done, pos.epochs_done + 1
            return {"beta": gates.beta}

        def on_epoch(info: dict) -> None:
            add_epoch_time(pos.extra.setdefault("stage_s", {}), info)  # in the position: survives a resume
            self.on_epoch(info)

        def checkpoint(optim: StageOptim, stopping: bool) -> None:
            # the saved position holds the task's seconds so far, so that a resume after a kill (not only after a
            # stop) counts them; this process's `pos` keeps its own (its clock still runs)
            self.checkpoint(self, dataclasses.replace(pos, elapsed=pos.elapsed + timer.seconds), optim)

        # the stage's DDP wrapper covers this stage's parameter set (growth and freezing change it between stages)
        stage = Stage(net, lambda m, x: m(x, task=t), optim, task.train, epochs, (self.seed, t, pos.stage, pos.round),
                      event={"from_seed": t == 0, "task": t - self.task_offset, "stage": pos.stage,
                             "round": pos.round}, start_epoch=pos.epoch,
                      trainable=self._trainable(),
                      penalty=(lambda: self._penalty(costs, lam)) if costs and lam > 0 else None,
                      hooks=StageHooks(before_epoch, after_epoch, on_epoch, self.should_stop,
                                       checkpoint if self.checkpoint is not None else None))
        train_stage(stage, self.training, self.device, self.dist)
        gates.hard = False
        net.set_mask_noise(True)
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
            grew=bool(growth), growth_rounds=pos.round, from_seed=t == 0, growth=growth, pruned_candidates=pos.pruned,
            params_stored=net.num_parameters(), params_task=net.num_parameters(t), mask_bytes=net.mask_bytes(t),
            time_s=seconds, epochs=pos.epochs_done,
            selective_zero_frac=stats["selective_zero_frac"], released=net.free_weights(),
            retrained=stats["retrained"] if t > 0 else 0,
            stage_s=stage_breakdown(pos.extra.get("stage_s"), seconds))


__all__ = ["TRANSITIONS", "GrownLearner", "LearnerPosition", "Phase", "TaskRecord", "build_policy", "noise_free_epochs"]
