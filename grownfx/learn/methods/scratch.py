"""Scratch: a fresh full-width backbone per task (model size T x).  Also GROWN's `scratch` target."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

from grownfx.recipe.schema import Recipe, TrainingConfig
from grownfx.data import Task, TaskData, TaskStream
from grownfx.learn.budget import task_epochs
from grownfx.learn.records import TaskRecord
from grownfx.models import build_backbone
from grownfx.engine.net import count_parameters
from grownfx.learn.training import Timer, derive_seed
from grownfx.learn.methods.base import Trainer, backbone, evaluate_with


def train_plain(model: nn.Module, task: Task, trainer: Trainer, seed, epochs: Optional[int] = None,
                resume: Optional[tuple] = None) -> float:
    """Train a plain module on one task with the recipe's weight optimiser and schedule (`trainer`: the one stage
    loop with the runner's hooks, data-parallel with its `dist`, mid-task checkpoints and `resume`); returns its
    validation accuracy."""
    training, device = trainer.training, trainer.device
    model.to(device)
    if training.channels_last:
        model.to(memory_format=torch.channels_last)
    trainer.train(model, model, [(list(model.parameters()), training.optimizer)], task, name="scratch",
                  seed=tuple(seed), epochs=epochs or training.epochs, resume=resume)
    return evaluate_plain(model, task.val, training, device)


def evaluate_plain(model: nn.Module, data: TaskData, training: TrainingConfig, device: torch.device) -> float:
    return evaluate_with(model, model, data, training, device)


def fresh_backbone(recipe: Recipe, task: Task, seed_parts: tuple) -> nn.Module:
    torch.manual_seed(derive_seed(*seed_parts))
    return backbone(recipe, task.num_classes)[0]  # from model.weights when given: scratch-from-pretrained


class ScratchContinual:
    """One independent full-width backbone per task."""

    name = "scratch"

    def __init__(self, recipe: Recipe, stream: TaskStream, device: torch.device, *, on_epoch=None,
                 should_stop: Callable[[], bool] = lambda: False, checkpoint=None, dist=None, **_):
        self.recipe, self.stream, self.device = recipe, stream, device
        self.trainer = Trainer(recipe.training, device, dist, on_epoch=on_epoch, should_stop=should_stop,
                               checkpoint=checkpoint)
        self.models: list[nn.Module] = []
        self.current: Optional[nn.Module] = None  # the task being learned (in mid-task checkpoints)
        self.full_params = count_parameters(build_backbone(recipe.model.builder, stream.tasks[0].num_classes,
                                                           recipe.model.kwargs, recipe.code_dir))

    def learn(self, task: Task, target: Optional[float], resume=None) -> TaskRecord:
        timer = Timer()
        if resume is None or self.current is None:
            self.current = fresh_backbone(self.recipe, task, (self.recipe.seed, "scratch", task.index))
        model = self.current
        epochs = task_epochs(self.recipe.training)
        val = train_plain(model, task, self.trainer, (self.recipe.seed, "scratch", task.index), epochs, resume=resume)
        self.models.append(model)
        self.current = None
        n = count_parameters(model)
        return TaskRecord(index=task.index, name=task.name, num_classes=task.num_classes, target=target, val_acc=val,
                          val_history=[val], params_stored=self.num_parameters(), params_task=n,
                          time_s=timer.seconds + (resume[0].elapsed if resume else 0.0),
                          epochs=epochs)

    def evaluate(self, task_index: int, data: TaskData) -> float:
        return evaluate_plain(self.models[task_index], data, self.recipe.training, self.device)

    def export(self, task_index: int) -> nn.Module:
        return copy.deepcopy(self.models[task_index]).eval()  # a copy: callers may move it to another device

    def num_parameters(self) -> int:
        return sum(count_parameters(m) for m in self.models)

    def state(self) -> dict:
        return {"models": [m.state_dict() for m in self.models],
                "current": self.current.state_dict() if self.current is not None else None}

    def load_state(self, state: dict) -> None:
        self.models = []
        for i, sd in enumerate(state["models"]):
            m = build_backbone(self.recipe.model.builder, self.stream.tasks[i].num_classes, self.recipe.model.kwargs,
                               self.recipe.code_dir)
            m.load_state_dict(sd)
            self.models.append(m.to(self.device))
        self.current = None
        if state.get("current") is not None:  # a mid-task checkpoint: the part-trained backbone of the next task
            task = self.stream.tasks[len(self.models)]
            self.current = build_backbone(self.recipe.model.builder, task.num_classes, self.recipe.model.kwargs,
                                          self.recipe.code_dir)
            self.current.load_state_dict(state["current"])
            self.current.to(self.device)
