"""GROWN and its ablations (and the Grow baseline) as a ContinualMethod over one GrowableNet."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from grownfx.engine import state as net_state
from grownfx.recipe.schema import GrownMethod as GrownMethodConfig
from grownfx.recipe.schema import Recipe
from grownfx.data import Task, TaskData, TaskStream
from grownfx.learn.learner import GrownLearner, build_policy
from grownfx.learn.records import TaskRecord
from grownfx.learn.seed_size import width_for_size
from grownfx.engine.net import GrowableNet
from grownfx.engine.prepare import prepare
from grownfx.learn.methods.base import (add_pretrained_task, backbone, example_input, keeps_pretrained_task,
                                       pretrained_summary, seed_channels, seed_data)


def build_net(recipe: Recipe, stream: TaskStream, seed_width: Optional[float] = None) -> GrowableNet:
    """The recipe's backbone, traced and slimmed to its seed width (same seed: same net, for resuming).  From
    pretrained weights kept as task 0 (`model.weights_task`) with their own classifier (`net.pretrained_classes`:
    its classes) and the seed's channels chosen by `model.seed_channels`."""
    torch.manual_seed(recipe.seed)
    model, classes = backbone(recipe, None if keeps_pretrained_task(recipe) else stream.tasks[0].num_classes)
    width = recipe.model.seed_width if seed_width is None else seed_width
    if seed_width is None and recipe.model.seed_size is not None:  # a parameter fraction: the paper's unit
        width = width_for_size(model, example_input(stream.input_shape), recipe.model.seed_size,
                               leaf_modules=recipe.model.leaf_modules, output=recipe.model.output,
                               head=recipe.model.head)
    net = prepare(model, example_input(stream.input_shape), width, leaf_modules=recipe.model.leaf_modules,
                  granularity=recipe.model.granularity, seed=recipe.seed, output=recipe.model.output,
                  head=recipe.model.head, seed_channels=seed_channels(recipe),
                  seed_data=seed_data(recipe, stream))
    net.pretrained_classes = classes
    return net


class GrownContinual:
    """GROWN (method `grown`, with `ablation` switches) or Grow (method `grow`: growth every task, no masks).

    `dist` (grownfx.learn.distributed.Dist) makes the learner data-parallel; None is one process.
    """

    def __init__(self, recipe: Recipe, stream: TaskStream, device: torch.device, *,
                 on_epoch: Callable[[dict], None] | None = None, checkpoint=None,
                 should_stop: Callable[[], bool] = lambda: False, dist=None):
        method = recipe.method
        if method.name == "grow":
            switches, growth = (False, False, False), recipe.growth.model_copy(update={"when": "always"})
        else:
            assert isinstance(method, GrownMethodConfig)
            switches, growth = method.switches(), recipe.growth
            if method.ablation == "grow_only" and switches == (False, False, False):
                # the paper's Grow row (Table 3) and Table 5's "Grow only" row are one experiment (76.5 both),
                # which "only grows the model for each task": a growth round every task, like `grow`
                growth = growth.model_copy(update={"when": "always"})
        self.name = method.name if method.name == "grow" else (
            "grown" if method.ablation == "full" else f"grown[{method.ablation}]")
        self.recipe, self.stream = recipe, stream
        # with a pretrained task 0 the stream's task i is the net's task i + 1
        self.offset = 1 if keeps_pretrained_task(recipe) else 0
        self._learner = lambda net: GrownLearner(
            net, training=recipe.training, growth=growth, masks=recipe.masks, switches=switches, device=device,
            seed=recipe.seed, on_epoch=on_epoch, checkpoint=checkpoint, should_stop=should_stop, dist=dist,
            task_offset=self.offset)
        self._fresh()
        if self.offset:
            add_pretrained_task(self.net, self.net.pretrained_classes, stream.tasks[0].num_classes,
                                build_policy(0, switches, recipe.masks))

    def _fresh(self) -> None:
        """A new net and its learner, installed: the net on the device with GROWN's gates (what a checkpoint
        restores into)."""
        self.net = build_net(self.recipe, self.stream)
        self.learner = self._learner(self.net)
        self.learner.install()

    def pretrained_summary(self) -> dict:
        return pretrained_summary(self.recipe, self.net)

    def learn(self, task: Task, target: Optional[float], resume: Optional[tuple] = None) -> TaskRecord:
        record = self.learner.learn(task, target, resume)
        return dataclasses.replace(record, index=record.index - self.offset)

    def evaluate(self, task_index: int, data: TaskData) -> float:
        return self.learner.evaluate(task_index + self.offset, data)

    def evaluate_pretrained(self, data: TaskData) -> float:
        """The pretrained task 0's accuracy on `data` (its own classes)."""
        return self.learner.evaluate(0, data)

    def export(self, task_index: int):
        return self.net.export(task_index + self.offset)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_index: int) -> torch.Tensor:
        """Logits of the task-aware model (what an export must reproduce)."""
        self.net.eval()
        return self.net(x.to(self.learner.device), task=task_index + self.offset).cpu()

    def num_parameters(self) -> int:
        return self.net.num_parameters()

    def state(self) -> dict:
        return {"structure": net_state.net_structure(self.net), "weights": self.net.state_dict()}

    def load_state(self, state: dict) -> None:
        if self.offset:  # the checkpoint holds task 0: restore onto a net without it
            self._fresh()
        device = self.learner.device
        net_state.restore_net(self.net.cpu(), state["structure"], state["weights"])
        self.net.to(device)
