"""The pretrained task 0's evaluation (`model.weights_data`): its test accuracy as loaded and after every task.

A method that keeps pretrained weights as its net's frozen task 0 (`method.offset` 1) is evaluated on it like on
any task: once before the stream's first task and once after each, on the first task of the data spec the recipe
names.  The accuracies go into summary.json's `pretrained` entry (and the checkpoint, for a resume); the accuracy
matrix keeps the stream's tasks only, so its averages and BWT mean what they mean without a pretrained task.
"""

from __future__ import annotations

from typing import Callable, Optional

from grownfx.data import TaskData, build_stream, data_seed
from grownfx.recipe.schema import Recipe
from grownfx.run.folder import RunError


class PretrainedEvaluation:
    """Task 0's test data and its accuracies so far (`acc[0]`: as loaded; `acc[i]`: after the stream's task i)."""

    def __init__(self, recipe: Recipe, method, stream, echo: Callable[[str], None]):
        self.data: Optional[TaskData] = None
        self.name = ""
        self.acc: list[float] = []
        cfg = recipe.model.weights_data
        if cfg is None:
            return
        if not getattr(method, "offset", 0):
            echo(f"warning: model.weights_data is not used: {method.name} keeps no pretrained task 0 to evaluate")
            return
        task0 = build_stream(cfg, data_seed(recipe) if cfg.seed is None else cfg.seed, code_dir=recipe.code_dir)
        task = task0.tasks[0]
        classes = getattr(method.net, "pretrained_classes", None)
        if classes is None:
            raise RunError(f"model.weights_data: the weights file {recipe.model.weights} has no classifier "
                           "of its own, so its task 0 predicts no classes to evaluate; remove the field")
        if task.num_classes != classes:
            raise RunError(f"model.weights_data: its first task has {task.num_classes} classes, the "
                           f"weights' classifier {classes}; the task must hold every class the "
                           "classifier predicts, in its order")
        if tuple(task0.input_shape) != tuple(stream.input_shape):
            raise RunError(f"model.weights_data: its inputs are {tuple(task0.input_shape)}, the stream's "
                           f"{tuple(stream.input_shape)}")
        if (tuple(task0.mean), tuple(task0.std)) != (tuple(stream.mean), tuple(stream.std)):
            raise RunError(f"model.weights_data normalises with mean {tuple(task0.mean)} / std "
                           f"{tuple(task0.std)}, the stream with {tuple(stream.mean)} / "
                           f"{tuple(stream.std)}: task 0's export takes the stream's; give both the "
                           "same mean and std")
        self.data, self.name = task.test, task.name

    def evaluate(self, method) -> Optional[float]:
        """Task 0's test accuracy now, recorded (None when it has no data)."""
        if self.data is None:
            return None
        self.acc.append(method.evaluate_pretrained(self.data))
        return self.acc[-1]

    def summary(self) -> dict:
        """What summary.json's `pretrained` entry adds to the method's own facts about task 0."""
        if self.data is None or not self.acc:
            return {}
        return {"evaluated": True, "data": self.name, "test_samples": len(self.data), "acc_loaded": self.acc[0],
                "acc_after_task": self.acc[1:], "acc_final": self.acc[-1],
                "note": "task 0 is the loaded network (its own classifier), frozen before the first task; "
                        "acc_loaded: its test accuracy on model.weights_data before the first task, "
                        "acc_after_task[i]: after the stream's task i+1"}
