"""Learning without forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017) on Fine-tune's shared network.

Before task t trains, the network as it stands (the previous model) is frozen aside.  Every step then adds, for
each earlier task k, the distillation loss between the previous model's head-k output on the *new* batch and the
current model's head-k output on the same batch, both softened by the temperature T:

    loss = CE(new head, y) + lam * sum_k KL(softmax(prev_k(x) / T) || softmax(cur_k(x) / T))

(KL differs from Li & Hoiem's cross-entropy with soft targets by the targets' entropy, a constant: the same
gradient; it reads 0 when the two outputs agree.)  Earlier heads keep learning, from this loss alone.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from grownfx.data import Task
from grownfx.learn.methods.base import StepTerms
from grownfx.learn.methods.finetune import FinetuneContinual
from grownfx.learn.methods.multihead import head_tail
from grownfx.learn.training import autocast


class LwFContinual(FinetuneContinual):
    name = "lwf"
    trains_old_heads = True

    def __init__(self, recipe, stream, device, **hooks):
        super().__init__(recipe, stream, device, **hooks)
        self.previous: Optional[fx.GraphModule] = None  # the network before the learning task (mid-task state)
        self._batch: Optional[Tensor] = None  # the inputs of the step being taken

    def begin_task(self, task: Task, t: int, resumed: bool) -> None:
        if t == 0:
            return
        if not resumed or self.previous is None:
            self.previous = copy.deepcopy(self.model)
        self.previous.eval().requires_grad_(False)  # the function it computed at test time
        self.previous.get_submodule(self.head_target).keep_features = True
        self.heads.keep_features = True

    def training_forward(self, t: int):
        forward = self._forward(t)

        def remember(x: Tensor) -> Tensor:
            self._batch = x
            return forward(x)

        return remember

    def step_terms(self, task: Task, t: int) -> Optional[StepTerms]:
        if t == 0:
            return None
        tail, prev_tail = head_tail(self.model, self.head_target), head_tail(self.previous, self.head_target)
        return StepTerms(penalty=lambda: self.recipe.method.lam * self.distillation(t, tail, prev_tail))

    def distillation_targets(self, t: int, x: Tensor, prev_tail=None) -> list[Tensor]:
        """softmax(prev_k(x) / T) for every earlier task k < t: the previous model's outputs on `x`."""
        prev_tail = prev_tail if prev_tail is not None else head_tail(self.previous, self.head_target)
        heads = self.previous.get_submodule(self.head_target)
        with torch.no_grad(), autocast(self.device, self.recipe.training.precision):
            self.previous(x)
            features = heads.features
            out = []
            for k in range(t):
                with heads.computing(k):
                    out.append(F.softmax(prev_tail(features).float() / self.recipe.method.temperature, dim=1))
        heads.features = None
        return out

    def distillation(self, t: int, tail, prev_tail) -> Tensor:
        """sum over earlier tasks of KL(previous model || current model) on the step's batch, at temperature T."""
        features, x = self.heads.features, self._batch
        targets = self.distillation_targets(t, x, prev_tail)
        T = self.recipe.method.temperature
        total = features.new_zeros((), dtype=torch.float32)
        for k, target in enumerate(targets):
            with self.heads.computing(k), autocast(self.device, self.recipe.training.precision):
                logits = tail(features)
            log_q = F.log_softmax(logits.float() / T, dim=1)
            total = total + F.kl_div(log_q, target, reduction="batchmean")
        self.heads.features, self._batch = None, None
        return total

    def end_task(self, task: Task, t: int) -> None:
        self.previous, self._batch = None, None
        self.heads.keep_features, self.heads.features = False, None

    def record_extra(self, t: int) -> dict:
        return {"distillation_lambda": self.recipe.method.lam, "temperature": self.recipe.method.temperature}

    def state(self) -> dict:
        state = super().state()
        if self.previous is not None:  # a mid-task checkpoint: the targets' network goes with it
            state["previous"] = self.previous.state_dict()
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.previous = None
        if "previous" in state:
            self.previous = copy.deepcopy(self.model)
            self.previous.load_state_dict(state["previous"])
