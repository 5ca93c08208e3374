"""EWC, SI and MAS: the shared backbone of Fine-tune (a head per task, earlier heads frozen) held near where
earlier tasks left it by a quadratic penalty, each parameter weighted by its importance.

    EWC (Kirkpatrick et al., PNAS 2017)  lam/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2
        F_k: the diagonal Fisher information of task k at its solution theta*_k, from the model's own predictive
        distribution: E_x sum_c p(c|x) (d log p(c|x) / d theta)^2, every class c of the task's head weighted by its
        predicted probability (exact, no sampled label), one sample at a time.
    SI  (Zenke, Poole & Ganguli, ICML 2017)   c * sum_i Omega_i (theta_i - theta*_i)^2
        Omega = relu(sum_k omega_k / (Delta_k^2 + xi)), omega_k = - sum_steps g_i * dtheta_i the path integral of
        the unregularised loss's gradient along task k's parameter updates, Delta_k the task's total displacement.
    MAS (Aljundi et al., ECCV 2018)           lam * sum_i Omega_i (theta_i - theta*_i)^2
        Omega = sum_k mean_x |d ||F(x)||_2^2 / d theta_i| over task k's training samples, F(x) task k's logits.

Only the backbone is penalised: an earlier task's head is frozen, so nothing can move it.  EWC's separate
penalties of all earlier tasks are kept as one quadratic with the same value and gradient (the sum of quadratics
in theta is a quadratic: Kirkpatrick et al. note it), so its memory does not grow with the number of tasks.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grownfx.data import Task
from grownfx.learn.guards import NonFiniteError
from grownfx.learn.methods.base import StepTerms
from grownfx.learn.methods.finetune import FinetuneContinual
from grownfx.learn.training import derive_seed


class QuadraticPenalty:
    """sum_i omega_i (theta_i - anchor_i)^2 + const over named parameters (an empty penalty is 0)."""

    def __init__(self):
        self.omega: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.const = 0.0

    def __call__(self, params: dict[str, nn.Parameter]) -> Tensor:
        terms = [(self.omega[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in params.items() if n in self.omega]
        if not terms:
            return next(iter(params.values())).new_zeros(())
        return torch.stack(terms).sum() + self.const

    def gradient(self, name: str, value: Tensor) -> Tensor:
        """d/d theta of this penalty for parameter `name` at `value`."""
        return 2 * self.omega[name] * (value - self.anchor[name])

    def add(self, omega: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Add the quadratic sum omega (theta - anchor)^2: the result is again one quadratic, its importance the sum,
        its anchor the importance-weighted mean of the two, and a constant (so the value is the sum's, too)."""
        for n, w in omega.items():
            a = anchor[n]
            if n not in self.omega:
                self.omega[n], self.anchor[n] = w.clone(), a.clone()
                continue
            w0, a0 = self.omega[n], self.anchor[n]
            total = w0 + w
            mean = torch.where(total > 0, (w0 * a0 + w * a) / total.clamp_min(torch.finfo(total.dtype).tiny), a)
            self.const += float((w0 * a0.double().pow(2) + w * a.double().pow(2) - total * mean.double().pow(2)).sum())
            self.omega[n], self.anchor[n] = total, mean

    def state(self) -> dict:
        return {"omega": dict(self.omega), "anchor": dict(self.anchor), "const": self.const}

    def load_state(self, state: dict, device: torch.device) -> None:
        self.omega = {n: v.to(device) for n, v in state["omega"].items()}
        self.anchor = {n: v.to(device) for n, v in state["anchor"].items()}
        self.const = float(state["const"])

    @property
    def values(self) -> int:
        """Values stored: importance and anchor per parameter, and the constant."""
        return sum(2 * w.numel() for w in self.omega.values()) + (1 if self.omega else 0)


class _Regularised(FinetuneContinual):
    """Fine-tune's shared network plus `scale * penalty(theta)`; subclasses say how importance is measured."""

    scale = 1.0  # the multiplier of the penalty's sum

    def __init__(self, recipe, stream, device, **hooks):
        super().__init__(recipe, stream, device, **hooks)
        self.penalty = QuadraticPenalty()

    def learn(self, task: Task, target, resume=None):
        try:
            return super().learn(task, target, resume)
        except NonFiniteError as exc:  # the loop's advice names the learning rate; the penalty's strength matters too
            raise NonFiniteError(f"{exc}; or lower method.lam ({self.recipe.method.lam:g}): a quadratic penalty "
                                 "diverges under SGD once lr x lam x importance passes 2") from exc

    def step_terms(self, task: Task, t: int) -> Optional[StepTerms]:
        if not self.penalty.omega:
            return None
        shared = self.shared_parameters()
        return StepTerms(penalty=lambda: self.scale * self.penalty(shared))

    def stored(self) -> tuple[int, int]:
        return 0, self.penalty.values

    def record_extra(self, t: int) -> dict:
        return {"penalty_lambda": self.recipe.method.lam}

    def state(self) -> dict:
        return {**super().state(), "penalty": self.penalty.state()}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.penalty.load_state(state["penalty"], self.device)

    def samples(self, task: Task, t: int, limit: Optional[int], purpose: str) -> Iterator[Tensor]:
        """Task `t`'s training inputs one at a time, unaugmented (the first `limit` of a seeded order, or all)."""
        data = task.train
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(
            derive_seed(self.recipe.seed, purpose, t)))[:limit]
        for i in order.tolist():
            yield data.normalize(data.x[i:i + 1].to(self.device), augment=None)

    def per_sample(self, task: Task, t: int, limit: Optional[int], purpose: str,
                   accumulate: Callable[[Tensor, list[nn.Parameter]], list[Tensor]]) -> dict[str, Tensor]:
        """mean over task `t`'s samples of `accumulate(logits of one sample, shared parameters)` (a tensor per
        parameter), with the network in evaluation mode and full precision."""
        shared = self.shared_parameters()
        names, params = list(shared), list(shared.values())
        total = [torch.zeros_like(p) for p in params]
        n = 0
        self.model.eval()
        forward = self._forward(t)
        for x in self.samples(task, t, limit, purpose):
            for acc, g in zip(total, accumulate(forward(x), params)):
                acc += g
            n += 1
        return {name: acc / max(n, 1) for name, acc in zip(names, total)}


