"""What every continual-learning method offers the runner: learn a task, evaluate one, export one, save."""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import nn

from ..data import Task, TaskData
from ..learner import TaskRecord


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
