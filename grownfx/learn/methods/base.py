"""What every continual-learning method offers the runner: learn a task, evaluate one, export one, save.

Also the small pieces the baselines share: `Trainer` (a stage over a task through the one loop,
grownfx.learn.training.train_stage, with the runner's hooks and resume), evaluation of any forward function
(`evaluate_with`), and `NetMethod`, the plumbing of methods that learn into one GrowableNet (PackNet, Piggyback, CPG).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from grownfx.data import Task, TaskData, TaskStream
from grownfx.engine import state as net_state
from grownfx.engine.context import MaskPolicy
from grownfx.engine.prepare import prepare
from grownfx.models import build_backbone, build_pretrained
from grownfx.recipe.schema import OptimConfig, Recipe, TrainingConfig
from grownfx.learn.distributed import Dist
from grownfx.learn.records import LearnerPosition, TaskRecord, add_epoch_time, stage_breakdown
from grownfx.learn.training import Stage, StageHooks, StageOptim, Timer, accuracy, inference_scope, make_optimizer, \
    make_scaler, train_stage


class ContinualMethod(Protocol):
    name: str

    def learn(self, task: Task, target: Optional[float], resume: Optional[tuple] = None) -> TaskRecord:
        """Learn the next task; `resume` = (position, optimizer state) from a mid-task checkpoint."""

    def evaluate(self, task_index: int, data: TaskData) -> float:
        """Test accuracy (%) of task `task_index` on `data`."""

    def export(self, task_index: int) -> nn.Module:
        """A plain module computing task `task_index`."""

    def num_parameters(self) -> int:
        """Parameters stored for all tasks learned so far."""

    def state(self) -> dict:
        """Everything needed to resume (tensors, lists, dicts, numbers only)."""

    def load_state(self, state: dict) -> None:
        """Inverse of `state`, on a freshly built method from the same recipe."""


def example_input(input_shape: tuple, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randn(2, *input_shape, device=device)


# --- shared training pieces ------------------------------------------------------------------------------


class Trainer:
    """How a baseline trains a stage through the one loop (grownfx.learn.training.train_stage): the recipe's training
    settings, the device and processes, and what the runner asked for: progress events (`on_epoch`), a stop request
    (`should_stop`), mid-task checkpoints (`checkpoint(None, LearnerPosition, optim)`)."""

    def __init__(self, training: TrainingConfig, device: torch.device, dist: Optional[Dist] = None, *,
                 on_epoch: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] = lambda: False,
                 checkpoint: Callable | None = None):
        self.training, self.device = training, torch.device(device)
        self.dist = dist if dist is not None else Dist(self.device)
        self.on_epoch = on_epoch or (lambda info: None)
        self.should_stop, self.checkpoint = should_stop, checkpoint

    def train(self, module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
              groups: Sequence[tuple[list, OptimConfig]], task: Task, *, name: str, seed: tuple, epochs: int,
              round: int = 0, resume: Optional[tuple] = None, after: Callable[[], dict] | None = None,
              epochs_before: int = 0, terms: Optional["StepTerms"] = None) -> int:
        """`epochs` passes of `forward` (which computes with `module`) over `task`'s training split, one optimiser
        per (parameters, config) of `groups`, the recipe's schedule, fp16 with a GradScaler.  Epoch e is seeded
        from (*seed, name, round, e), like GROWN's learner, so two methods given the same seed see the same batches.

        resume: (LearnerPosition, optimiser state) of a mid-task checkpoint; taken up when it is this stage's
        (`name`, `round`).  after(): runs after the last epoch; its dict joins that epoch's event (e.g. a
        validation accuracy and the decision taken on it).  epochs_before: the task's epochs in earlier stages
        (for the checkpoints' position).  terms: what the method adds to every step (a penalty, its own task loss,
        a hook after the optimiser step).  Returns the stage's epochs, those before a resume included."""
        terms = terms if terms is not None else StepTerms()
        opts = [make_optimizer(list(params), cfg) for params, cfg in groups]
        optim = StageOptim([o for o in opts if o is not None], self.training.scheduler, tuple(self.training.milestones),
                           scaler=make_scaler(self.training.precision, self.device))
        start, elapsed = 0, 0.0
        if resume is not None and (resume[0].stage, resume[0].round) == (name, round):
            position, optim_state = resume
            start, elapsed = position.epoch, position.elapsed
            if optim_state is not None:
                optim.load_state_dict(optim_state)
        timer, done = Timer(), [start]

        def after_epoch(epochs_done: int) -> dict:
            done[0] = epochs_done
            return after() if after is not None and epochs_done == epochs else {}

        def save(optim: StageOptim, stopping: bool) -> None:
            self.checkpoint(None, LearnerPosition(stage=name, round=round, epoch=done[0],
                                                  epochs_done=epochs_before + done[0],
                                                  elapsed=elapsed + timer.seconds), optim)

        stage = Stage(_Forward(module, forward), lambda m, x: m(x), optim, task.train, epochs, (*seed, name, round),
                      event={"task": task.index, "stage": name, "round": round}, start_epoch=start,
                      trainable={"params": [p for params, _ in groups for p in params if p.requires_grad]},
                      penalty=terms.penalty, criterion=terms.criterion, after_step=terms.after_step,
                      hooks=StageHooks(after_epoch=after_epoch, on_epoch=self.on_epoch, should_stop=self.should_stop,
                                       checkpoint=save if self.checkpoint is not None else None))
        return start + train_stage(stage, self.training, self.device, self.dist)


