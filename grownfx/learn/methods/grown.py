"""GROWN and its ablations (and the Grow baseline) as a ContinualMethod over one GrowableNet."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from grownfx.engine import state as net_state
from grownfx.recipe.schema import GrownMethod as GrownMethodConfig
from grownfx.recipe.schema import Recipe
from grownfx.data import Task, TaskData, TaskStream
from grownfx.learn.learner import GrownLearner
from grownfx.learn.records import TaskRecord
from grownfx.learn.seed_size import width_for_size
from grownfx.models import build_backbone
from grownfx.engine.net import GrowableNet, prepare
from grownfx.learn.methods.base import example_input


def build_net(recipe: Recipe, stream: TaskStream, seed_width: Optional[float] = None) -> GrowableNet:
    """The recipe's backbone, traced and slimmed to its seed width (same seed: same net, for resuming)."""
    torch.manual_seed(recipe.seed)
    model = build_backbone(recipe.model.builder, stream.tasks[0].num_classes, recipe.model.kwargs, recipe.code_dir)
    width = recipe.model.seed_width if seed_width is None else seed_width
    if seed_width is None and recipe.model.seed_size is not None:  # a parameter fraction: the paper's unit
        width = width_for_size(model, example_input(stream.input_shape), recipe.model.seed_size,
                               leaf_modules=recipe.model.leaf_modules, output=recipe.model.output,
                               head=recipe.model.head)
    return prepare(model, example_input(stream.input_shape), width, leaf_modules=recipe.model.leaf_modules,
                   granularity=recipe.model.granularity, seed=recipe.seed, output=recipe.model.output,
                   head=recipe.model.head)


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
        self.net = build_net(recipe, stream)
        self.learner = GrownLearner(self.net, training=recipe.training, growth=growth, masks=recipe.masks,
                                    switches=switches, device=device, seed=recipe.seed, on_epoch=on_epoch,
                                    checkpoint=checkpoint, should_stop=should_stop, dist=dist)
        self.learner.install()  # the net on the device with GROWN's gates: what a checkpoint restores into

    def learn(self, task: Task, target: Optional[float], resume: Optional[tuple] = None) -> TaskRecord:
        return self.learner.learn(task, target, resume)

    def evaluate(self, task_index: int, data: TaskData) -> float:
        return self.learner.evaluate(task_index, data)

    def export(self, task_index: int):
        return self.net.export(task_index)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_index: int) -> torch.Tensor:
        """Logits of the task-aware model (what an export must reproduce)."""
        self.net.eval()
        return self.net(x.to(self.learner.device), task=task_index).cpu()

    def num_parameters(self) -> int:
        return self.net.num_parameters()

    def state(self) -> dict:
        return {"structure": net_state.net_structure(self.net), "weights": self.net.state_dict()}

    def load_state(self, state: dict) -> None:
        device = self.learner.device
        net_state.restore_net(self.net.cpu(), state["structure"], state["weights"])
        self.net.to(device)