class EWCContinual(_Regularised):
    name = "ewc"

    @property
    def scale(self) -> float:
        return self.recipe.method.lam / 2

    def end_task(self, task: Task, t: int) -> None:
        fisher = self.fisher(task, t)
        self.penalty.add(fisher, {n: p.detach().clone() for n, p in self.shared_parameters().items()})

    def fisher(self, task: Task, t: int) -> dict[str, Tensor]:
        """The diagonal of the Fisher information of task `t`'s predictive distribution: for every sample, the
        squared gradient of log p(c|x) for each class c of the head, weighted by p(c|x) (the model's own
        distribution, not the labels: the empirical Fisher of the labels is a different matrix and a poor
        stand-in for it; Kunstner et al., NeurIPS 2019)."""

        def expected_square(logits: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
            log_p = F.log_softmax(logits.float(), dim=1)[0]
            p = log_p.detach().exp()
            out = [torch.zeros_like(q) for q in params]
            for c in range(log_p.numel()):
                grads = torch.autograd.grad(log_p[c], params, retain_graph=c + 1 < log_p.numel(), allow_unused=True)
                for acc, g in zip(out, grads):
                    if g is not None:
                        acc += p[c] * g.pow(2)
            return out

        return self.per_sample(task, t, self.recipe.method.fisher_samples, "fisher", expected_square)


class MASContinual(_Regularised):
    name = "mas"

    @property
    def scale(self) -> float:
        return self.recipe.method.lam

    def end_task(self, task: Task, t: int) -> None:
        def abs_gradient(logits: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
            grads = torch.autograd.grad(logits.float().pow(2).sum(), params, allow_unused=True)
            return [torch.zeros_like(q) if g is None else g.abs() for q, g in zip(params, grads)]

        omega = self.per_sample(task, t, self.recipe.method.importance_samples, "mas", abs_gradient)
        # MAS accumulates the importance over tasks and anchors at the latest solution
        total = {n: self.penalty.omega.get(n, 0) + w for n, w in omega.items()}
        self.penalty.omega, self.penalty.anchor = total, {n: p.detach().clone()
                                                          for n, p in self.shared_parameters().items()}


class SIContinual(_Regularised):
    """During a task, after every optimiser step: omega_i -= g_i * (theta_i - theta_before_i) with g the gradient
    of the unregularised loss at theta_before (the step's gradient less the penalty's, which is known exactly);
    at the task's end Omega = relu(Omega + omega / ((theta - anchor)^2 + xi)) and the anchor moves to theta."""

    name = "si"

    def __init__(self, recipe, stream, device, **hooks):
        super().__init__(recipe, stream, device, **hooks)
        self.omega: dict[str, Tensor] = {}  # the learning task's running path integral (in mid-task checkpoints)
        self.before: dict[str, Tensor] = {}  # the parameters before the coming step

    @property
    def scale(self) -> float:
        return self.recipe.method.lam

    def begin_task(self, task: Task, t: int, resumed: bool) -> None:
        shared = self.shared_parameters()
        if not self.penalty.anchor:  # task 1: the path starts at the initialisation (pathint's cweights)
            self.penalty.anchor = {n: p.detach().clone() for n, p in shared.items()}
        if not resumed or not self.omega:
            self.omega = {n: torch.zeros_like(p) for n, p in shared.items()}
        self.before = {n: p.detach().clone() for n, p in shared.items()}  # a resume starts at an epoch's end

    def step_terms(self, task: Task, t: int) -> Optional[StepTerms]:
        shared = self.shared_parameters()
        terms = super().step_terms(task, t) or StepTerms()
        return StepTerms(penalty=terms.penalty, after_step=lambda: self.after_step(shared))

    @torch.no_grad()
    def after_step(self, shared: dict[str, nn.Parameter]) -> None:
        for n, p in shared.items():
            before = self.before[n]
            if p.grad is not None:
                grad = p.grad
                if n in self.penalty.omega:  # the penalty's share of the step's gradient is not the task's
                    grad = grad - self.scale * self.penalty.gradient(n, before)
                self.omega[n] -= grad * (p - before)
            before.copy_(p)

    @torch.no_grad()
    def end_task(self, task: Task, t: int) -> None:
        xi = self.recipe.method.xi
        shared = self.shared_parameters()
        for n, p in shared.items():
            delta = p - self.penalty.anchor[n]
            total = self.penalty.omega.get(n, 0) + self.omega[n] / (delta.pow(2) + xi)
            self.penalty.omega[n] = total.clamp_min(0)  # pathint: relu of the sum
            self.penalty.anchor[n] = p.detach().clone()
        self.omega, self.before = {}, {}

    def stored(self) -> tuple[int, int]:
        return 0, self.penalty.values

    def state(self) -> dict:
        return {**super().state(), "path": dict(self.omega)}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.omega = {n: v.to(self.device) for n, v in state.get("path", {}).items()}