@dataclasses.dataclass
class StepTerms:
    """What a method adds to each training step of the one loop (each optional): `penalty()` joins the loss,
    `criterion(logits, y)` replaces cross-entropy as the batch's task loss, `after_step()` runs after the
    optimiser step."""

    penalty: Optional[Callable[[], torch.Tensor]] = None
    criterion: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    after_step: Optional[Callable[[], None]] = None


class _Forward(nn.Module):
    """A baseline's `forward(x)` as a module holding the `model` it runs (what a data-parallel stage wraps)."""

    def __init__(self, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


@torch.no_grad()
def evaluate_with(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], data: TaskData,
                  training: TrainingConfig, device: torch.device) -> float:
    """Accuracy (%) of `forward` on `data` with `model` in evaluation mode (no augmentation)."""
    model.eval()
    loader = data.loader(training.eval_batch_size, shuffle=False, device=device, augment=None)
    with inference_scope(model):
        return accuracy(forward, loader, device, training.precision, training.channels_last)


# --- methods over one GrowableNet ------------------------------------------------------------------------


def backbone(recipe: Recipe, num_classes: Optional[int]) -> tuple[nn.Module, Optional[int]]:
    """The recipe's backbone, from its pretrained weights when it names some (`model.weights`).  `num_classes`
    None: with the weights' own classifier, whose classes are returned (None when the file has none); a number:
    a fresh classifier of that many classes (returns (model, None))."""
    m = recipe.model
    if m.weights:
        return build_pretrained(m.builder, num_classes, m.kwargs, recipe.code_dir, m.weights, m.weights_sha256)
    return build_backbone(m.builder, num_classes or 1, m.kwargs, recipe.code_dir), None


def keeps_pretrained_task(recipe: Recipe) -> bool:
    """Whether a method that can (GROWN, Piggyback) keeps the loaded network as a frozen task 0."""
    return bool(recipe.model.weights) and recipe.model.weights_task


def seed_channels(recipe: Recipe) -> str:
    """The seed's channel rule: the recipe's, `auto` being `magnitude` from pretrained weights, else `first`."""
    rule = recipe.model.seed_channels
    return ("magnitude" if recipe.model.weights else "first") if rule == "auto" else rule


TAYLOR_SAMPLES = 256  # task-1 inputs the `taylor` seed rule scores channels on


def seed_data(recipe: Recipe, stream: TaskStream) -> Optional[torch.Tensor]:
    """The inputs the seed rule scores channels on: `TAYLOR_SAMPLES` of task 1's training split (a subset drawn
    with the recipe's seed: a split may be ordered by class), preprocessed as training sees them without
    augmentation, for `taylor`; None for the other rules."""
    if seed_channels(recipe) != "taylor":
        return None
    train = stream.tasks[0].train
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed))[:TAYLOR_SAMPLES]
    return train.normalize(train.x[pick.sort().values.to(train.x.device)]).cpu()


def add_pretrained_task(net, classes: Optional[int], first_classes: int, policy: MaskPolicy,
                        compact: Optional[Callable[[], None]] = None) -> None:
    """The net's weights as they were loaded become task 0, frozen at once: its masks all-ones over every unit,
    its norms the loaded ones, its classifier the file's own (a fresh one of `first_classes` classes when the
    file has none: such a task 0 is never evaluated).  `compact`: run before freezing (PackNet and CPG release
    part of the loaded weights for later tasks)."""
    net.add_task(classes or first_classes, keep_head=classes is not None)
    net.set_policy(policy)
    if compact is not None:
        compact()
    net.freeze_task(0)


