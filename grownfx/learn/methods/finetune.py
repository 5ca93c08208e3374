"""Fine-tune: one full-width backbone trained on every task in turn, a new head per task (old heads kept).

The backbone and its norms are shared, so learning a task moves the features the earlier heads read: this is
the forgetting baseline.  With `keep_copies` (the seed paper's Fine-tune row, model size T x) a copy of the
whole network is stored after each task and evaluates that task, so nothing is forgotten.

`FinetuneContinual` is also the plumbing of the methods that add something to this shared network (EWC, SI, MAS,
LwF, experience replay): they override the hooks `begin_task`, `step_terms`, `training_forward`, `end_task`,
`stored` and extend `state` / `load_state`; `trains_old_heads` says whether earlier heads keep learning.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import fx, nn

from grownfx.data import Task, TaskData, stream_for
from grownfx.engine.errors import SurgeryError
from grownfx.engine.layers import _reset_head
from grownfx.learn.budget import task_epochs
from grownfx.learn.records import TaskRecord
from grownfx.engine.net import count_parameters
from grownfx.engine.prepare import slim
from grownfx.engine.rewrite import set_submodule
from grownfx.learn.training import Timer, derive_seed, resolve_device
from grownfx.recipe.schema import FinetuneMethod
from grownfx.learn.methods.base import StepTerms, Trainer, backbone, evaluate_with, example_input
from grownfx.learn.methods.multihead import MultiHead


class FinetuneContinual:
    name = "finetune"
    trains_old_heads = False  # LwF and replay: an earlier head keeps learning from the loss that reaches it

    def __init__(self, recipe, stream, device: torch.device, *, on_epoch=None, should_stop=lambda: False,
                 checkpoint=None, dist=None, **_):
        self.recipe, self.stream, self.device = recipe, stream, torch.device(device)
        self.trainer = Trainer(recipe.training, self.device, dist, on_epoch=on_epoch, should_stop=should_stop,
                               checkpoint=checkpoint)
        # the paper's row (a copy per task) is "finetune"; the shared network that forgets is labelled apart
        self.keep_copies = recipe.method.name == "finetune" and recipe.method.keep_copies
        if recipe.method.name == "finetune":
            self.name = "finetune" if self.keep_copies else "finetune[forgetting]"
        torch.manual_seed(recipe.seed)
        model, _ = backbone(recipe, stream.tasks[0].num_classes)  # from model.weights when given
        self.full_params = count_parameters(model)
        gm, coupling, _, _ = slim(model, example_input(stream.input_shape), 1.0,
                                  leaf_modules=recipe.model.leaf_modules, seed=recipe.seed,
                                  output=recipe.model.output, head=recipe.model.head)
        if not gm.head_spec.modules:
            raise SurgeryError("the fine-tune baseline gives each task a copy of the classifier module; this "
                               f"model's classifier is the parameter '{gm.head_spec.first}'")
        self.head_target = gm.head_spec.modules[0]
        self.template = copy.deepcopy(gm.get_submodule(self.head_target))
        self.heads = MultiHead()
        set_submodule(gm, self.head_target, self.heads)
        self.model = gm.to(self.device)
        self.coupling = coupling  # the traced network's channel groups (DEN grows units along them)
        self.copies: list[nn.Module] = []  # keep_copies: the whole network after each task

    def _new_head(self, num_classes: int, t: int) -> nn.Module:
        head = copy.deepcopy(self.template)
        _reset_head(head, num_classes, torch.Generator().manual_seed(derive_seed(self.recipe.seed, "head", t)))
        return head.to(self.device)

    def learn(self, task: Task, target: Optional[float], resume=None) -> TaskRecord:
        timer, training = Timer(), self.recipe.training
        for old in self.heads.heads:
            old.requires_grad_(self.trains_old_heads)
        if resume is None:
            t = len(self.heads.heads)
            self.heads.heads.append(self._new_head(task.num_classes, t))
        else:  # a mid-task checkpoint: its state already holds this task's head, part-trained
            t = len(self.heads.heads) - 1
            self.heads.heads[t].requires_grad_(True)
        self.heads.task = t
        self.begin_task(task, t, resumed=resume is not None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        epochs = self.trainer.train(self.model, self.training_forward(t), [(params, training.optimizer)], task,
                                    name="train", seed=(self.recipe.seed, self.name, t), epochs=task_epochs(training),
                                    resume=resume, terms=self.step_terms(task, t))
        self.end_task(task, t)
        if self.keep_copies:
            self.copies.append(copy.deepcopy(self.model).requires_grad_(False))
        val = self.evaluate(t, task.val)
        samples, values = self.stored()
        return TaskRecord(index=t, name=task.name, num_classes=task.num_classes, target=target, val_acc=val,
                          val_history=[val], params_stored=self.num_parameters(),
                          params_task=count_parameters(self.export(t)),
                          time_s=timer.seconds + (resume[0].elapsed if resume else 0.0), epochs=epochs,
                          stored_samples=samples, stored_values=values, extra=self.record_extra(t))

    # -- what a method on this shared network adds (fine-tune: nothing) --------------------------------------
    def begin_task(self, task: Task, t: int, resumed: bool) -> None:
        """Before task `t` trains (`resumed`: its mid-task checkpoint's state is already loaded)."""

    def step_terms(self, task: Task, t: int) -> Optional[StepTerms]:
        """What every training step of task `t` adds to cross-entropy (grownfx.learn.methods.base.StepTerms)."""
        return None

    def training_forward(self, t: int):
        """The forward the loop trains task `t` with (evaluation always uses `_forward`)."""
        return self._forward(t)

    def end_task(self, task: Task, t: int) -> None:
        """After task `t` trained, before it is evaluated and recorded."""

    def stored(self) -> tuple[int, int]:
        """(samples, values) kept between tasks besides the parameters (TaskRecord.stored_samples/_values)."""
        return 0, 0

    def record_extra(self, t: int) -> dict:
        """Method-specific facts of task `t` for its TaskRecord."""
        return {}

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """The backbone's parameters by name: everything but the per-task heads."""
        heads = f"{self.head_target}."
        return {n: p for n, p in self.model.named_parameters() if not n.startswith(heads)}

    def _model_for(self, t: int) -> nn.Module:
        return self.copies[t] if t < len(self.copies) else self.model

    def _select(self, t: int) -> None:
        """Make the shared network compute task `t` before a forward (DEN's timestamped units, APD's per-task
        weights); Fine-tune's network has nothing to select but the head."""

    def _forward(self, t: int):
        model = self._model_for(t)

        def forward(x):
            self._select(t)
            model.get_submodule(self.head_target).task = t
            return model(x)

        return forward

    @torch.no_grad()
    def logits(self, task_index: int, x: torch.Tensor) -> torch.Tensor:
        self._model_for(task_index).eval()
        return self._forward(task_index)(x.to(self.device))

    def evaluate(self, task_index: int, data: TaskData) -> float:
        return evaluate_with(self._model_for(task_index), self._forward(task_index), data, self.recipe.training,
                             self.device)

    def export(self, task_index: int) -> fx.GraphModule:
        gm = copy.deepcopy(self._model_for(task_index))
        set_submodule(gm, self.head_target, gm.get_submodule(self.head_target).heads[task_index])
        return gm.eval()

    def num_parameters(self) -> int:
        if self.copies:
            return sum(count_parameters(c) for c in self.copies)
        return count_parameters(self.model)

    def state(self) -> dict:
        return {"num_classes": [h.out_features if isinstance(h, nn.Linear) else h.out_channels
                                for h in self.heads.heads],
                "model": self.model.state_dict(), "copies": [c.state_dict() for c in self.copies]}

    def load_state(self, state: dict) -> None:
        for t, n in enumerate(state["num_classes"]):
            self.heads.heads.append(self._new_head(n, t).requires_grad_(False))
        self.model.load_state_dict(state["model"])
        self.copies = []
        for i, sd in enumerate(state["copies"]):
            c = copy.deepcopy(self.model)
            del c.get_submodule(self.head_target).heads[i + 1:]  # task i's copy was taken with heads 0..i
            c.load_state_dict(sd)
            self.copies.append(c.requires_grad_(False))


def finetune_references(recipe, on_epoch=None) -> list[float]:
    """Fine-tune's validation accuracy on each task right after learning it (what `best(scratch, finetune)`
    targets read; identical with and without keep_copies, so the cheaper shared network is trained).
    `on_epoch(info)`: each epoch's event, its stage "finetune_reference" (progress displays)."""
    if recipe.training.num_threads:
        torch.set_num_threads(recipe.training.num_threads)
    recipe = recipe.model_copy(update={"method": FinetuneMethod(keep_copies=False)})
    stream = stream_for(recipe)
    hook = None if on_epoch is None else (lambda info: on_epoch({**info, "stage": "finetune_reference"}))
    method = FinetuneContinual(recipe, stream, resolve_device(recipe.device), on_epoch=hook)
    return [method.learn(task, None).val_acc for task in stream.tasks]
