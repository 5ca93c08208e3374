"""What every continual-learning method offers the runner: learn a task, evaluate one, export one, save.

Also the small pieces the baselines share: one training stage over a task (`train_stage`), evaluation of any
forward function (`evaluate_with`), and `NetMethod`, the plumbing of methods that learn into one GrowableNet
(PackNet, Piggyback, CPG).
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from grownfx.data import Task, TaskData, TaskStream
from grownfx.engine import state as net_state
from grownfx.engine.net import prepare
from grownfx.models import build_backbone
from grownfx.recipe.schema import OptimConfig, Recipe, TrainingConfig
from grownfx.learn.learner import TaskRecord
from grownfx.learn.training import StageOptim, Timer, accuracy, derive_seed, make_optimizer, run_epoch


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


def train_stage(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                groups: Sequence[tuple[list, OptimConfig]], task: Task, training: TrainingConfig,
                device: torch.device, *, seed: tuple, epochs: int, stage: str, round: int = 0,
                on_epoch: Callable[[dict], None] | None = None,
                should_stop: Callable[[], bool] = lambda: False,
                after: Callable[[], dict] | None = None) -> int:
    """`epochs` passes over the task's train split, one optimiser per (parameters, config) group.

    Every epoch re-seeds torch and the loader from (seed, stage, round, epoch), like GROWN's learner, so two
    methods given the same seed see the same batches.  `after()` runs after the last epoch and its dict joins
    that epoch's event (e.g. a validation accuracy and the decision taken on it).  Returns the epochs run.
    """
    opts = [make_optimizer(list(params), cfg) for params, cfg in groups]
    optim = StageOptim([o for o in opts if o is not None], training.scheduler, tuple(training.milestones))
    if not optim.optimizers or epochs <= 0:
        return 0
    for epoch in range(epochs):
        s = derive_seed(*seed, stage, round, epoch)
        torch.manual_seed(s)
        optim.set_progress(epoch / epochs)
        model.train()
        loader = task.train.loader(training.batch_size, shuffle=True, generator=torch.Generator().manual_seed(s),
                                   device=device)
        timer = Timer()
        loss, _, acc, n = run_epoch(forward, loader, optim, device, precision=training.precision,
                                    channels_last=training.channels_last)
        info = {"task": task.index, "stage": stage, "round": round, "epoch": epoch + 1, "epochs": epochs,
                "loss": loss, "train_acc": acc, "seconds": timer.seconds, "images_per_s": n / max(timer.seconds, 1e-9)}
        if after is not None and epoch == epochs - 1:
            info.update(after())
        if on_epoch is not None:
            on_epoch(info)
        if should_stop():  # between epochs; the runner resumes from the last finished task
            raise KeyboardInterrupt
    return epochs


@torch.no_grad()
def evaluate_with(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], data: TaskData,
                  training: TrainingConfig, device: torch.device) -> float:
    """Accuracy (%) of `forward` on `data` with `model` in evaluation mode (no augmentation)."""
    model.eval()
    loader = data.loader(training.eval_batch_size, shuffle=False, device=device, augment=None)
    return accuracy(forward, loader, device, training.precision, training.channels_last)


# --- methods over one GrowableNet ------------------------------------------------------------------------


def build_masked_net(recipe: Recipe, stream: TaskStream, width: float = 1.0, granularity: str | None = None):
    """The recipe's backbone traced at `width` with masks of `granularity` (same seed: same net)."""
    torch.manual_seed(recipe.seed)
    model = build_backbone(recipe.model.builder, stream.tasks[0].num_classes, recipe.model.kwargs)
    return prepare(model, example_input(stream.input_shape), width, leaf_modules=recipe.model.leaf_modules,
                   granularity=granularity or recipe.model.granularity, seed=recipe.seed)


class NetMethod:
    """Evaluation, export, accounting and checkpoints of a method that learns into one GrowableNet."""

    name = "net"
    granularity: str | None = "element"  # PackNet, Piggyback and CPG own and mask single weights

    def __init__(self, recipe: Recipe, stream: TaskStream, device: torch.device, *,
                 on_epoch: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] = lambda: False,
                 **_):
        self.recipe, self.stream, self.device = recipe, stream, torch.device(device)
        self.on_epoch, self.should_stop = on_epoch, should_stop
        self.net = build_masked_net(recipe, stream, 1.0, self.granularity).to(self.device)

    # -- training -------------------------------------------------------------------------------------------
    def train(self, task: Task, t: int, epochs: int, stage: str, *, weights: Optional[OptimConfig] = None,
              masks: Optional[OptimConfig] = None, round: int = 0, after: Callable[[], dict] | None = None) -> int:
        """Train the learning task's weights (with `weights`, default the recipe's) and, if given, its masks."""
        params = self.net.trainable_parameters()
        groups = [(params["weights"], weights or self.recipe.training.optimizer)]
        if masks is not None:
            groups.append((params["masks"], masks))
        return train_stage(self.net, lambda x: self.net(x, task=t), groups, task, self.recipe.training,
                           self.device, seed=(self.recipe.seed, self.name, t), epochs=epochs, stage=stage,
                           round=round, on_epoch=self.on_epoch, should_stop=self.should_stop, after=after)

    def mask_optimizer(self, lr: float) -> OptimConfig:
        return OptimConfig(name="adam", lr=lr, momentum=0.0, nesterov=False, weight_decay=0.0)

    def record(self, task: Task, t: int, target: Optional[float], val_history: list[float], timer: Timer,
               epochs: int, extra: Optional[dict] = None, **fields) -> TaskRecord:
        """Freeze task `t` and describe it (`extra`: method-specific facts, kept where TaskRecord has room)."""
        self.net.freeze_task(t)
        if extra and "extra" in TaskRecord.__dataclass_fields__:
            fields["extra"] = extra
        return TaskRecord(index=t, name=task.name, num_classes=task.num_classes, target=target,
                          val_acc=val_history[-1], val_history=list(val_history),
                          params_stored=self.net.num_parameters(), params_task=self.net.num_parameters(t),
                          mask_bytes=self.net.mask_bytes(t), time_s=timer.seconds, epochs=epochs,
                          released=self.net.free_weights(), **fields)

    # -- the ContinualMethod protocol -----------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, task_index: int, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return self.net(x.to(self.device), task=task_index)

    def evaluate(self, task_index: int, data: TaskData) -> float:
        return evaluate_with(self.net, lambda x: self.net(x, task=task_index), data, self.recipe.training,
                             self.device)

    def export(self, task_index: int) -> nn.Module:
        return self.net.export(task_index)

    def num_parameters(self) -> int:
        return self.net.num_parameters()

    def state(self) -> dict:
        return {"structure": net_state.net_structure(self.net), "weights": self.net.state_dict()}

    def load_state(self, state: dict) -> None:
        net_state.restore_net(self.net.cpu(), state["structure"], state["weights"])
        self.net.to(self.device)