def pretrained_summary(recipe: Recipe, net) -> dict:
    """What summary.json and exports/pretrained/meta.json say of a pretrained task 0."""
    return {"weights": recipe.model.weights, "weights_sha256": recipe.model.weights_sha256,
            "num_classes": getattr(net, "pretrained_classes", None), "parameters_task": net.num_parameters(0),
            **({"pruned_ratio": recipe.method.pretrained_prune_ratio}
               if getattr(recipe.method, "pretrained_prune_ratio", 0) else {}),
            "evaluated": False,
            "note": "task 0 is the loaded network (its own classifier when the file has one), frozen before the "
                    "first task; the recipe gives no data of its classes, so it is not evaluated"}


def build_masked_net(recipe: Recipe, stream: TaskStream, width: float = 1.0, granularity: str | None = None,
                     task0: bool = False):
    """The recipe's backbone traced at `width` with masks of `granularity` (same seed: same net); `task0`: with
    the pretrained weights' own classifier, for a method that keeps them as task 0 (`net.pretrained_classes`)."""
    torch.manual_seed(recipe.seed)
    model, classes = backbone(recipe, None if task0 else stream.tasks[0].num_classes)
    net = prepare(model, example_input(stream.input_shape), width, leaf_modules=recipe.model.leaf_modules,
                  granularity=granularity or recipe.model.granularity, seed=recipe.seed,
                  output=recipe.model.output, head=recipe.model.head, seed_channels=seed_channels(recipe),
                  seed_data=seed_data(recipe, stream))
    net.pretrained_classes = classes
    return net


class NetMethod:
    """Evaluation, export, accounting and checkpoints of a method that learns into one GrowableNet.

    A task runs through the method's `phases` in order (PackNet: train, retrain).  Mid-task checkpoints (the
    runner's `checkpoint`) hold the net as it stands (the learning task unfrozen, its kinds and scores) and a
    LearnerPosition: the phase (`stage`, `round`), its epochs done, the task's validation history and the
    method's own facts (`phase`, saved as the position's `extra`).  `begin` takes a resumed task up where its
    checkpoint left it; `skips(stage, round)` says which phases finished before that checkpoint was taken.
    """

    name = "net"
    granularity: str | None = "element"  # PackNet, Piggyback and CPG own and mask single weights
    pretrained_task = False  # keeps pretrained weights as a frozen task 0 (the method's `task0_policy`)
    phases: tuple[str, ...] = ("train",)  # a task's stages, in order

    def __init__(self, recipe: Recipe, stream: TaskStream, device: torch.device, *,
                 on_epoch: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] = lambda: False,
                 dist: Optional[Dist] = None, checkpoint: Callable | None = None, **_):
        self.recipe, self.stream, self.device = recipe, stream, torch.device(device)
        self.on_epoch = on_epoch
        self.checkpoint = checkpoint  # the runner's mid-task checkpoint: checkpoint(None, position, optim)
        self.trainer = Trainer(recipe.training, self.device, dist, on_epoch=self._on_epoch, should_stop=should_stop,
                               checkpoint=self._save if checkpoint is not None else None)
        # with a pretrained task 0 the stream's task i is the net's task i + 1 (`offset`)
        self.offset = 1 if self.pretrained_task and keeps_pretrained_task(recipe) else 0
        self.net = self._fresh_net()
        if self.offset:
            add_pretrained_task(self.net, self.net.pretrained_classes, stream.tasks[0].num_classes,
                                self.task0_policy(), self.compact_pretrained)
        self._resume: Optional[tuple] = None  # (position, optimiser state) resumed, until its phase is reached
        self._before = 0.0  # training seconds of the learning task before a resume
        self._timer = Timer()
        self.history: list[float] = []  # the learning task's validation accuracies so far
        self.phase: dict = {}  # the learning task's method-specific facts (in mid-task checkpoints)

    def _fresh_net(self):
        return build_masked_net(self.recipe, self.stream, 1.0, self.granularity, task0=bool(self.offset)).to(
            self.device)

    def pretrained_summary(self) -> dict:
        return pretrained_summary(self.recipe, self.net)

    def task0_policy(self) -> MaskPolicy:
        raise NotImplementedError(f"{self.name} keeps no pretrained task")

    def compact_pretrained(self) -> None:
        """Before the pretrained task 0 is frozen (PackNet, CPG: free part of it); nothing by default."""

    # -- a task's phases, resumable -------------------------------------------------------------------------
    def begin(self, task: Task, policy: MaskPolicy, resume: Optional[tuple]) -> tuple[int, Optional[LearnerPosition]]:
        """Add `task` under `policy`, or take up the part-learned task a mid-task checkpoint holds (load_state
        restored it with its policy, kinds and scores; set_policy would reset them).  Returns (task index,
        the resumed position or None)."""
        self._timer, self._resume = Timer(), resume
        if resume is None:
            self._before, self.history, self.phase = 0.0, [], {}
            t = self.net.add_task(task.num_classes)
            self.net.set_policy(policy)
            return t, None
        position = resume[0]
        self._before, self.history, self.phase = position.elapsed, list(position.val_history), dict(position.extra)
        return self.net.learning_task, position

    def skips(self, stage: str, round: int = 0) -> bool:
        """Whether phase (`stage`, `round`) finished before the mid-task checkpoint being resumed."""
        if self._resume is None:
            return False
        position = self._resume[0]
        return (self.phases.index(stage), round) < (self.phases.index(position.stage), position.round)

    def _save(self, learner, position: LearnerPosition, optim) -> None:
        position = dataclasses.replace(position, val_history=list(self.history), extra=dict(self.phase),
                                       elapsed=self._before + self._timer.seconds)
        self.checkpoint(learner, position, optim)

    # -- training -------------------------------------------------------------------------------------------
    def train(self, task: Task, t: int, epochs: int, stage: str, *, weights: Optional[OptimConfig] = None,
              masks: Optional[OptimConfig] = None, round: int = 0, after: Callable[[], dict] | None = None,
              before: int = 0) -> int:
        """Train the learning task's weights (with `weights`, default the recipe's) and, if given, its masks;
        `before`: the task's epochs in earlier phases.  A resumed phase continues from its checkpoint."""
        params = self.net.trainable_parameters()
        groups = [(params["weights"], weights or self.recipe.training.optimizer)]
        if masks is not None:
            groups.append((params["masks"], masks))
        resume = self._resume
        if resume is not None and (resume[0].stage, resume[0].round) == (stage, round):
            self._resume = None  # this phase takes the checkpoint up; later ones start afresh
        return self.trainer.train(self.net, lambda x: self.net(x, task=t), groups, task, name=stage,
                                  seed=(self.recipe.seed, self.name, t), epochs=epochs, round=round, resume=resume,
                                  after=after, epochs_before=before)

    def _on_epoch(self, info: dict) -> None:
        add_epoch_time(self.phase.setdefault("stage_s", {}), info)  # in `phase`: survives a resume
        if self.on_epoch is not None:
            self.on_epoch(info)

    def mask_optimizer(self, lr: float) -> OptimConfig:
        return OptimConfig(name="adam", lr=lr, momentum=0.0, nesterov=False, weight_decay=0.0)

    def record(self, task: Task, t: int, target: Optional[float], val_history: list[float], timer: Timer,
               epochs: int, extra: Optional[dict] = None, **fields) -> TaskRecord:
        """Freeze task `t` and describe it (`extra`: method-specific facts, kept where TaskRecord has room)."""
        self.net.freeze_task(t)
        if extra and "extra" in TaskRecord.__dataclass_fields__:
            fields["extra"] = extra
        time_s = self._before + timer.seconds
        fields.setdefault("stage_s", stage_breakdown(self.phase.get("stage_s"), time_s))
        return TaskRecord(index=t - self.offset, name=task.name, num_classes=task.num_classes, target=target,
                          val_acc=val_history[-1], val_history=list(val_history),
                          params_stored=self.net.num_parameters(), params_task=self.net.num_parameters(t),
                          mask_bytes=self.net.mask_bytes(t), time_s=time_s, epochs=epochs,
                          released=self.net.free_weights(), **fields)

    # -- the ContinualMethod protocol -----------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, task_index: int, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return self.net(x.to(self.device), task=task_index + self.offset)

    def evaluate(self, task_index: int, data: TaskData) -> float:
        t = task_index + self.offset
        return evaluate_with(self.net, lambda x: self.net(x, task=t), data, self.recipe.training, self.device)

    def evaluate_pretrained(self, data: TaskData) -> float:
        """The pretrained task 0's accuracy on `data` (its own classes)."""
        return evaluate_with(self.net, lambda x: self.net(x, task=0), data, self.recipe.training, self.device)

    def export(self, task_index: int) -> nn.Module:
        return self.net.export(task_index + self.offset)

    def num_parameters(self) -> int:
        return self.net.num_parameters()

    def state(self) -> dict:
        return {"structure": net_state.net_structure(self.net), "weights": self.net.state_dict()}

    def load_state(self, state: dict) -> None:
        if self.offset:  # the checkpoint holds task 0: restore onto a net without it
            self.net = self._fresh_net()
        net_state.restore_net(self.net.cpu(), state["structure"], state["weights"])
        self.net.to(self.device)
